"""A batch's record as calibration reads it: online signals, lab results, setpoints applied, and the batch's own facts.

Readers (``interfaces.batch_records``: the documented CSV layout and the
runtime's history files) produce :class:`BatchRecord`; the calibration
(``controller.calibration``) consumes it. Nothing here reads files.

Conventions: process time in hours since inoculation; units in every name; a
value that was not measured, or whose status was not Good, is NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from controller.config import BatchConfig
from controller.types import LAB_FIELDS

ONLINE_FIELDS: tuple[str, ...] = (
    "temperature_degc",
    "volume_l",
    "feed_total_l",
    "glucose_feed_total_l",
    "base_total_l",
    "our_mmol_per_l_h",
    "cer_mmol_per_l_h",
    "capacitance_pf_per_cm",
)
"""Online signals a record may carry (the reference PLC's PV.* tags, in the runtime's names)."""

SETPOINT_FIELDS: tuple[str, ...] = ("feed_rate_lph", "glucose_rate_lph", "temperature_degc")
"""Setpoints applied, in the order of the model's inputs."""


@dataclass(frozen=True)
class OnlineSeries:
    """Online signals on one time base; NaN where a value was missing or not Good."""

    time_h: np.ndarray
    values: dict[str, np.ndarray]

    def signal(self, name: str) -> np.ndarray:
        return self.values.get(name, np.full(self.time_h.shape, math.nan))


@dataclass(frozen=True)
class LabSample:
    """One offline sample: when it was drawn, when its result was known, and the values (NaN = not measured)."""

    draw_h: float
    result_h: float
    values: dict[str, float]

    def measured(self, name: str) -> bool:
        return math.isfinite(self.values.get(name, math.nan))


@dataclass(frozen=True)
class SetpointSeries:
    """Setpoints applied: row i took effect at ``time_h[i]`` and held until the next row."""

    time_h: np.ndarray
    values: np.ndarray
    """Shape (n, 3): feed L/h, glucose L/h, temperature °C (:data:`SETPOINT_FIELDS`)."""

    def at(self, t_h: float | np.ndarray) -> np.ndarray:
        """The setpoints in force at ``t_h`` (the first row before the first change)."""
        index = np.clip(np.searchsorted(self.time_h, t_h, side="right") - 1, 0, len(self.time_h) - 1)
        return self.values[index]


@dataclass(frozen=True)
class BatchRecord:
    """Everything calibration needs about one finished (or running) batch."""

    batch_id: str
    batch: BatchConfig
    """Inoculation, media and equipment (the same batch file the runtime reads)."""
    online: OnlineSeries
    lab: tuple[LabSample, ...]
    setpoints: SetpointSeries
    end_h: float
    """Process time of the last record (harvest for a finished batch)."""
    sources: tuple[tuple[str, str], ...] = ()
    """(file, sha-256) of every file the record was read from: the provenance a calibration writes down."""

    def lab_series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(draw times, values) of one lab field where it was measured."""
        if name not in LAB_FIELDS:
            raise KeyError(f"{name!r} is not a lab field; expected one of {', '.join(LAB_FIELDS)}")
        rows = [(s.draw_h, s.values[name]) for s in self.lab if s.measured(name)]
        if not rows:
            return np.empty(0), np.empty(0)
        times, values = zip(*rows, strict=True)
        return np.asarray(times, dtype=float), np.asarray(values, dtype=float)
