"""``bioreactor-mpc demo``: the simulated PLC in its own process, the runtime against it over the network, and the batch report.

The simulated PLC (``bioreactor-mpc plc-sim --lockstep``) runs as a child
process on a free 127.0.0.1 port, exactly as a test PLC would; the runtime
connects to it through the default runtime config of the protocol
(``configs/runtime/reference-<protocol>.yaml``) with only the endpoint and the
history file overridden. At harvest the simulator writes its true
trajectories, KPIs and plot; the demo prints them beside the platform recipe
on the same batch.

In advisory mode the runtime also serves the operator screen (its URL and
four demo users, one of each role, with random passwords are printed) and the PLC runs free at
``--time-scale`` (360: a cycle every 10 s), remote enabled, so that a person
can approve; what is not approved in time leaves the PLC on the setpoints it
last had, and the report shows what that gave. ``--auto-approve`` runs it in
lockstep with every recommendation approved at once. In off mode the PLC is
switched to local and runs its own recipe.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from bioreactor_mpc.report import kpi_table
from bioreactor_mpc.runtime_cli import audit_key, print_summary, run_runtime
from controller.kpis import BatchKpis
from controller.modes import RequestedMode
from controller.mpc import EconomicMpc
from controller.nmpc import build_mpc
from controller.robust import RobustMpc
from controller.runtime import RunSummary
from controller.runtime_config import LoadedRuntime, ScreenSettings, load_runtime_config
from interfaces.audit import AuditTrail
from interfaces.history_export import SIMULATION_REFERENCE, read_history_batch
from interfaces.users import Role, UserStore
from plant_models.cho import CultureModel
from plant_models.errors import BioreactorMPCError

SERVER_START_TIMEOUT_S = 60.0
ADVISORY_TIME_SCALE = 360.0
"""Plant seconds per wall second in the advisory demo: one cycle every 10 s, a batch in an hour."""
DEMO_USERS = (
    ("viewer", "Demo Viewer", Role.VIEWER),
    ("operator", "Demo Operator", Role.OPERATOR),
    ("engineer", "Demo Engineer", Role.ENGINEER),
    ("qa", "Demo QA", Role.QA),
)
SERVER_EXIT_TIMEOUT_S = 30.0
EXIT_INTERRUPTED = 130


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _demo_users(history_path: Path, console: Console) -> None:
    """One user of each role in the demo's history, with fresh random passwords printed once; each addition an audit record (``user_added``)."""
    with AuditTrail(history_path) as trail, UserStore(history_path, audit=trail, actor="demo") as users:
        for name, full_name, role in DEMO_USERS:
            password = secrets.token_urlsafe(12)
            users.add_user(name, full_name=full_name, role=role, password=password)
            console.print(f"demo user {name!r} ({role.value}), password {password}", highlight=False, soft_wrap=True)


