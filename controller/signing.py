"""The operator's desk in advisory mode: the current recommendation, and whether a signature may still apply to it.

The runtime offers each cycle's recommendation here (the previous one
expires), and asks :meth:`AdvisoryDesk.signable` (by the recommendation's id
and content digest, as the screen showed them) and
:meth:`AdvisoryDesk.still_current` before it records a signature and writes.
The desk does no I/O: the runtime reads the PLC and writes (docs/operator-screen.md).
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping

from controller.advisory import ApprovalRefusedError, Recommendation, RecommendationStatus, Signature, Signer, check_signature_target
from controller.clock import TIME_TOLERANCE_H
from controller.modes import ModeMachine, RequestedMode, State
from controller.ports import Reading
from controller.quality import SETPOINT_SIGNALS

AUTO_APPROVER = Signer("auto-approver", "Automatic approver (lockstep tests and demos only)", "operator")


class AdvisoryDesk:
    def __init__(self) -> None:
        self.recommendation: Recommendation | None = None

    def offer(self, recommendation: Recommendation | None) -> None:
        """A cycle's recommendation (None when the cycle made none): the previous one expires."""
        self.expire()
        if recommendation is not None:
            self.recommendation = recommendation

    def expire(self) -> None:
        if self.recommendation is not None and self.recommendation.status is RecommendationStatus.PENDING:
            self.recommendation = self.recommendation.expired()

    def signable(self, recommendation_id: str, digest: str, modes: ModeMachine) -> Recommendation:
        """The current recommendation, if it is the one with ``recommendation_id`` and its content has ``digest``, and may be signed now.

        Raises :class:`MalformedSignatureError` when the id or the digest is not of the right form, else
        :class:`ApprovalRefusedError` saying why this one cannot be signed (another is current, its content differs, not pending, not advisory).
        """
        check_signature_target(recommendation_id, digest)
        current = self.recommendation
        if current is None or not hmac.compare_digest(current.recommendation_id, recommendation_id):
            raise ApprovalRefusedError(f"recommendation {recommendation_id} is not the current one: it has expired (refresh the screen)")
        made = f"recommendation {recommendation_id} (made at {current.made_at_h:.2f} h)"
        if not hmac.compare_digest(current.digest, digest):
            raise ApprovalRefusedError(f"{made} has content digest {current.digest}, not {digest}: what was shown is not what would be signed (refresh the screen)")
        if current.status is RecommendationStatus.INFORMATION:
            raise ApprovalRefusedError(f"{made} was made in {modes.state.value}, not advisory: nothing to sign")
        if current.status is not RecommendationStatus.PENDING:
            raise ApprovalRefusedError(f"{made} is already {current.status.value}")
        if modes.state is not State.ADVISORY or modes.requested is not RequestedMode.ADVISORY:
            raise ApprovalRefusedError(f"signatures apply in advisory mode; the runtime is {modes.state.value}, {modes.requested.value} requested")
        return current

    def still_current(self, recommendation: Recommendation, readings: Mapping[str, Reading], now_h: float) -> None:
        """Raise (and expire it) when the batch clock or the PLC's data have moved on since ``recommendation`` was made."""
        if not math.isfinite(now_h) or now_h >= recommendation.expires_at_h - TIME_TOLERANCE_H:
            self.expire()
            raise ApprovalRefusedError(f"the recommendation made at {recommendation.made_at_h:.2f} h has expired: the batch clock reads {now_h:.2f} h")
        moved = moved_on(recommendation, readings)
        if moved:
            self.expire()
            raise ApprovalRefusedError(f"the recommendation made at {recommendation.made_at_h:.2f} h has expired: {moved}")

    def apply(self, recommendation: Recommendation, signature: Signature) -> None:
        """Apply a signature to the recommendation (only once it is recorded in the audit trail)."""
        self.recommendation = recommendation.signed(signature)


def moved_on(recommendation: Recommendation, readings: Mapping[str, Reading]) -> str:
    """Why the data a recommendation was computed from has moved on ('' if it has not): a new lab result, other setpoints at the PLC."""
    seq = readings.get("Sample.Seq")
    if seq is not None and seq.good and not isinstance(seq.value, str) and int(seq.value) != recommendation.basis_sample_seq:
        return f"a new lab result (Sample.Seq {seq.value}) arrived since"
    for signal, basis in zip(SETPOINT_SIGNALS, recommendation.basis_setpoints, strict=True):
        reading = readings.get(signal)
        if reading is None or not reading.good or isinstance(reading.value, str) or not math.isclose(float(reading.value), basis, rel_tol=1e-6, abs_tol=1e-6):
            return f"the PLC's {signal} changed since (now {reading.value if reading is not None else None!r}, was {basis:.6g})"
    return ""
