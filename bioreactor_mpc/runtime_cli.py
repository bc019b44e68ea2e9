"""``bioreactor-mpc run``: the runtime against a PLC, with a live progress line and the history's path at the end.

Before anything else the runtime's kinetics file is checked: a calibrated one
(with ``provenance``) runs only when an engineer approved that very file (its
sha256) in the history's audit trail (``bioreactor-mpc model approve``); the
nominal kinetics need no approval.

The audit trail is MAC'd with the audit key (:func:`audit_key`) and exports
checkpoints of its head (:func:`checkpoint_sinks`) every
``audit.checkpoints.every_records`` records, every ``every_cycles`` cycles
(with the process history's rows) and at shutdown (docs/audit-and-users.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import structlog
from rich.console import Console

from bioreactor_mpc.admin_cli import UntrustedApprovalError, model_approval, read_parameter_file
from controller.modes import RequestedMode
from controller.mpc import EconomicMpc
from controller.nmpc import build_mpc
from controller.ports import PlcPort
from controller.robust import RobustMpc
from controller.runtime import CycleReport, ModelFile, RunSummary, Runtime
from controller.runtime_config import LoadedRuntime, nominal_parameter_vector
from controller.takeover import RuntimeStartError, TakeoverApproval
from interfaces.audit import AuditTrail
from interfaces.audit_export import CheckpointSink, FileSink, HttpSink, SyslogSink
from interfaces.audit_keys import KEY_ENV, AuditKey, load_key_file
from interfaces.history import SqliteHistory
from interfaces.monitoring import serve_monitoring
from interfaces.tagmap import ModbusTagMap, OpcUaTagMap, load_tag_map
from interfaces.web.serve import serve_screen
from plant_models.cho import CultureModel
from plant_models.errors import ConfigError

log = structlog.get_logger("bioreactor_mpc")


def make_port(tag_map_path: Path, *, endpoint: str | None, timeout_s: float, allow_insecure: bool, auth_retry_after_s: float = 300.0) -> PlcPort:
    """The port the tag map's protocol calls for; ``endpoint`` overrides the map's (an opc.tcp:// URL, or host:port for Modbus)."""
    tag_map = load_tag_map(tag_map_path)
    if isinstance(tag_map, OpcUaTagMap):
        from interfaces.opcua_port import OpcUaPort

        return OpcUaPort(tag_map, endpoint=endpoint, timeout_s=timeout_s, allow_insecure=allow_insecure, auth_retry_after_s=auth_retry_after_s)
    if not isinstance(tag_map, ModbusTagMap):
        raise ConfigError(f"{tag_map_path}: unsupported protocol")
    from interfaces.modbus_port import ModbusPort, parse_endpoint

    host, port = parse_endpoint(endpoint) if endpoint is not None else (None, None)
    return ModbusPort(tag_map, host=host, port=port, timeout_s=timeout_s)


def approved_model_file(loaded: LoadedRuntime) -> ModelFile:
    """The runtime's kinetics file with its sha256; a calibrated one must carry an engineer's approval of that sha256 in the history's audit trail.

    Raises :class:`~controller.takeover.RuntimeStartError` naming the file and the command that approves it.
    """
    path = loaded.source.parent / loaded.config.model
    parameters, digest = read_parameter_file(path)
    if parameters != loaded.nominal:
        raise RuntimeStartError(f"{path}: the file changed since the configuration was loaded; start again")
    if not parameters.calibrated:
        return ModelFile(str(path), digest, calibrated=False)
    try:
        approval = model_approval(loaded.history_path, digest, key=audit_key(loaded))
    except UntrustedApprovalError as error:
        raise RuntimeStartError(f"{path} is a calibrated model; {error}; the runtime does not start") from error
    if approval is None:
        raise RuntimeStartError(
            f"{path} is a calibrated model (sha256 {digest}) that no engineer has approved in {loaded.history_path}; the runtime does not start. "
            f'Review its calibration report, then approve it: bioreactor-mpc model approve {path} --history {loaded.history_path} --user ENGINEER --reason "..."'
        )
    log.info("model_approved", path=str(path), sha256=digest, approved_by=approval.actor, audit_seq=approval.seq)
    return ModelFile(str(path), digest, calibrated=True, approval_seq=approval.seq)


DEFAULT_KEY_FILE = "audit.key"
"""The audit key file the runtime uses, beside its config file, when neither ``$BIOREACTOR_MPC_AUDIT_KEY`` nor ``audit.key_file`` names one."""


def audit_key(loaded: LoadedRuntime) -> AuditKey | None:
    """The audit key: the file ``$BIOREACTOR_MPC_AUDIT_KEY`` names, else ``audit.key_file``, else ``audit.key`` beside the config if it exists.

    A key file named (by the variable or the config) must exist and be
    readable by its owner only, or the runtime does not start
    (:class:`~interfaces.audit_keys.AuditKeyError` names the file). With no
    key at all the trail is not MAC'd, and every start logs ``audit_unkeyed``.
    """
    named = os.environ.get(KEY_ENV)
    if named:
        return load_key_file(Path(named))
    base = loaded.source.parent
    if loaded.config.audit.key_file is not None:
        return load_key_file(base / loaded.config.audit.key_file)
    default = base / DEFAULT_KEY_FILE
    if default.exists():
        return load_key_file(default)
    log.warning(
        "audit_unkeyed",
        history=str(loaded.history_path),
        reason=f"no audit key ({KEY_ENV}, audit.key_file or {default}): the audit trail is not MAC'd, and whoever can write the history can rewrite it",
    )
    return None


def checkpoint_sinks(loaded: LoadedRuntime) -> list[CheckpointSink]:
    """Where the audit trail's checkpoints go (``audit.checkpoints``); none configured is logged (``audit_checkpoints_not_exported``)."""
    settings = loaded.config.audit.checkpoints
    sinks: list[CheckpointSink] = []
    if settings.file is not None:
        sinks.append(FileSink(loaded.source.parent / settings.file))
    if settings.syslog is not None:
        sinks.append(SyslogSink(settings.syslog))
    if settings.http_url is not None:
        sinks.append(HttpSink(settings.http_url, timeout_s=settings.http_timeout_s))
    if not sinks:
        log.warning("audit_checkpoints_not_exported", history=str(loaded.history_path), reason="no audit.checkpoints: a rewrite of the whole history would not be evident")
    return sinks


class ProgressPrinter:
    """One line every ``every_h`` process hours, and at every change of state."""

    def __init__(self, console: Console, *, every_h: float = 12.0) -> None:
        self.console = console
        self.every_h = every_h
        self._next_h = 0.0
        self._state = ""

    def __call__(self, report: CycleReport) -> None:
        r = report.record
        if r.process_time_h + 1e-6 < self._next_h and r.state == self._state:
            return
        self._next_h = math.floor(r.process_time_h / self.every_h + 1e-6) * self.every_h + self.every_h
        self._state = r.state
        x, sd = r.estimate["state"], r.estimate["sd"]
        sp = r.applied or {}
        setpoints = f"feed {sp['feed_rate_lph']:5.2f} L/h  glucose {sp['glucose_rate_lph']:4.2f} L/h  T {sp['temperature_degc']:4.1f} °C" if sp else "no setpoints"
        wrote = "written" if r.wrote_setpoints else "not written"
        alarms = f"  alarms: {', '.join(report.alarms)}" if report.alarms else ""
        self.console.print(
            f"day {r.process_time_h / 24:5.2f}  {r.state:11s}  VCD {x['viable_cells']:5.2f}±{sd['viable_cells']:.2f}  glucose {x['glucose']:4.2f}  "
            f"titer {x['titer']:4.2f} g/L  volume {x['volume']:6.0f} L  |  {setpoints} ({wrote})  harvest {r.harvest_time_h:5.0f} h{alarms}",
            highlight=False,
            soft_wrap=True,
        )


async def run_runtime(
    loaded: LoadedRuntime,
    *,
    endpoint: str | None,
    console: Console | None,
    stop: asyncio.Event | None = None,
    on_screen: Callable[[str], None] | None = None,
    mode_override: RequestedMode | None = None,
    mpc: EconomicMpc | RobustMpc | None = None,
    takeover: TakeoverApproval | None = None,
) -> RunSummary:
    """Run the runtime of ``loaded`` until the batch ends or ``stop`` is set (SIGINT and SIGTERM set it too).

    Refuses a calibrated kinetics file without an engineer's approval (:func:`approved_model_file`).

    The monitoring endpoints (``/metrics``, ``/healthz``, ``/readyz``) are
    served from the same event loop on their own port unless
    ``monitoring.enabled`` is false. With a ``screen`` section the operator
    screen is served there too; ``on_screen`` is told its URL once it listens.
    """
    config = loaded.config
    model_file = approved_model_file(loaded)  # before anything is built, connected or created
    key, sinks, every = audit_key(loaded), checkpoint_sinks(loaded), config.audit.checkpoints
    port = make_port(
        loaded.tag_map_path,
        endpoint=endpoint,
        timeout_s=config.io_timeout_s,
        allow_insecure=config.allow_insecure,
        auth_retry_after_s=config.safeguards.auth_retry_after_s,
    )
    mpc = mpc or build_mpc(CultureModel(), loaded.batch, config.nmpc)  # built (on a new machine, compiled) before any file is created

    def checkpoint() -> object:  # the history has the audit trail, opened after it, record its rows every so many cycles
        return audit.checkpoint(f"every {every.every_cycles} cycles")

    with contextlib.ExitStack() as files:  # closed in reverse order, whatever happens
        history = files.enter_context(  # takes the history's lock: one runtime per history file
            SqliteHistory(loaded.history_path, mac_key=key, checkpoint=checkpoint, checkpoint_every_cycles=every.every_cycles)
        )
        audit = files.enter_context(AuditTrail(loaded.history_path, key=key, sinks=sinks, checkpoint_every=every.every_records, export_in_background=True))
        runtime = Runtime(
            port=port,
            history=history,
            batch=loaded.template,  # pinned to one batch, or a template that follows the PLC's batch id
            nominal_parameters=nominal_parameter_vector(loaded),
            envelope=loaded.nominal.envelope,
            fitted=loaded.nominal.calibrated,
            model_file=model_file,
            settings=config,
            on_cycle=ProgressPrinter(console) if console is not None else None,
            audit=audit,
            mode_override=mode_override,
            mpc=mpc,
            takeover=takeover,
        )
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, stop.set)
                handled.append(signum)
            except (NotImplementedError, RuntimeError):  # not the main thread, or no signals on this platform
                pass
        try:
            async with contextlib.AsyncExitStack() as servers:
                if config.monitoring.enabled:
                    await servers.enter_async_context(serve_monitoring(runtime, config.monitoring))
                if config.screen is not None:
                    url = await servers.enter_async_context(serve_screen(runtime, config.screen, loaded.history_path, audit=audit))
                    if on_screen is not None:
                        on_screen(url)
                return await runtime.run(stop=stop)
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)


def print_summary(summary: RunSummary, history_path: Path, console: Console) -> None:
    solves = np.asarray(summary.solve_times_s)
    console.print(f"runtime: {summary.cycles} cycles, ended: {summary.end_reason}; states {summary.states}; decisions {summary.decisions}", highlight=False, soft_wrap=True)
    console.print(
        f"writes: {summary.writes_ok} verified, {summary.writes_failed} failed; link losses {summary.link_losses}"
        + (f"; resumed from {summary.resumed_from_h:.0f} h" if summary.resumed_from_h is not None else ""),
        highlight=False,
        soft_wrap=True,
    )
    if solves.size:
        console.print(
            f"solver: median {1000 * np.median(solves):.0f} ms, p95 {1000 * np.percentile(solves, 95):.0f} ms, max {1000 * solves.max():.0f} ms", highlight=False, soft_wrap=True
        )
    console.print(f"history:      {history_path}", soft_wrap=True)