def wait_for_listener(port: int, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
    """Wait until the simulated PLC accepts TCP connections (or fail, naming its log)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BioreactorMPCError(f"the simulated PLC exited with status {process.returncode} before serving; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise BioreactorMPCError(f"the simulated PLC did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s; see {log_path}")


def run_demo(
    *,
    protocol: str,
    scenario: Path,
    seed: int | None,
    mode: RequestedMode,
    runtime_config: Path,
    output_dir: Path,
    lockstep_timeout_s: float,
    console: Console,
    time_scale: float | None = None,
    auto_approve: bool = False,
    screen_port: int | None = None,
) -> int:
    """The demo; in advisory mode the operator screen is served, and the PLC runs free at ``time_scale`` unless ``auto_approve``."""
    from simulator.batch import run_recipe_batch
    from simulator.config import load_simulation

    loaded_sim = load_simulation(scenario, seed=seed)
    seed_used = loaded_sim.simulation.seed
    stem = f"{loaded_sim.batch.batch_id}-seed{seed_used}-{protocol}-{mode.value}"
    output_dir.mkdir(parents=True, exist_ok=True)
    history_path = output_dir / f"{stem}-history.sqlite"
    for stale in (history_path, history_path.with_name(history_path.name + "-wal"), history_path.with_name(history_path.name + "-shm")):
        stale.unlink(missing_ok=True)  # the demo's own output of an earlier run: a new batch starts a new history
    loaded = load_runtime_config(runtime_config, history=history_path, mode=mode)
    advisory = mode is RequestedMode.ADVISORY
    if advisory:
        screen = ScreenSettings(port=screen_port or free_port())
        loaded = replace(loaded, config=loaded.config.model_copy(update={"screen": screen, "auto_approve": auto_approve}))
        _demo_users(history_path, console)
    if loaded.batch.batch_id != loaded_sim.batch.batch_id:
        raise BioreactorMPCError(f"{runtime_config} runs batch {loaded.batch.batch_id!r} but {scenario} simulates {loaded_sim.batch.batch_id!r}")

    # On a machine whose cache lacks the NLP's library, the C compiler builds it in the background (minutes, its progress logged);
    # the first cycles solve on interpreted functions (about ten times slower: on an idle 2-core machine 3.8 s for the cold solve
    # at inoculation, 0.8 s warm; docs/solver.md) and the first solve after the compile switches to the library. (An empty cache's
    # first demo ran its whole batch interpreted in 284 s, before the compile ended; it then waits for the compile, for the next run.)
    mpc = build_mpc(CultureModel(), loaded.batch, loaded.config.nmpc, background_compile=True)
    if mpc.compile_jobs:
        console.print(
            "compiling the NMPC's optimisation problem to C in the background (once per machine and model structure, about a minute on 2 cores; "
            f"cached in {mpc.library.parent}); the batch starts now on the interpreted solver and switches when the compile is done",
            highlight=False,
            soft_wrap=True,
        )
    port = free_port()
    endpoint = f"opc.tcp://127.0.0.1:{port}/bioreactor-mpc/" if protocol == "opcua" else f"127.0.0.1:{port}"
    plant_dir = output_dir / "plant"
    log_path = output_dir / f"{stem}-plc-sim.log"
    free_running = advisory and not auto_approve  # people approve in minutes, not in the milliseconds of lockstep
    clock = ["--time-scale", str(time_scale or ADVISORY_TIME_SCALE)] if free_running else ["--lockstep", "--lockstep-timeout-s", str(lockstep_timeout_s)]
    command = [sys.executable, "-m", "bioreactor_mpc", "--log-json", "plc-sim", "--protocol", protocol, *clock, "--endpoint", endpoint]
    command += ["--scenario", str(scenario), "--seed", str(seed_used), "--report-dir", str(plant_dir), "--report-stem", stem]
    if mode is RequestedMode.OFF:
        command.append("--local")  # nobody writes setpoints: the PLC runs its own recipe
    started = time.monotonic()
    pace = f"free-running x{time_scale or ADVISORY_TIME_SCALE:g}" if free_running else "lockstep"
    console.print(f"starting the simulated PLC ({protocol}, {pace}) on {endpoint}; its log: {log_path}", highlight=False, soft_wrap=True)
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for_listener(port, server, log_path)
            console.print(f"runtime in {mode.value} mode; one line every 12 process hours and at every change of state", highlight=False, soft_wrap=True)
            summary = asyncio.run(_run_while_serving(loaded, endpoint, server, console, mpc))
            if server.poll() not in (None, 0):
                raise BioreactorMPCError(f"the simulated PLC failed (exit status {server.returncode}) at {summary.last_process_time_h:.0f} h; see {log_path}")
            if summary.end_reason != "batch harvested":
                server.terminate()
                server.wait(timeout=10)
                console.print(f"stopped at {summary.last_process_time_h:.0f} h, before harvest ({summary.end_reason}); the simulated PLC is stopped too", highlight=False)
                print_summary(summary, history_path, console)
                return EXIT_INTERRUPTED
            server.wait(timeout=SERVER_EXIT_TIMEOUT_S)
        finally:
            if server.poll() is None:
                server.terminate()
                server.wait(timeout=10)
    if server.returncode != 0:
        raise BioreactorMPCError(f"the simulated PLC ended with status {server.returncode}; see {log_path}")
    report = json.loads((plant_dir / f"{stem}-kpis.json").read_text(encoding="utf-8"))
    kpis = BatchKpis(**report["kpis"])
    recipe = run_recipe_batch(loaded_sim).kpis
    console.print(kpi_table({f"runtime ({mode.value}, {protocol})": kpis, "recipe, same batch": recipe}, f"{stem}; harvest: {report['harvest_reason']}"))
    gain = 100.0 * (kpis.score_g_per_day / recipe.score_g_per_day - 1.0)
    console.print(
        f"score: {kpis.score_g_per_day:.1f} g/day against the recipe's {recipe.score_g_per_day:.1f} g/day on the same batch ({gain:+.1f} %)", highlight=False, soft_wrap=True
    )
    print_summary(summary, history_path, console)
    with AuditTrail(history_path, key=audit_key(loaded)) as trail:  # the simulator's truth, for the report beside the measured and the forecast
        details = {"scenario": str(scenario), "seed": seed_used, "batch_kpis": kpis.as_dict(), "recipe_kpis": recipe.as_dict()}
        trail.append(actor="demo", action=SIMULATION_REFERENCE, subject=loaded_sim.batch.batch_id, details=details, process_time_h=kpis.harvest_time_h)
    from bioreactor_mpc.history_report import write_history_report

    batch_report = output_dir / f"{stem}-report.html"
    write_history_report(read_history_batch(history_path), batch_report)
    for kind, path in {**report["files"], "batch report": str(batch_report)}.items():
        console.print(f"{kind + ':':14s}{path}", soft_wrap=True)
    console.print(f"demo took {time.monotonic() - started:.0f} s", highlight=False)
    if any(not job.done for job in mpc.compile_jobs):  # the batch ended first: finish the libraries, so that the next run starts compiled
        console.print("finishing the compile of the NMPC's problem for the next run (its progress is logged)", highlight=False)
        for job in mpc.compile_jobs:
            job.wait()
    return 0


async def _run_while_serving(loaded: LoadedRuntime, endpoint: str, server: subprocess.Popen[bytes], console: Console, mpc: EconomicMpc | RobustMpc) -> RunSummary:
    """The runtime, stopped if the simulated PLC dies under it."""
    stop = asyncio.Event()

    async def watch() -> None:
        while server.poll() is None and not stop.is_set():
            await asyncio.sleep(0.2)
        await asyncio.sleep(2.0)  # let the runtime read the harvested phase first
        stop.set()

    watcher = asyncio.create_task(watch())

    def announce(url: str) -> None:
        console.print(f"operator screen: {url} (log in with a user printed above)", highlight=False, soft_wrap=True)

    try:
        return await run_runtime(loaded, endpoint=endpoint, console=console, stop=stop, on_screen=announce, mpc=mpc)
    finally:
        stop.set()
        await watcher
