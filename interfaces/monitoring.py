"""The runtime's monitoring: Prometheus metrics read from the runtime at scrape time, and whether it is alive and ready.

- ``/metrics`` (Prometheus text format): histograms of the cycle, solve and
  PLC I/O times, counters of decisions, fallbacks, solver failures, writes by
  outcome and link losses, the state, the alarms, the age of the last cycle,
  and the process's memory and CPU (prometheus_client's process collector).
  Everything is read from the runtime when scraped (:class:`RuntimeCollector`):
  the control code keeps no metric objects of its own.
- ``/healthz`` (alive): 200 while the runtime runs and its last cycle is no
  older than ``safeguards.stall_after_cycles`` (2) cycle periods of wall
  time; 503 with a JSON body saying why otherwise (not started, stopped,
  stalled). It is answered from the event loop that runs the cycles, so a
  blocked loop does not answer at all, which a probe counts as down too.
- ``/readyz`` (ready to control): 200 while the runtime is alive, connected
  to the PLC with its last read OK, able to write its history and not in
  fault (:meth:`controller.runtime.Runtime.health`); 503 with why otherwise.

:func:`serve_monitoring` serves them on their own port (``monitoring`` in the
runtime config, on by default), whether or not the operator screen is on;
the screen serves the same endpoints from :meth:`Monitor.routes`
(docs/monitoring.md).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from controller.modes import State
from controller.nmpc import DecisionSource
from controller.runtime import Runtime
from controller.runtime_config import MonitoringSettings
from controller.types import json_compatible
from interfaces.serving import serve_asgi

log = structlog.get_logger("bioreactor_mpc")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
"""What :func:`prometheus_client.generate_latest` writes."""
TIME_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
"""Upper bounds of the time histograms [s]: a PLC read takes milliseconds, a solve up to its 20 s deadline."""
FALLBACK_SOURCES = (DecisionSource.SHIFTED_PLAN, DecisionSource.RECIPE, DecisionSource.STOOD_DOWN)
"""Decisions in which this cycle's solve did not set the setpoints (a harvest and a fault cycle are neither)."""


@dataclass(frozen=True)
class Verdict:
    """An answer of /healthz or /readyz: whether, why not, and what was looked at."""

    ok: bool
    why: str
    details: dict[str, Any] = field(default_factory=dict)


class Monitor:
    """The monitoring of one runtime: its metrics registry and its liveness and readiness; ``clock`` is the monotonic wall clock the runtime uses."""

    def __init__(self, runtime: Runtime, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.runtime = runtime
        self.clock = clock
        self.registry = CollectorRegistry()
        self.registry.register(RuntimeCollector(self))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_cpu_seconds_total, open file descriptors (Linux)

    @property
    def stall_limit_s(self) -> float:
        """How old the last cycle may be before the runtime counts as stalled [wall s]."""
        return self.runtime.settings.safeguards.stall_after_cycles * self.runtime.batch.cycle_period_h * 3600.0

    def last_cycle_age_s(self) -> float | None:
        """Wall seconds since the last cycle (since :meth:`Runtime.run` started, before the first); None before it started."""
        last = self.runtime.last_cycle_wall_s
        return None if last is None else max(0.0, self.clock() - last)

    def liveness(self) -> Verdict:
        """Alive: running, and the last cycle no older than the stall limit."""
        runtime, age_s, limit_s = self.runtime, self.last_cycle_age_s(), self.stall_limit_s
        details = {
            "running": runtime.running,
            "last_cycle_age_s": age_s,
            "stall_limit_s": limit_s,
            "cycles": runtime.summary.cycles,
            "state": runtime.modes.state.value,
            "reason": runtime.modes.reason,
            "process_time_h": runtime.summary.last_process_time_h,
        }
        if age_s is None:
            return Verdict(False, "the runtime has not started", details)
        if not runtime.running:
            return Verdict(False, f"the runtime has stopped ({runtime.summary.end_reason or 'interrupted'})", details)
        if age_s > limit_s:
            return Verdict(False, f"no cycle for {age_s:.0f} s (limit {limit_s:.0f} s): the loop has stalled", details)
        return Verdict(True, "ok", details)

    def readiness(self) -> Verdict:
        """Ready to control: alive, the last PLC read OK, the history writable, not in fault (:meth:`Runtime.health`), and connected."""
        runtime = self.runtime
        alive = self.liveness()
        connected, (healthy, why) = runtime.port.connected, runtime.health()
        details = {"connected": connected, "link_up": runtime.view()["link_up"], "state": runtime.modes.state.value, "reason": runtime.modes.reason}
        if not alive.ok:
            return Verdict(False, alive.why, details)
        if not healthy:
            return Verdict(False, why, details)
        if not connected:
            return Verdict(False, "not connected to the PLC", details)
        return Verdict(True, "ok", details)

    # ------------------------------------------------------------------ HTTP

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=PROMETHEUS_TEXT)

    async def healthz(self, request: Request) -> Response:
        verdict = self.liveness()
        return _verdict_response({"healthy": verdict.ok, "why": verdict.why, **verdict.details}, verdict.ok)

    async def readyz(self, request: Request) -> Response:
        verdict = self.readiness()
        return _verdict_response({"ready": verdict.ok, "why": verdict.why, **verdict.details}, verdict.ok)

    def routes(self) -> list[Route]:
        """``/metrics``, ``/healthz`` and ``/readyz``, for this module's server and the operator screen alike (no login: the plant's monitoring)."""
        return [
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ]


