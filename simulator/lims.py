"""The laboratory behind the plant: offline samples drawn about once a day, measured with assay noise, their results released hours later.

Part of the plant side: the all-in-one :class:`~simulator.plc.SimulatedPlc`
and ``plant-sim`` (:mod:`simulator.plant_io`) both draw with it, so a seed
gives the same draw times, assay noise and delays in both. What the results
reach is the PLC's business: the all-in-one PLC publishes them itself, the
soft PLC takes them from its LIMS tags.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from controller.types import LAB_FIELDS, LabResult
from simulator.config import LabMissingFault, LabValueFault, SimulationConfig
from simulator.plant import MINUTES_PER_HOUR, Plant


@dataclass(frozen=True)
class PendingSample:
    """A drawn sample whose result the lab has not released yet."""

    draw_index: int
    draw_minute: int
    publish_minute: int
    result: LabResult
    volume_l: float
    glucose_delivered_g: float


class Lims:
    """Draw times, assay noise and release delays of the offline samples, from their own random streams."""

    def __init__(self, simulation: SimulationConfig, sampling_rng: np.random.Generator, lab_rng: np.random.Generator) -> None:
        self._simulation = simulation
        self._sampling_rng = sampling_rng
        self._lab_rng = lab_rng
        self.pending: list[PendingSample] = []
        self._next_draw_index = 0
        self.next_draw_minute = self._schedule_draw(0, now_minute=0)

    def _schedule_draw(self, index: int, *, now_minute: int) -> int:
        sampling = self._simulation.sampling
        nominal_h = sampling.first_draw_h + index * sampling.interval_h
        jitter_h = self._sampling_rng.uniform(-sampling.draw_jitter_h, sampling.draw_jitter_h)
        return max(now_minute if index else 0, round((nominal_h + jitter_h) * MINUTES_PER_HOUR))

    def event_minutes(self) -> list[int]:
        """The next draw and every pending release."""
        return [self.next_draw_minute, *(sample.publish_minute for sample in self.pending)]

    def due(self, minute: int) -> list[PendingSample]:
        """Take the results released by ``minute``, oldest first."""
        released: list[PendingSample] = []
        while self.pending and self.pending[0].publish_minute <= minute:
            released.append(self.pending.pop(0))
        return released

    def draw_due(self, plant: Plant, inputs: np.ndarray, glucose_delivered_g: float) -> None:
        """Draw every sample scheduled by the plant's minute (the culture it takes leaves the reactor)."""
        while self.next_draw_minute <= plant.minute:
            self._draw(plant, inputs, glucose_delivered_g)

    def _draw(self, plant: Plant, inputs: np.ndarray, glucose_delivered_g: float) -> None:
        sampling = self._simulation.sampling
        index = self._next_draw_index
        observed = plant.observables_now(inputs)
        truth = {
            "vcd_1e6_per_ml": observed["viable_cells"],
            "viability_pct": observed["viability"],
            "glucose_g_per_l": observed["glucose"],
            "lactate_g_per_l": observed["lactate"],
            "glutamine_mm": observed["glutamine"],
            "ammonia_mm": observed["ammonia"],
            "titer_g_per_l": observed["titer"],
            "osmolality_mosm_per_kg": observed["osmolality"],
        }
        measured = self._lab_measurement(truth)
        for fault in self._simulation.faults:
            if isinstance(fault, LabValueFault) and fault.draw_index == index:
                measured[fault.field] *= fault.factor
            elif isinstance(fault, LabMissingFault) and fault.draw_index == index:
                measured[fault.field] = math.nan
        delay_h = self._sampling_rng.uniform(sampling.result_delay_min_h, sampling.result_delay_max_h)
        pending = PendingSample(
            draw_index=index,
            draw_minute=plant.minute,
            publish_minute=plant.minute + max(1, round(delay_h * MINUTES_PER_HOUR)),
            result=LabResult(seq=0, taken_at_h=plant.process_time_h, **measured),
            volume_l=plant.volume_l,
            glucose_delivered_g=glucose_delivered_g,
        )
        self.pending.append(pending)
        self.pending.sort(key=lambda sample: sample.publish_minute)
        if sampling.sample_volume_l > 0.0:
            plant.remove_sample(sampling.sample_volume_l)
        self._next_draw_index += 1
        self.next_draw_minute = self._schedule_draw(self._next_draw_index, now_minute=plant.minute)

    def _lab_measurement(self, truth: dict[str, float]) -> dict[str, float]:
        noise = self._simulation.noise.lab
        relative = {
            "vcd_1e6_per_ml": noise.vcd_relative,
            "glucose_g_per_l": noise.glucose_relative,
            "lactate_g_per_l": noise.lactate_relative,
            "glutamine_mm": noise.glutamine_relative,
            "ammonia_mm": noise.ammonia_relative,
            "titer_g_per_l": noise.titer_relative,
            "osmolality_mosm_per_kg": noise.osmolality_relative,
        }
        draws = self._lab_rng.standard_normal(len(LAB_FIELDS))
        measured: dict[str, float] = {}
        for draw, name in zip(draws, LAB_FIELDS, strict=True):
            value = float(truth[name])
            if name == "viability_pct":
                measured[name] = float(min(100.0, max(0.0, value + noise.viability_pct * draw)))
            else:
                # An assay never reports a negative concentration; it reports zero.
                measured[name] = float(max(0.0, value * (1.0 + relative[name] * draw)))
        return measured
