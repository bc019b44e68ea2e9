"""Record before acting: the history and the audit trail as the runtime writes them, and the PLC writes that must be recorded first.

A write is recorded as an intent (``writes.outcome`` pending) before it is
sent; a write holding ``SP.*`` is also appended to the audit trail first, and
refused (not sent) when that record cannot be written. After the PLC answers,
the outcome is recorded. A restart or the return of storage reconciles the
intents left without an outcome with what the PLC holds. Every record method
raises :class:`~controller.ports.HistoryUnavailableError` when the history
cannot take it; the runtime then stops writing to the PLC (docs/runtime.md).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from controller.alarms import AlarmChange
from controller.modes import StateChange
from controller.ports import AuditLog, HistoryStore, PlcLinkError, PlcPort, PlcWriteMismatchError, PlcWriteRefusedError, ScannedValue, Value
from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)


@dataclass
class WriteCounts:
    ok: int = 0
    failed: int = 0
    reconciled: int = 0


class Recorder:
    """The runtime's history and audit trail, and its PLC writes (each recorded before it is sent)."""

    def __init__(self, *, port: PlcPort, history: HistoryStore, audit: AuditLog | None, batch_id: str, counts: WriteCounts | None = None) -> None:
        self.port = port
        self.history = history
        self.audit = audit
        self.batch_id = batch_id
        self.audit_problem: str | None = None
        """Why the last audit record could not be written (None when the last one was)."""
        self.counts = counts if counts is not None else WriteCounts()
        self.write_time_s = 0.0
        """Time spent in write requests (read-backs included) since :meth:`start_timing`."""

    def start_timing(self) -> None:
        self.write_time_s = 0.0

    # ------------------------------------------------------------------ the audit trail

    def audited(self, now_h: float, *, actor: str, action: str, subject: str, details: Mapping[str, Any]) -> bool:
        """Append to the audit trail; False (and :attr:`audit_problem` says why) when it cannot be written. No audit trail configured: True."""
        if self.audit is None:
            return True
        try:
            self.audit.append(actor=actor, action=action, subject=subject, details=details, process_time_h=now_h if math.isfinite(now_h) else None)
        except BioreactorMPCError as error:
            log.error("audit_write_failed", action=action, error=str(error))
            self.audit_problem = f"the audit trail cannot be written ({action} refused): {error}"
            return False
        self.audit_problem = None
        return True

    # ------------------------------------------------------------------ records

    def state_change(self, now_h: float, change: StateChange | None, *, requested: str) -> None:
        if change is not None:
            self.history.record_state_change(now_h, change.previous.value, change.state.value, change.reason)
            details = {"from": change.previous.value, "to": change.state.value, "reason": change.reason, "requested": requested}
            self.audited(now_h, actor="runtime", action="state_changed", subject="state", details=details)

    def alarms(self, now_h: float, changes: tuple[AlarmChange, ...] | list[AlarmChange], *, logged: bool = False) -> None:
        """Alarms raised and cleared, in the history and the audit trail (and the log, unless ``logged`` already)."""
        for change in changes:
            if not logged and change.active:
                log.warning("alarm_raised", code=change.code, message=change.message, process_time_h=now_h)
            elif not logged:
                log.info("alarm_cleared", code=change.code, process_time_h=now_h)
            self.history.record_alarm(now_h, change.code, change.message, active=change.active)
            action = "alarm_raised" if change.active else "alarm_cleared"
            self.audited(now_h, actor="runtime", action=action, subject=change.code, details={"message": change.message})

    def reconcile(self, readings: Mapping[str, ScannedValue], now_h: float) -> None:
        """Give every write left as an intent (a killed runtime, a storage failure mid-write) an outcome, from what the PLC holds now."""
        for pending in self.history.pending_writes(self.batch_id):
            held = {name: readings[name].value for name in pending.values if name in readings and readings[name].good}
            same = all(name in held and _same_value(held[name], value) for name, value in pending.values.items() if name != "MPC.Heartbeat")
            detail = "reconciled: the PLC holds the written values" if same else f"reconciled: the PLC holds {json.dumps(held, default=str)}, not the written values"
            self.history.record_write_outcome(pending.write_id, "reconciled", detail)
            self.counts.reconciled += 1
            log.warning("write_reconciled", write_id=pending.write_id, process_time_h=pending.process_time_h, applied=same)
            if any(name.startswith("SP.") for name in pending.values):
                details = {"write_id": pending.write_id, "outcome": "reconciled", "detail": detail}
                self.audited(now_h, actor="runtime", action="setpoint_write_result", subject="SP.*", details=details)

    # ------------------------------------------------------------------ writes

    async def write(self, now_h: float, values: Mapping[str, Value], *, actor: str = "runtime") -> bool:
        """One write request: its intent recorded first (and, when it holds ``SP.*``, audited: no record, no write), then sent once, then its outcome.

        Whether the PLC accepted every value (read back). A lost link
        propagates; a history that cannot record the intent raises
        :class:`~controller.ports.HistoryUnavailableError` and nothing is sent.
        """
        write_id = self.history.record_write_intent(now_h, values)
        setpoints = {name: value for name, value in values.items() if name.startswith("SP.")}
        if setpoints and not self.audited(now_h, actor=actor, action="setpoint_write", subject="SP.*", details={**setpoints, "write_id": write_id}):
            self.history.record_write_outcome(write_id, "refused", "the audit record could not be written; nothing sent")
            self.counts.failed += 1
            return False
        started = time.perf_counter()
        try:
            await self.port.write(values)
        except (PlcWriteRefusedError, PlcWriteMismatchError, PlcLinkError) as error:
            self.write_time_s += time.perf_counter() - started
            self.counts.failed += 1
            outcome = "link_error" if isinstance(error, PlcLinkError) else "refused" if isinstance(error, PlcWriteRefusedError) else "mismatch"
            self.history.record_write_outcome(write_id, outcome, str(error))
            if setpoints:
                details = {"write_id": write_id, "outcome": outcome, "detail": str(error)}
                self.audited(now_h, actor=actor, action="setpoint_write_result", subject="SP.*", details=details)
            if isinstance(error, PlcLinkError):
                raise
            if isinstance(error, PlcWriteRefusedError):
                log.warning("write_refused", process_time_h=now_h, refusals=error.refusals)
            else:
                log.error("write_mismatch", process_time_h=now_h, error=str(error))
            return False
        self.write_time_s += time.perf_counter() - started
        self.history.record_write_outcome(write_id, "ok")
        if setpoints:
            self.audited(now_h, actor=actor, action="setpoint_write_result", subject="SP.*", details={"write_id": write_id, "outcome": "ok"})
        self.counts.ok += 1
        return True


def _same_value(held: Value, written: Value) -> bool:
    if isinstance(written, bool) or isinstance(held, bool | str) or isinstance(written, str):
        return held == written
    return math.isclose(float(held), float(written), rel_tol=1e-6, abs_tol=1e-6)
