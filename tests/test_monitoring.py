"""Monitoring on by default (issue 14): /metrics, /healthz and /readyz on their own port without the screen, the screen's same
endpoints, the Grafana dashboard's metric names, the log level and the libraries' log lines as JSON.

The runtime is the real one, against the reference simulated PLC through an in-memory port that advances the PLC's clock to
the next cycle boundary at each heartbeat (lockstep), and can stop doing so (a stalled loop), drop the link or refuse a write.
Its NMPC is built interpreted with three stages and three iterations: every solve fails and the recipe stands in, which is what
the solver-failure and fallback counters are for. The servers listen on 127.0.0.1 at free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bioreactor_mpc.demo import free_port
from bioreactor_mpc.logging import configure_logging
from controller.ports import PlcLinkError, PlcWriteRefusedError, Reading
from controller.runtime import CycleReport, Runtime
from controller.runtime_config import MonitoringSettings, RuntimeSettings, load_runtime_config
from interfaces.audit import AuditTrail
from interfaces.history import SqliteHistory
from interfaces.monitoring import serve_monitoring
from interfaces.users import UserStore
from interfaces.web.app import create_app
from plant_models.errors import ConfigError
from plant_models.parameters import parameter_vector
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.plc import SimulatedPlc

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
FAILING_NMPC = {"mpc": {"compile": False, "fine_stages": 2, "coarse_stages": 1, "max_iter": 3, "warm_max_iter": 2}}
"""Built in a second, solved in well under one, and never successfully: the recipe stands in at every cycle."""
SETTINGS = RuntimeSettings.model_validate(
    {"poll_interval_s": 0.01, "reconnect_initial_s": 0.05, "reconnect_max_s": 0.2, "safeguards": {"claim_watch_s": 0.0}, "nmpc": FAILING_NMPC}
)
WAIT_S = 60.0


class MemoryPlc:
    """A PLC port over the simulated PLC, in memory: lockstep on the heartbeat; a test can stop the clock, pull the cable or refuse writes."""

    def __init__(self, plc: SimulatedPlc) -> None:
        self.plc = plc
        self.connected = False
        self.advancing = True
        """Move the PLC's clock to the next cycle boundary when the heartbeat is written (False: the batch clock stands, no cycle is due)."""
        self.down = False
        self.refuse_next = 0
        """Refuse this many of the next write requests that hold setpoints."""
        self.accepted = 0
        self.refused = 0

    async def connect(self) -> None:
        if self.down:
            raise PlcLinkError("cable pulled")
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    async def read(self) -> dict[str, Reading]:
        if self.down:
            self.connected = False
            raise PlcLinkError("cable pulled")
        return {tag: Reading(scanned.value, scanned.good, None) for tag, scanned in self.plc.snapshot().items()}

    async def write(self, values: Mapping[str, Any]) -> None:
        if self.down:
            self.connected = False
            raise PlcLinkError("cable pulled")
        if self.refuse_next > 0 and any(tag.startswith("SP.") for tag in values):
            self.refuse_next -= 1
            self.refused += 1
            raise PlcWriteRefusedError({tag: "refused by the test" for tag in values})
        for tag, value in values.items():
            self.plc.write(tag, value)
        self.accepted += 1
        if "MPC.Heartbeat" in values and self.advancing:
            self.plc.advance_to(self.plc.next_cycle_boundary_h())


@dataclass
class Plant:
    runtime: Runtime
    port: MemoryPlc
    history_path: Path
    records: list[CycleReport] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def build_plant(folder: Path) -> Plant:
    loaded = load_simulation(PLATFORM)
    plc, _ = build_simulated_plc(loaded)
    port = MemoryPlc(plc)
    history_path = folder / "history.sqlite"
    reports: list[CycleReport] = []
    runtime = Runtime(
        port=port,
        history=SqliteHistory(history_path),
        batch=loaded.batch,
        nominal_parameters=parameter_vector(loaded.nominal, loaded.batch.media),
        settings=SETTINGS,
        on_cycle=reports.append,
    )
    return Plant(runtime, port, history_path, reports)


@contextlib.asynccontextmanager
async def running(plant: Plant) -> AsyncIterator[asyncio.Task[Any]]:
    """The runtime's loop for as long as the context lasts (stopped and closed at its end)."""
    task = asyncio.create_task(plant.runtime.run(stop=plant.stop))
    try:
        yield task
    finally:
        plant.stop.set()
        await asyncio.wait_for(task, WAIT_S)
        plant.runtime.history.close()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


