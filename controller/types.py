"""Plain value types shared by the controller, the runtime and the simulator."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

LAB_FIELDS: tuple[str, ...] = (
    "vcd_1e6_per_ml",
    "viability_pct",
    "glucose_g_per_l",
    "lactate_g_per_l",
    "glutamine_mm",
    "ammonia_mm",
    "titer_g_per_l",
    "osmolality_mosm_per_kg",
)
"""Offline analytes in the order of the reference PLC's ``Sample.*`` tags (VCD first)."""

PHASE_IDLE, PHASE_RUNNING, PHASE_HARVESTED = 0, 1, 2
"""``Status.Phase`` of the reference PLC."""
UINT32_MAX = 2**32 - 1
"""``MPC.Heartbeat`` and ``Sample.Seq`` are UInt32: they wrap to 0 after this."""


@dataclass(frozen=True)
class LabResult:
    """One complete offline result set. A field that was not measured is NaN."""

    seq: int
    taken_at_h: float
    vcd_1e6_per_ml: float
    viability_pct: float
    glucose_g_per_l: float
    lactate_g_per_l: float
    glutamine_mm: float
    ammonia_mm: float
    titer_g_per_l: float
    osmolality_mosm_per_kg: float

    def values(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in LAB_FIELDS}

    def measured(self, name: str) -> bool:
        return math.isfinite(getattr(self, name))


@dataclass(frozen=True)
class Setpoints:
    """What a controller asks the PLC to run."""

    feed_rate_lph: float
    glucose_rate_lph: float
    temperature_degc: float
    harvest: bool = False

    def as_dict(self) -> dict[str, float | bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def json_compatible(data: Any) -> Any:
    """``data`` with every non-finite float (NaN, ±Inf) as None, mappings as dicts with string keys, tuples as lists: JSON has no NaN."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {str(key): json_compatible(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [json_compatible(value) for value in data]
    return data


def canonical_json(data: Any) -> str:
    """``data`` as the one JSON text digests are computed over: :func:`json_compatible`, sorted keys, no whitespace, UTF-8 text.

    The same form as the audit trail's (``interfaces.audit.canonical_json``), which the controller may not import.
    """
    return json.dumps(json_compatible(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
