"""The last check before a setpoint leaves the controller: finite, within the equipment, rate-limited, never feeding a full reactor."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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


def volume_limit_l(batch: BatchConfig) -> float:
    """The volume no feed may go beyond: the PLC's own high-level feed stop, ``recipe.feed_stop_below_max_l`` below the maximum working volume."""
    return batch.equipment.max_working_volume_l - batch.recipe.feed_stop_below_max_l


def filter_setpoints(
    requested: Setpoints,
    last_applied: Setpoints,
    batch: BatchConfig,
    *,
    temperature_rate_degc_per_h: float,
    dt_h: float,
    volume_readings_l: Sequence[float] | Mapping[str, float] = (),
) -> FilteredSetpoints:
    """Clamp to the equipment's ranges and the temperature rate limit; hold the last value for a non-finite request; never feed toward a full reactor.

    ``volume_readings_l`` are every figure the cycle has for the working
    volume (the PV.Volume reading, the volume balance's, the estimator's; a
    mapping names them in the adjustments). The highest finite one counts:
    at or above :func:`volume_limit_l` both feeds stop; otherwise the feeds
    are scaled down together so that it plus one period of both feeds stays
    at the limit. Base added for pH control in that period is not counted.
    """
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
    adjustments += _limit_feeds_to_volume(values, batch, dt_h, volume_readings_l)
    return FilteredSetpoints(Setpoints(harvest=requested.harvest, **values), tuple(adjustments))


def _limit_feeds_to_volume(values: dict[str, float], batch: BatchConfig, dt_h: float, readings: Sequence[float] | Mapping[str, float]) -> list[str]:
    """Stop or scale down both feeds (in ``values``) so that no volume reading exceeds the limit within ``dt_h``; the adjustments made."""
    named = list(readings.items()) if isinstance(readings, Mapping) else [(f"volume reading {i + 1} of {len(readings)}", value) for i, value in enumerate(readings)]
    finite = [(name, float(value)) for name, value in named if math.isfinite(value)]
    inflow_lph = values["feed_rate_lph"] + values["glucose_rate_lph"]
    if not finite or inflow_lph <= 0.0:
        return []
    name, highest_l = max(finite, key=lambda item: item[1])
    limit_l = volume_limit_l(batch)
    if highest_l >= limit_l:
        values["feed_rate_lph"] = values["glucose_rate_lph"] = 0.0
        return [f"feed_rate_lph, glucose_rate_lph: {name} is {highest_l:.1f} L, at or above the volume limit {limit_l:.1f} L: both feeds stopped"]
    room_lph = (limit_l - highest_l) / dt_h
    if inflow_lph <= room_lph:
        return []
    share = room_lph / inflow_lph
    # Rounding must not carry the sum past the room: the product is at most room_lph up to one ulp, so shave it.
    feed, glucose = values["feed_rate_lph"] * share, values["glucose_rate_lph"] * share
    while feed + glucose > room_lph:
        feed, glucose = math.nextafter(feed, 0.0), math.nextafter(glucose, 0.0)
    adjustment = (
        f"feed_rate_lph, glucose_rate_lph: {values['feed_rate_lph']:.4g} + {values['glucose_rate_lph']:.4g} L/h scaled to "
        f"{feed:.4g} + {glucose:.4g} L/h: {name} is {highest_l:.1f} L, {limit_l - highest_l:.1f} L below the volume limit {limit_l:.1f} L for {dt_h:g} h"
    )
    values["feed_rate_lph"], values["glucose_rate_lph"] = feed, glucose
    return [adjustment]