async def settle(plant: Plant) -> None:
    """Stop the PLC's clock and wait until the cycle in hand is over (and 0.3 s more): the counters then hold still while a test reads them."""
    plant.port.advancing = False
    plc, summary = plant.port.plc, plant.runtime.summary

    def done() -> bool:  # the PLC's time has had its cycle, and that cycle's time is counted (after its heartbeat)
        return bool(plant.records) and plant.records[-1].record.process_time_h >= plc.process_time_h - 1e-6 and len(summary.cycle_times_s) == len(plant.records)

    await until(done, "the cycle in hand to end")
    await asyncio.sleep(0.3)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def exposed_names(text: str) -> set[str]:
    """Every metric family and sample name of a Prometheus text exposition (a family without samples still counts)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    names.update(re.findall(r"^# TYPE (\S+)", text, flags=re.MULTILINE))
    return names


def rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- a runtime cycled a few times, scraped


@dataclass(frozen=True)
class Scrape:
    metrics: str
    records: list[CycleReport]
    accepted: int
    refused: int
    rss_bytes: int
    healthz: tuple[int, dict[str, Any]]
    readyz: tuple[int, dict[str, Any]]
    url: str


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Scrape:
    """Five cycles (the first setpoint write refused by the PLC), then the monitoring port's /metrics, /healthz and /readyz."""
    plant = build_plant(tmp_path_factory.mktemp("scraped"))
    assert plant.runtime.settings.screen is None, "no operator screen: the monitoring stands on its own"
    plant.port.refuse_next = 1

    async def scenario() -> Scrape:
        async with serve_monitoring(plant.runtime, MonitoringSettings(port=0)) as url, running(plant):
            assert url.startswith("http://127.0.0.1:")
            await until(lambda: len(plant.records) >= 5, "five cycles")
            await settle(plant)
            async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
                metrics = await client.get("/metrics")
                rss = rss_bytes()
                healthz, readyz = await client.get("/healthz"), await client.get("/readyz")
            assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
            return Scrape(
                metrics.text,
                list(plant.records),
                plant.port.accepted,
                plant.port.refused,
                rss,
                (healthz.status_code, healthz.json()),
                (readyz.status_code, readyz.json()),
                url,
            )

    return asyncio.run(asyncio.wait_for(scenario(), 2 * WAIT_S))


def test_metrics_are_served_on_their_own_port_without_the_screen(scraped: Scrape) -> None:
    values = samples(scraped.metrics)
    records = [report.record for report in scraped.records]
    n = len(records)
    assert values[("bioreactor_mpc_cycles_total", ())] == n
    for name in ("bioreactor_mpc_cycle_seconds", "bioreactor_mpc_solve_seconds"):
        assert values[(f"{name}_count", ())] == n
        assert values[(f"{name}_bucket", (("le", "+Inf"),))] == n
    solves = [r.solve_time_s for r in records]
    assert values[("bioreactor_mpc_solve_seconds_sum", ())] == pytest.approx(sum(solves), rel=1e-9)
    for bound in ("0.1", "0.5", "1.0", "2.5"):  # counted here, one by one
        assert values[("bioreactor_mpc_solve_seconds_bucket", (("le", bound),))] == sum(1 for s in solves if s <= float(bound)), bound
    reads, writes = (("direction", "read"),), (("direction", "write"),)
    assert values[("bioreactor_mpc_plc_io_seconds_count", reads)] == n and values[("bioreactor_mpc_plc_io_seconds_count", writes)] == n
    assert values[("bioreactor_mpc_plc_io_seconds_sum", reads)] == pytest.approx(sum(r.read_time_s for r in records), rel=1e-9)
    cycle_sum = values[("bioreactor_mpc_cycle_seconds_sum", ())]
    assert cycle_sum >= sum(solves), "a cycle holds its solve"

    fell_back = [r for r in records if r.source in ("recipe", "shifted_plan")]
    assert len(fell_back) == n, "three iterations never converge: every cycle falls back"
    assert values[("bioreactor_mpc_solver_failures_total", ())] == len(fell_back)
    assert values[("bioreactor_mpc_fallbacks_total", (("source", "recipe"),))] == sum(1 for r in records if r.source == "recipe")
    assert values[("bioreactor_mpc_fallbacks_total", (("source", "stood_down"),))] == 0
    assert values[("bioreactor_mpc_writes_total", (("outcome", "failed"),))] == scraped.refused == 1
    assert values[("bioreactor_mpc_writes_total", (("outcome", "ok"),))] == scraped.accepted
    assert values[("bioreactor_mpc_alarm", (("code", "solver_fallback"),))] == 1.0

    assert values[("bioreactor_mpc_running", ())] == 1.0 and values[("bioreactor_mpc_link_up", ())] == 1.0
    assert values[("bioreactor_mpc_state", (("state", "closed_loop"),))] == 1.0
    assert values[("bioreactor_mpc_process_time_hours", ())] == pytest.approx(records[-1].process_time_h)
    age_s = values[("bioreactor_mpc_last_cycle_age_seconds", ())]
    assert 0.25 <= age_s < 60.0, "the PLC's clock stood for 0.3 s before the scrape"
    assert values[("bioreactor_mpc_stall_limit_seconds", ())] == pytest.approx(2 * 3600.0 * load_simulation(PLATFORM).batch.cycle_period_h), "two cycle periods"
    memory = values[("process_resident_memory_bytes", ())]
    assert 0.7 * scraped.rss_bytes < memory < 1.3 * scraped.rss_bytes, "the process's RSS, as /proc says"

    assert scraped.healthz[0] == 200 and scraped.healthz[1]["healthy"] is True and scraped.healthz[1]["cycles"] == n
    assert scraped.readyz[0] == 200 and scraped.readyz[1]["ready"] is True and scraped.readyz[1]["connected"] is True


