"""Key performance indicators of a finished batch, and the score it is judged on."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np

from controller.config import BatchConfig


@dataclass(frozen=True)
class BatchKpis:
    harvest_time_h: float
    titer_g_per_l: float
    product_mass_g: float
    peak_vcd_1e6_per_ml: float
    viability_at_harvest_pct: float
    galactosylated_fraction: float
    glucose_low_h: float
    osmolality_high_h: float
    volume_high_h: float
    score_g_per_day: float

    @property
    def violation_h(self) -> float:
        return self.glucose_low_h + self.osmolality_high_h + self.volume_high_h

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


Number = TypeVar("Number", float, np.ndarray)


def batch_score_g_per_day(product_mass_g: Number, harvest_time_h: Number, turnaround_days: float) -> Number:
    """Product harvested per day of reactor occupancy, turnaround included: the one score the batch, the plan and the forecast are judged on.

    Elementwise for arrays (the score of every candidate harvest of a plan).
    """
    return product_mass_g / (harvest_time_h / 24.0 + turnaround_days)


def _hours_where(mask: np.ndarray, time_h: np.ndarray) -> float:
    """Time spent where ``mask`` holds, integrating each sample over the step that follows it."""
    steps = np.diff(time_h)
    return float(np.sum(steps[mask[:-1]]))


def compute_kpis(
    *,
    time_h: np.ndarray,
    vcd_1e6_per_ml: np.ndarray,
    viability_pct: np.ndarray,
    glucose_g_per_l: np.ndarray,
    osmolality_mosm_per_kg: np.ndarray,
    volume_l: np.ndarray,
    titer_g_per_l: np.ndarray,
    galactosylated_fraction: np.ndarray,
    config: BatchConfig,
) -> BatchKpis:
    """KPIs from true trajectories that end at harvest (the last sample is the harvest)."""
    if time_h.size < 2:
        raise ValueError("a batch trajectory needs at least two samples")
    harvest_time_h = float(time_h[-1])
    product_mass_g = float(titer_g_per_l[-1] * volume_l[-1])
    return BatchKpis(
        harvest_time_h=harvest_time_h,
        titer_g_per_l=float(titer_g_per_l[-1]),
        product_mass_g=product_mass_g,
        peak_vcd_1e6_per_ml=float(np.max(vcd_1e6_per_ml)),
        viability_at_harvest_pct=float(viability_pct[-1]),
        galactosylated_fraction=float(galactosylated_fraction[-1]),
        glucose_low_h=_hours_where(glucose_g_per_l < config.limits.glucose_min_g_per_l, time_h),
        osmolality_high_h=_hours_where(osmolality_mosm_per_kg > config.limits.osmolality_max_mosm_per_kg, time_h),
        volume_high_h=_hours_where(volume_l > config.equipment.max_working_volume_l, time_h),
        score_g_per_day=batch_score_g_per_day(product_mass_g, harvest_time_h, config.economics.turnaround_days),
    )
