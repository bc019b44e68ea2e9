"""Plain value types shared by the controller, the runtime and the simulator."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

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