def test_the_grafana_dashboard_queries_only_metrics_the_runtime_exposes(scraped: Scrape) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [panel for panel in dashboard["panels"] if panel.get("type") != "row"]
    expressions = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    assert len(panels) >= 6 and all(panel.get("targets") for panel in panels), "every panel queries something"
    queried = {name for expr in expressions for name in re.findall(r"\b((?:bioreactor_mpc|process)_[a-z_]+)", expr)}
    exposed = exposed_names(scraped.metrics)
    assert not queried - exposed, f"queried but not exposed: {sorted(queried - exposed)}"
    for wanted in (
        "bioreactor_mpc_last_cycle_age_seconds",
        "bioreactor_mpc_cycle_seconds_bucket",
        "bioreactor_mpc_solve_seconds_bucket",
        "bioreactor_mpc_plc_io_seconds_bucket",
        "bioreactor_mpc_solver_failures_total",
        "bioreactor_mpc_fallbacks_total",
        "bioreactor_mpc_writes_total",
        "process_resident_memory_bytes",
    ):
        assert wanted in queried, f"the dashboard has no panel on {wanted}"
    assert all("histogram_quantile" in expr for expr in expressions if "_bucket" in expr), "histograms are shown as quantiles"


# --------------------------------------------------------------------------- liveness and readiness


def test_healthz_is_503_when_the_loop_stalls_or_the_runtime_stops(tmp_path: Path) -> None:
    plant = build_plant(tmp_path)
    skew_s = [0.0]

    def wall_clock() -> float:  # the runtime's monotonic clock, plus time a test lets pass
        return time.monotonic() + skew_s[0]

    limit_s = 2 * 3600.0 * plant.runtime.batch.cycle_period_h

    async def scenario() -> None:
        async with serve_monitoring(plant.runtime, MonitoringSettings(port=0), clock=wall_clock) as url, httpx.AsyncClient(base_url=url, timeout=10.0) as client:
            before = await client.get("/healthz")
            assert before.status_code == 503 and before.json()["why"] == "the runtime has not started"
            async with running(plant):
                await until(lambda: len(plant.records) >= 2, "two cycles")
                alive = await client.get("/healthz")
                assert alive.status_code == 200 and alive.json()["healthy"] is True
                await settle(plant)  # the batch clock stands: no cycle is due any more
                skew_s[0] = limit_s - 60.0
                assert (await client.get("/healthz")).status_code == 200, "within two cycle periods of the last cycle"
                skew_s[0] = limit_s + 60.0
                stalled = await client.get("/healthz")
                assert stalled.status_code == 503, stalled.text
                body = stalled.json()
                assert body["healthy"] is False and "stalled" in body["why"] and body["last_cycle_age_s"] > limit_s and body["stall_limit_s"] == limit_s
                assert (await client.get("/readyz")).status_code == 503, "a stalled runtime is not ready either"
                age = samples((await client.get("/metrics")).text)[("bioreactor_mpc_last_cycle_age_seconds", ())]
                assert age > limit_s
                skew_s[0] = 0.0
                assert (await client.get("/healthz")).status_code == 200
            stopped = await client.get("/healthz")
            assert stopped.status_code == 503 and stopped.json()["why"] == "the runtime has stopped (stopped)" and stopped.json()["running"] is False
            assert samples((await client.get("/metrics")).text)[("bioreactor_mpc_running", ())] == 0.0

    asyncio.run(asyncio.wait_for(scenario(), 2 * WAIT_S))


