"""The last check before a setpoint leaves the controller: finite, within the equipment, rate-limited."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from controller.config import BatchConfig
from controller.types import Setpoints

RATE_TOLERANCE_DEGC = 1e-3
"""A rate-limit excess this small is clipped without being reported as an adjustment."""


@dataclass(frozen=True)
class FilteredSetpoints:
    setpoints: Setpoints
    adjustments: tuple[str, ...]
    """What the filter changed, for the log; empty when the request passed untouched."""


def filter_setpoints(requested: Setpoints, last_applied: Setpoints, batch: BatchConfig, *, temperature_rate_degc_per_h: float, dt_h: float) -> FilteredSetpoints:
    """Clamp to the equipment's ranges and the temperature rate limit; hold the last value for a non-finite request."""
    equipment = batch.equipment
    limits = {
        "feed_rate_lph": (0.0, equipment.feed_rate_max_lph),
        "glucose_rate_lph": (0.0, equipment.glucose_rate_max_lph),
        "temperature_degc": (equipment.temperature_min_degc, equipment.temperature_max_degc),
    }
    values: dict[str, float] = {}
    adjustments: list[str] = []
    for name, (low, high) in limits.items():
        value = float(getattr(requested, name))
        if not math.isfinite(value):
            value = float(getattr(last_applied, name))
            adjustments.append(f"{name}: non-finite request, last value held")
        clamped = float(np.clip(value, low, high))
        if clamped != value:
            adjustments.append(f"{name}: {value:.6g} clamped to [{low}, {high}]")
        values[name] = clamped
    step = temperature_rate_degc_per_h * dt_h
    last_temperature = last_applied.temperature_degc
    if math.isfinite(last_temperature) and abs(values["temperature_degc"] - last_temperature) > step:
        limited = last_temperature + math.copysign(step, values["temperature_degc"] - last_temperature)
        if abs(values["temperature_degc"] - limited) > RATE_TOLERANCE_DEGC:
            # A plan that moves exactly at the limit meets it only to the solver's tolerance: not worth a log line.
            adjustments.append(f"temperature_degc: {values['temperature_degc']:.3f} rate-limited to {limited:.3f}")
        values["temperature_degc"] = limited
    return FilteredSetpoints(Setpoints(harvest=requested.harvest, **values), tuple(adjustments))
