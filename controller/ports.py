"""The PLC port: what the runtime needs from any PLC link, whatever the protocol.

Implementations: :class:`interfaces.opcua_port.OpcUaPort` and
:class:`interfaces.modbus_port.ModbusPort`.
The runtime cannot tell them apart: it reads every mapped signal in one
snapshot and writes signals by their logical names (:mod:`interfaces.signals`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from plant_models.errors import BioreactorMPCError

Value = float | int | bool | str


@dataclass(frozen=True)
class Reading:
    """One signal as scanned by the PLC, in engineering units."""

    value: Value
    good: bool
    source_time: datetime | None
    """When the PLC scanned it (wall-clock UTC), if the protocol says."""


class ScannedValue(Protocol):
    """What a scan gives per signal: a :class:`Reading` from a PLC port, or the simulator's ``TagReading`` in-process."""

    @property
    def value(self) -> Value: ...

    @property
    def good(self) -> bool: ...


def good_number(readings: Mapping[str, ScannedValue], signal: str) -> float:
    """A signal's value as a number when it is in the scan, Good and numeric; NaN otherwise."""
    reading = readings.get(signal)
    if reading is None or not reading.good or isinstance(reading.value, str):
        return math.nan
    return float(reading.value)


class PlcLinkError(ConnectionError, BioreactorMPCError):
    """The PLC could not be reached or did not answer in time; nothing can be assumed about a write in flight."""


class PlcWriteRefusedError(PermissionError, BioreactorMPCError):
    """The PLC answered and refused one or more writes (out of range, remote disabled, wrong type)."""

    def __init__(self, refusals: Mapping[str, str]) -> None:
        self.refusals = dict(refusals)
        super().__init__("; ".join(f"{signal}: {reason}" for signal, reason in self.refusals.items()))


class PlcWriteMismatchError(BioreactorMPCError, RuntimeError):
    """A write the PLC accepted reads back as something else."""