def test_readyz_is_503_while_the_plc_link_is_down(tmp_path: Path) -> None:
    plant = build_plant(tmp_path)

    async def scenario() -> None:
        async with serve_monitoring(plant.runtime, MonitoringSettings(port=0)) as url, httpx.AsyncClient(base_url=url, timeout=10.0) as client, running(plant):
            await until(lambda: len(plant.records) >= 2, "two cycles")
            assert (await client.get("/readyz")).status_code == 200
            plant.port.down = True
            await until(lambda: not plant.runtime.view()["link_up"], "the runtime to see the link down")
            down = await client.get("/readyz")
            assert down.status_code == 503, down.text
            assert down.json()["ready"] is False and down.json()["connected"] is False and down.json()["link_up"] is False
            assert down.json()["why"] == "the PLC link is down"
            assert (await client.get("/healthz")).status_code == 200, "alive: the link is down for less than two cycle periods"
            values = samples((await client.get("/metrics")).text)
            assert values[("bioreactor_mpc_link_up", ())] == 0.0 and values[("bioreactor_mpc_link_losses_total", ())] == 1
            plant.port.down = False
            await until(lambda: plant.runtime.view()["link_up"] and plant.port.connected, "the runtime to reconnect")
            cycles = len(plant.records)
            plant.port.plc.advance_to(plant.port.plc.next_cycle_boundary_h())  # the fault the lost link caused is cleared by the next cycle
            await until(lambda: len(plant.records) > cycles, "a cycle after the reconnection")
            assert (await client.get("/readyz")).status_code == 200

    asyncio.run(asyncio.wait_for(scenario(), 2 * WAIT_S))


def test_the_screen_serves_the_same_monitoring_endpoints_without_login(tmp_path: Path) -> None:
    plant = build_plant(tmp_path)
    users, audit = UserStore(plant.history_path), AuditTrail(plant.history_path, read_only=True)
    app = create_app(runtime=plant.runtime, users=users, audit=audit, history_path=plant.history_path)

    async def scenario() -> None:
        async with serve_monitoring(plant.runtime, MonitoringSettings(port=0)) as url, httpx.AsyncClient(base_url=url, timeout=10.0) as own:
            screen = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")
            async with screen:
                for path in ("/metrics", "/healthz", "/readyz"):
                    on_screen, on_port = await screen.get(path), await own.get(path)
                    assert on_screen.status_code == on_port.status_code, path
                    if path == "/metrics":
                        assert on_screen.status_code == 200 and exposed_names(on_screen.text) == exposed_names(on_port.text)
                    else:
                        assert on_screen.status_code == 503 and on_screen.json()["why"] == on_port.json()["why"] == "the runtime has not started"
                assert (await screen.get("/api/status")).status_code == 401, "the rest of the screen still needs a login"

    try:
        asyncio.run(asyncio.wait_for(scenario(), WAIT_S))
    finally:
        users.close()
        audit.close()
        plant.runtime.history.close()


def test_a_monitoring_port_in_use_is_refused_naming_the_setting(tmp_path: Path) -> None:
    plant = build_plant(tmp_path)
    port = free_port()

    async def scenario() -> None:
        holder = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", port)
        try:
            with pytest.raises(ConfigError, match=r"monitoring: cannot listen on 127\.0\.0\.1:\d+.*monitoring\.port"):
                async with serve_monitoring(plant.runtime, MonitoringSettings(port=port)):
                    pass
        finally:
            holder.close()
            await holder.wait_closed()

    try:
        asyncio.run(asyncio.wait_for(scenario(), WAIT_S))
    finally:
        plant.runtime.history.close()


def test_the_reference_configs_turn_monitoring_on() -> None:
    for name in ("reference-opcua.yaml", "reference-modbus.yaml"):
        monitoring = load_runtime_config(REPO / "configs" / "runtime" / name).config.monitoring
        assert monitoring == MonitoringSettings(enabled=True, host="127.0.0.1", port=9108), name


# --------------------------------------------------------------------------- logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    config, root = structlog.get_config(), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)


def _log_everything() -> None:
    """One line of ours and one of a library at each level, the library's with arguments to format."""
    ours, library = structlog.get_logger("bioreactor_mpc"), logging.getLogger("asyncua.client.ua_client")
    for level in ("debug", "info", "warning", "error"):
        getattr(ours, level)(f"ours_{level}", cycle=1)
        getattr(library, level)("library %s line of session %d", level, 7)


def _logged(out: io.StringIO) -> list[str]:
    return [json.loads(line)["event"] for line in out.getvalue().splitlines()]  # every line one JSON object, or this fails


