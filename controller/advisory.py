"""Advisory mode: the recommendation of a cycle, and the operator's signed approval or rejection of it.

A recommendation is the safety-filtered plan of one cycle (setpoints for the
next interval, harvest time, predicted titer and score at harvest, and what
the platform recipe would give from the same estimate). It is **current**
only until the next cycle boundary: once the batch clock reaches it, the
data the recommendation was computed from has moved on, and it expires.

Each recommendation has a unique id (a random UUID) and a content digest
(SHA-256 of the canonical JSON of everything it says: id, times, setpoints,
harvest, predictions, basis). A signature names both, as the screen showed
them; it applies only to the recommendation with that id whose content has
that digest, never to one found by comparing times.

An approval or a rejection is an electronic signature (21 CFR Part 11
§11.50): the signer's name and printed name, the time, the meaning
(approved or rejected), the reason, and the recommendation it applies to (id
and digest). The runtime writes it to the audit trail *before* it acts; if the
record cannot be written, the action is refused.
"""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any

from controller.types import canonical_json, json_compatible
from plant_models.errors import BioreactorMPCError


class Meaning(str, Enum):
    APPROVED = "approved"
    REJECTED = "rejected"


class RecommendationStatus(str, Enum):
    INFORMATION = "information"
    """Made outside advisory mode (closed loop writes it itself; held, off and fault write nothing): not for signing."""
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"


class ApprovalRefusedError(BioreactorMPCError, PermissionError):
    """An approval or rejection that cannot be carried out (expired, not advisory, remote disabled, not recorded)."""


class MalformedSignatureError(ApprovalRefusedError, ValueError):
    """A signature request whose recommendation id or digest is not even of the right form (not a stale one: garbage)."""


RECOMMENDATION_ID = re.compile(r"[0-9a-f]{32}")
"""A recommendation's id: a random UUID as 32 lower-case hexadecimal digits."""
DIGEST = re.compile(r"[0-9a-f]{64}")
"""A content digest: SHA-256 as 64 lower-case hexadecimal digits."""


def new_recommendation_id() -> str:
    return uuid.uuid4().hex


def check_signature_target(recommendation_id: str, digest: str) -> None:
    """Raise :class:`MalformedSignatureError` unless ``recommendation_id`` and ``digest`` have the form of an id and a digest."""
    if not isinstance(recommendation_id, str) or RECOMMENDATION_ID.fullmatch(recommendation_id) is None:
        raise MalformedSignatureError(f"{recommendation_id!r} is not a recommendation id (32 lower-case hexadecimal digits, as the screen's status gives it)")
    if not isinstance(digest, str) or DIGEST.fullmatch(digest) is None:
        raise MalformedSignatureError(f"{digest!r} is not a recommendation's content digest (64 lower-case hexadecimal digits, as the screen's status gives it)")


@dataclass(frozen=True)
class Signer:
    """Who signs: the user's login name, printed name and role."""

    name: str
    full_name: str
    role: str


@dataclass(frozen=True)
class Signature:
    signer: Signer
    meaning: Meaning
    reason: str
    signed_utc: str
    recommendation_id: str
    recommendation_digest: str
    recommendation_made_at_h: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "signer": self.signer.name,
            "printed_name": self.signer.full_name,
            "role": self.signer.role,
            "meaning": self.meaning.value,
            "reason": self.reason,
            "signed_utc": self.signed_utc,
            "recommendation_id": self.recommendation_id,
            "recommendation_digest": self.recommendation_digest,
            "recommendation_made_at_h": self.recommendation_made_at_h,
        }


@dataclass(frozen=True)
class Recommendation:
    """One cycle's advice, identified by ``recommendation_id`` (unique) and made at ``made_at_h`` (the cycle's process time)."""

    made_at_h: float
    expires_at_h: float
    feed_rate_lph: float
    glucose_rate_lph: float
    temperature_degc: float
    harvest_now: bool
    harvest_time_h: float
    predicted_titer_g_per_l: float
    predicted_score_g_per_day: float
    recipe_titer_g_per_l: float = math.nan
    recipe_score_g_per_day: float = math.nan
    source: str = "mpc"
    status: RecommendationStatus = RecommendationStatus.PENDING
    basis_sample_seq: int = 0
    """The last lab result set the cycle had (``Sample.Seq``); a newer one expires the recommendation."""
    basis_setpoints: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    """What the PLC ran when the recommendation was made (feed, glucose feed, temperature); a change expires it."""
    signature: Signature | None = field(default=None)
    recommendation_id: str = field(default_factory=new_recommendation_id)
    """Unique: a random UUID (hex), never reused, so a signature cannot land on another recommendation."""

    def content(self) -> dict[str, Any]:
        """What the recommendation says (everything but its status and signature), as JSON-compatible data: what the digest covers."""
        return json_compatible({k: v for k, v in self.__dict__.items() if k not in ("status", "signature")})

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of :meth:`content`."""
        return hashlib.sha256(canonical_json(self.content()).encode("utf-8")).hexdigest()

    def signed(self, signature: Signature) -> Recommendation:
        status = RecommendationStatus.APPROVED if signature.meaning is Meaning.APPROVED else RecommendationStatus.REJECTED
        return replace(self, status=status, signature=signature)

    def expired(self) -> Recommendation:
        return replace(self, status=RecommendationStatus.EXPIRED) if self.status is RecommendationStatus.PENDING else self

    def setpoint_values(self) -> dict[str, float | bool]:
        """The PLC signals an approval writes."""
        values: dict[str, float | bool] = {
            "SP.FeedRate": self.feed_rate_lph,
            "SP.GlucoseRate": self.glucose_rate_lph,
            "SP.Temperature": self.temperature_degc,
        }
        return values

    def as_dict(self) -> dict[str, Any]:
        data = self.content()
        data["digest"] = self.digest
        data["status"] = self.status.value
        data["signature"] = self.signature.as_dict() if self.signature is not None else None
        return data


def now_utc() -> str:
    return datetime.now(UTC).isoformat()