def _verdict_response(body: dict[str, Any], ok: bool) -> Response:
    return JSONResponse(json_compatible(body), status_code=200 if ok else 503, headers={"Cache-Control": "no-store"})


class RuntimeCollector:
    """Prometheus metrics read from the runtime at scrape time."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        runtime = self.monitor.runtime
        summary = runtime.summary
        yield _histogram("bioreactor_mpc_cycle_seconds", "wall time of a cycle, from its read to its heartbeat", {(): summary.cycle_times_s})
        yield _histogram("bioreactor_mpc_solve_seconds", "MPC solve time of a cycle", {(): summary.solve_times_s})
        yield _histogram(
            "bioreactor_mpc_plc_io_seconds",
            "a cycle's PLC requests: its scan (read), its writes before the heartbeat with their read-backs (write)",
            {("read",): summary.read_times_s, ("write",): summary.write_times_s},
            labels=("direction",),
        )
        yield CounterMetricFamily("bioreactor_mpc_cycles", "cycles run (fault cycles included)", value=summary.cycles)
        decisions = CounterMetricFamily("bioreactor_mpc_decisions", "cycles by who decided (mpc, shifted_plan, recipe, stood_down, harvest, none)", labels=["source"])
        for source, count in sorted(summary.decisions.items()):
            decisions.add_metric([source], count)
        yield decisions
        fallbacks = CounterMetricFamily(
            "bioreactor_mpc_fallbacks", "cycles whose setpoints did not come from this cycle's solve: the shifted plan, the recipe, or stood down", labels=["source"]
        )
        for fallback in FALLBACK_SOURCES:
            fallbacks.add_metric([fallback.value], summary.decisions.get(fallback.value, 0))
        yield fallbacks
        failures = runtime.cycle.controller.failures_total if runtime.cycle is not None else 0
        yield CounterMetricFamily("bioreactor_mpc_solver_failures", "MPC solves that failed (the shifted plan or the recipe stood in)", value=failures)
        writes = CounterMetricFamily(
            "bioreactor_mpc_writes",
            "PLC write requests by outcome: ok (read back equal), failed (refused by the PLC, read back different, lost with the link, or refused for want of "
            "an audit record), reconciled (left without an outcome by a stopped runtime, settled at the next start)",
            labels=["outcome"],
        )
        writes.add_metric(["ok"], summary.writes.ok)
        writes.add_metric(["failed"], summary.writes.failed)
        writes.add_metric(["reconciled"], summary.writes.reconciled)
        yield writes
        yield CounterMetricFamily("bioreactor_mpc_link_losses", "times the PLC link was lost", value=summary.link_losses)
        yield CounterMetricFamily("bioreactor_mpc_storage_losses", "times the history could not be written", value=summary.storage_losses)
        view = runtime.view()
        state = GaugeMetricFamily("bioreactor_mpc_state", "1 for the runtime's current state", labels=["state"])
        for candidate in State:
            state.add_metric([candidate.value], 1.0 if candidate.value == view["state"] else 0.0)
        yield state
        alarms = view["alarms"]
        yield GaugeMetricFamily("bioreactor_mpc_active_alarms", "alarms active now", value=len(alarms))
        active = GaugeMetricFamily("bioreactor_mpc_alarm", "1 for each alarm active now, by code", labels=["code"])
        for code in sorted(alarms):
            active.add_metric([code], 1.0)
        yield active
        yield GaugeMetricFamily("bioreactor_mpc_link_up", "1 while the PLC link is up (the last read OK)", value=1.0 if view["link_up"] else 0.0)
        yield GaugeMetricFamily("bioreactor_mpc_running", "1 while the runtime's loop runs", value=1.0 if runtime.running else 0.0)
        process_time_h = view["process_time_h"]
        yield GaugeMetricFamily("bioreactor_mpc_process_time_hours", "the batch clock at the last cycle", value=process_time_h if process_time_h is not None else math.nan)
        age_s = self.monitor.last_cycle_age_s()
        yield GaugeMetricFamily(
            "bioreactor_mpc_last_cycle_age_seconds", "wall time since the last cycle (since the start, before the first)", value=age_s if age_s is not None else math.nan
        )
        yield GaugeMetricFamily("bioreactor_mpc_stall_limit_seconds", "the age of the last cycle beyond which /healthz reports a stall", value=self.monitor.stall_limit_s)


def _histogram(name: str, documentation: str, series: dict[tuple[str, ...], Sequence[float]], *, labels: Sequence[str] = ()) -> HistogramMetricFamily:
    """A histogram of every value so far, per label values, on :data:`TIME_BUCKETS_S` (cumulative counts, as Prometheus wants them)."""
    histogram = HistogramMetricFamily(name, documentation, labels=list(labels))
    bounds = np.asarray(TIME_BUCKETS_S)
    for label_values, values in series.items():
        data = np.sort(np.asarray(values, dtype=float))
        counts = np.searchsorted(data, bounds, side="right")
        buckets = [(str(bound), float(count)) for bound, count in zip(TIME_BUCKETS_S, counts, strict=True)]
        buckets.append(("+Inf", float(data.size)))
        histogram.add_metric(list(label_values), buckets, sum_value=float(data.sum()))
    return histogram


def monitoring_app(monitor: Monitor) -> Starlette:
    """The monitoring endpoints as their own small application."""
    return Starlette(routes=monitor.routes())


@contextlib.asynccontextmanager
async def serve_monitoring(runtime: Runtime, settings: MonitoringSettings, *, clock: Callable[[], float] = time.monotonic) -> AsyncIterator[str]:
    """``/metrics``, ``/healthz`` and ``/readyz`` on uvicorn in this event loop, for as long as the context lasts; yields the base URL.

    Raises :class:`ConfigError` naming ``monitoring.host`` and ``monitoring.port`` when they cannot be listened on (another
    runtime on this machine with the same port would otherwise be the one scraped).
    """
    async with serve_asgi(monitoring_app(Monitor(runtime, clock=clock)), host=settings.host, port=settings.port, setting="monitoring") as url:
        log.info("monitoring_serving", url=url, metrics=f"{url}metrics", healthz=f"{url}healthz", readyz=f"{url}readyz")
        yield url