class PlcAuthError(PlcLinkError):
    """The PLC refused the runtime's credentials or certificate, or the runtime's own certificate is unusable (expired, unreadable).

    Retrying at the link's pace would lock a real PLC's account: the runtime
    waits at least :attr:`retry_after_s` before the next attempt.
    """

    def __init__(self, message: str, *, retry_after_s: float = 300.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PlcMappingError(BioreactorMPCError, LookupError):
    """The PLC does not hold a mapped signal, or holds it with another type: the tag map does not fit this PLC.

    Not a link problem and not retried: the runtime refuses to start and says
    which signals are wrong.
    """

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        super().__init__("the tag map does not fit the PLC: " + "; ".join(f"{signal}: {problem}" for signal, problem in self.problems.items()))


class HistoryUnavailableError(BioreactorMPCError, OSError):
    """The history cannot be written now (disk full, read-only, deleted or replaced, locked by another runtime).

    The runtime then writes nothing to the PLC (a write must be recorded
    first), withholds its heartbeat so the PLC's recipe takes over, alarms,
    and tries the history again every poll.
    """


class PlcPort(Protocol):
    @property
    def connected(self) -> bool: ...

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def read(self) -> dict[str, Reading]:
        """Every mapped signal, in one request."""
        ...

    async def write(self, values: Mapping[str, Value]) -> None:
        """Write signals (each checked by the PLC) and verify them by reading back.

        Raises :class:`PlcWriteRefusedError` naming every refused signal (the
        others were written), :class:`PlcWriteMismatchError` when an accepted
        value reads back differently, :class:`PlcLinkError` when the link
        failed. Never retries a write.
        """
        ...


# --------------------------------------------------------------------------- history


@dataclass(frozen=True)
class ResumeState:
    """What a restarted runtime needs to carry on a batch where it stopped."""

    batch_id: str
    last_cycle_h: float
    """Process time of the last completed cycle."""
    estimator: dict[str, Any]
    """The estimator's saved state (``ExtendedKalmanEstimator.to_dict``)."""
    lab_seq: int
    """The last lab result set the estimator used (``Sample.Seq``)."""
    harvest_time_h: float
    """The harvest time the controller was planning for."""
    requested_mode: str | None = None
    """The mode requested when the runtime stopped (an engineer's choice on the screen outlives a restart)."""
    held_contradictions: Mapping[str, str] = field(default_factory=dict)
    """Physical contradictions held until an engineer acknowledges them: a restart does not clear them."""
    fault_cycles: int = 0
    """Cycles in fault in a row at the last cycle: a restart during a fault hand-over goes on withholding the heartbeat."""
    trust: Mapping[str, Any] = field(default_factory=dict)
    """The trust region's width, its miss count and whether the NMPC stood down (``TrustRegion.to_dict``): a restart does not re-trust a model.
    Under ``recipe_glucose``, what the fallback recipe and the NMPC's glucose feed limit learned from the lab results
    (``NmpcController.resume_dict``): a restart does not forget the culture's measured glucose consumption."""


@dataclass(frozen=True)
class CycleRecord:
    """One completed cycle, as the history keeps it."""

    process_time_h: float
    state: str
    reason: str
    source: str
    """Who decided (:class:`controller.nmpc.DecisionSource`): mpc, shifted_plan, recipe, harvest; or none when the cycle could not run."""
    requested: Mapping[str, float | bool] | None
    applied: Mapping[str, float | bool] | None
    """The setpoints after the safety filter (written only in closed loop)."""
    adjustments: tuple[str, ...]
    harvest_time_h: float
    predicted_titer_g_per_l: float
    predicted_score_g_per_day: float
    solve_time_s: float
    estimate: Mapping[str, Any]
    """States, their standard deviations and the parameter multipliers."""
    wrote_setpoints: bool
    read_time_s: float = math.nan
    """The scan's read request."""
    write_time_s: float = math.nan
    """The cycle's write requests before the heartbeat, read-backs included."""
    trust: Mapping[str, Any] = field(default_factory=dict)
    """The trust region at this cycle: its source, width, current bounds, miss count and last lab check (``TrustRegion.summary``)."""


@dataclass(frozen=True)
class PendingWrite:
    """A write whose intent was recorded but whose outcome was not (the runtime stopped between the two)."""

    write_id: int
    process_time_h: float
    values: Mapping[str, Value]


class HistoryStore(Protocol):
    """Where the runtime records everything it saw and did (:class:`interfaces.history.SqliteHistory`).

    Every method that records raises :class:`HistoryUnavailableError` when the
    record cannot be written (disk full, read-only, file deleted or replaced).
    """

    def check_available(self) -> None:
        """Raise :class:`HistoryUnavailableError` unless the history file is still the one opened and can be written."""
        ...

    def record_write_intent(self, process_time_h: float, values: Mapping[str, Value]) -> int:
        """Record a write before it is sent (outcome ``pending``); its id for :meth:`record_write_outcome`."""
        ...

    def record_write_outcome(self, write_id: int, outcome: str, detail: str = "") -> None: ...

    def pending_writes(self, batch_id: str) -> list[PendingWrite]:
        """This batch's writes recorded as intents with no outcome, oldest first."""
        ...

    def start_run(self, *, batch_id: str, requested_mode: str, config: Mapping[str, Any]) -> None: ...

    def record_scan(self, process_time_h: float, readings: Mapping[str, Reading], problems: Mapping[str, str]) -> None: ...

    def record_lab(self, process_time_h: float, result: Any, *, used: bool) -> None: ...

    def record_write(self, process_time_h: float, values: Mapping[str, Value], outcome: str, detail: str = "") -> None: ...

    def record_state_change(self, process_time_h: float, previous: str, state: str, reason: str) -> None: ...

    def record_alarm(self, process_time_h: float, code: str, message: str, *, active: bool) -> None: ...

    def save_resume(self, resume: ResumeState) -> None:
        """Commit the state to resume from before the cycle's writes are sent: a runtime killed during them never runs that cycle again."""
        ...

    def commit_cycle(self, record: CycleRecord, resume: ResumeState | None) -> None:
        """Record a cycle and the state to resume from, in one transaction (None: saved already with :meth:`save_resume`)."""
        ...

    def load_resume(self, batch_id: str) -> ResumeState | None: ...

    def end_run(self, *, reason: str) -> None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- audit


class AuditLog(Protocol):
    """The audit trail (:class:`interfaces.audit.AuditTrail`): append-only, hash-chained.

    :meth:`append` raises when the record cannot be written; the caller then
    refuses the action the record was for.
    """

    def append(self, *, actor: str, action: str, subject: str, details: Mapping[str, Any], process_time_h: float | None = None) -> Any: ...