def test_the_log_levels_apply_to_ours_and_the_libraries_lines_in_json(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging(json=True, level="info", stream=out)
    _log_everything()
    assert _logged(out) == ["ours_info", "ours_warning", "library warning line of session 7", "ours_error", "library error line of session 7"], (
        "ours from info, the libraries' from warning"
    )
    library = json.loads(out.getvalue().splitlines()[2])
    assert library["logger"] == "asyncua.client.ua_client" and library["level"] == "warning" and "timestamp" in library

    out = io.StringIO()
    configure_logging(json=True, level="error", stream=out)
    _log_everything()
    assert _logged(out) == ["ours_error", "library error line of session 7"], "the libraries never below our level"

    out = io.StringIO()
    configure_logging(json=True, level="debug", libraries_level="debug", stream=out)
    _log_everything()
    assert len(_logged(out)) == 8
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(level="loud", stream=out)


def _runtime_config(folder: Path, *, level: str, libraries_level: str, monitoring_port: int) -> Path:
    config = yaml.safe_load((REPO / "configs" / "runtime" / "reference-opcua.yaml").read_text(encoding="utf-8"))
    for key in ("tag_map", "batch", "model"):
        config[key] = str((REPO / "configs" / "runtime" / config[key]).resolve())
    config.update(
        history=str(folder / "history.sqlite"),
        poll_interval_s=0.05,
        nmpc=FAILING_NMPC,
        monitoring={"port": monitoring_port},
        logging={"level": level, "libraries_level": libraries_level},
        audit={"checkpoints": {"file": str(folder / "checkpoints.jsonl")}},
    )
    path = folder / "runtime.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _run_until_monitored(folder: Path, *, config_level: str, libraries_level: str = "warning", cli: list[str]) -> tuple[list[str], dict[str, int]]:
    """``bioreactor-mpc --log-json [cli] run`` against an endpoint where no PLC listens; its monitoring port scraped, then SIGTERM.

    Returns the standard error's lines and the status of /metrics, /healthz and /readyz.
    """
    port = free_port()
    config = _runtime_config(folder, level=config_level, libraries_level=libraries_level, monitoring_port=port)
    command = [sys.executable, "-m", "bioreactor_mpc", "--log-json", *cli, "run", "--config", str(config), "--endpoint", f"opc.tcp://127.0.0.1:{free_port()}/nobody/"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=folder)
    statuses: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 120.0
        settled_by = math.inf
        # The port may answer a moment before the runtime's loop has started (/healthz 503, "not started": right, and a race on a
        # loaded machine): scrape again until it is alive, for up to 30 s after the first answer.
        while not statuses or (statuses["/healthz"] != 200 and time.monotonic() < settled_by):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the runtime exited or never served its monitoring port: {process.communicate(timeout=10)[1].decode()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                statuses = {path: httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5.0).status_code for path in ("/metrics", "/healthz", "/readyz")}
                settled_by = min(settled_by, time.monotonic() + 30.0)
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert process.returncode == 0, err.decode()[-3000:]
    return err.decode().splitlines(), statuses


def test_run_serves_monitoring_without_the_screen_and_logs_json_at_the_configured_level(tmp_path: Path) -> None:
    lines, statuses = _run_until_monitored(tmp_path, config_level="warning", cli=[])
    assert statuses == {"/metrics": 200, "/healthz": 200, "/readyz": 503}, "served by bioreactor-mpc run itself; not ready: no PLC answers"
    events = [json.loads(line) for line in lines if line.strip()]  # every line one JSON object, or this fails
    assert events and {event["level"] for event in events} <= {"warning", "error", "critical"}, "logging.level: warning in the config"
    assert any(event["event"] == "alarm_raised" and event.get("code") == "plc_link" for event in events)


def test_the_command_lines_log_level_wins_and_uvicorns_lines_are_json(tmp_path: Path) -> None:
    lines, statuses = _run_until_monitored(tmp_path, config_level="error", libraries_level="info", cli=["--log-level", "info"])
    assert statuses["/metrics"] == 200
    events = [json.loads(line) for line in lines if line.strip()]
    assert any(event["event"] == "runtime_config" and event["level"] == "info" for event in events), "--log-level info over the config's error"
    uvicorn = [event for event in events if str(event.get("logger", "")).startswith("uvicorn")]
    assert any(event["event"].startswith("Started server process") and event["level"] == "info" for event in uvicorn), [e["event"] for e in uvicorn]
    assert any(event["event"] == "monitoring_serving" for event in events)
