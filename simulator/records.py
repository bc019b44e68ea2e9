"""Batch records of simulated batches: a plant's "historical batches", as a historian and a LIMS would have recorded them.

:func:`record_batch` runs a batch under the PLC's local recipe, exactly as
:func:`simulator.batch.run_recipe_batch` does, and scans the simulated PLC at
every cycle boundary as a historian would: the ``PV.*`` tags with the status
the PLC reports, the ``SP.*`` tags (the setpoints applied), and every lab
result with its draw time and the time it was published on the ``Sample.*``
tags. :func:`development_batches` makes the batches a process-development
group would have run before a controller: other temperature shifts, feed
rates, feed starts and glucose targets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from controller.config import BatchConfig, RecipeConfig
from controller.ports import ScannedValue
from controller.records import ONLINE_FIELDS, BatchRecord, LabSample, OnlineSeries, SetpointSeries
from controller.types import LAB_FIELDS, PHASE_RUNNING
from interfaces.batch_records import ONLINE_TAGS, SETPOINT_TAGS
from plant_models.cho import CultureModel
from plant_models.config_loading import validate_model
from simulator.batch import build_simulated_plc
from simulator.config import LoadedSimulation
from simulator.plc import SimulatedPlc


class Historian:
    """What a historian keeps of a PLC's scans: the online tags with their status and the setpoints, on change."""

    def __init__(self) -> None:
        self.time_h: list[float] = []
        self.online: dict[str, list[float]] = {name: [] for name in ONLINE_FIELDS}
        self.setpoint_time_h: list[float] = []
        self.setpoints: list[tuple[float, ...]] = []
        self.first_seen_h: dict[int, float] = {}
        """``Sample.Seq`` → the first scan that showed it."""

    def scan(self, plc: SimulatedPlc, readings: Mapping[str, ScannedValue] | None = None) -> None:
        """Keep one scan of ``plc``: ``readings`` when the caller has just taken its snapshot, else a snapshot of its own."""
        readings = plc.snapshot() if readings is None else readings
        now_h = plc.process_time_h
        self.time_h.append(now_h)
        for tag, name in ONLINE_TAGS.items():
            reading = readings[tag]
            value = float(reading.value)
            self.online[name].append(value if reading.good and math.isfinite(value) else math.nan)
        applied = tuple(float(readings[tag].value) for tag in SETPOINT_TAGS)
        if not self.setpoints or applied != self.setpoints[-1]:
            self.setpoint_time_h.append(now_h)
            self.setpoints.append(applied)
        seq = int(readings["Sample.Seq"].value)
        self.first_seen_h.setdefault(seq, now_h)

    def record(self, loaded: LoadedSimulation, plc: SimulatedPlc) -> BatchRecord:
        """The batch record of what was scanned: it ends at the last scan; lab results are the ones published by then."""
        end_h = self.time_h[-1]
        published_at_h: list[float] | None = getattr(plc, "published_at_h", None)
        lab = []
        for i, result in enumerate(plc.published):
            if published_at_h is not None:
                result_h: float | None = published_at_h[i]
            else:  # what a historian sees: the first scan that shows this Sample.Seq or a later one
                result_h = min((t for seq, t in self.first_seen_h.items() if seq >= result.seq), default=None)
            if result_h is None or result.taken_at_h > end_h:
                continue
            lab.append(LabSample(draw_h=result.taken_at_h, result_h=result_h, values={name: float(getattr(result, name)) for name in LAB_FIELDS}))
        return BatchRecord(
            batch_id=loaded.batch.batch_id,
            batch=loaded.batch,
            online=OnlineSeries(time_h=np.array(self.time_h), values={name: np.array(values) for name, values in self.online.items()}),
            lab=tuple(lab),
            setpoints=SetpointSeries(time_h=np.array(self.setpoint_time_h), values=np.array(self.setpoints)),
            end_h=end_h,
        )


def record_batch(loaded: LoadedSimulation, *, model: CultureModel | None = None, until_h: float | None = None) -> BatchRecord:
    """One batch under the platform recipe of ``loaded.batch``, as its records would show it.

    The PLC runs its local recipe from inoculation to harvest (or to
    ``until_h``: a shorter record for tests), advanced cycle boundary by cycle
    boundary as in :func:`~simulator.batch.run_recipe_batch` (the same plant
    trajectory) and scanned at each boundary while the culture runs: the
    record ends at the last scan before harvest (``end_h``). Online values
    with a Bad status (a failed probe, a fault of the simulation config) are
    NaN. Setpoints are recorded when a scan shows them changed: a change the
    recipe makes between two boundaries appears at the next one, as in a
    historian scanning at the cycle period. Lab results are the ones published
    by then, with the time they were published (``result_h``).
    """
    plc, _ = build_simulated_plc(loaded, model)
    plc.set_operator_remote(False)
    historian = Historian()
    historian.scan(plc)
    while plc.phase == PHASE_RUNNING and (until_h is None or plc.process_time_h < until_h - 1e-9):
        plc.advance_to(plc.next_cycle_boundary_h())
        if plc.phase != PHASE_RUNNING:
            break
        historian.scan(plc)
    return historian.record(loaded, plc)


def development_recipes(batch: BatchConfig, n: int, rng: np.random.Generator) -> list[BatchConfig]:
    """``n`` batch files with recipes a process-development group would try around ``batch``'s, each validated, no two alike.

    Varied: the temperature shift (time 2–7 days, shifted temperature from
    31 °C to the initial one, within the equipment's range), the nutrient feed
    (0.6–1.4 × the platform's fraction, within the pump's range; start 2–4
    days), and the glucose target (2–7 g/L, above the starvation limit).
    Rounded as a plan would be written: whole hours, 0.5 °C, 0.5 g/L, 0.005/day.
    """
    recipe, equipment = batch.recipe, batch.equipment
    feed_max = equipment.feed_rate_max_lph * 24.0 / batch.inoculation.volume_l
    glucose_low = max(2.0, batch.limits.glucose_min_g_per_l + 1.0)
    glucose_high = min(7.0, batch.media.glucose_feed_g_per_l / 2.0)
    temperature_low = max(31.0, equipment.temperature_min_degc)
    initial = min(recipe.temperature_initial_degc, equipment.temperature_max_degc)
    batches: list[BatchConfig] = []
    seen: set[tuple[float, ...]] = set()
    while len(batches) < n:
        changes = {
            "temperature_shift_h": float(round(rng.uniform(48.0, min(168.0, recipe.harvest_h - 24.0)))),
            "temperature_shifted_degc": float(np.clip(round(rng.uniform(temperature_low, initial) * 2.0) / 2.0, temperature_low, initial)),
            "feed_fraction_of_initial_volume_per_day": min(round(round(recipe.feed_fraction_of_initial_volume_per_day * rng.uniform(0.6, 1.4) / 0.005) * 0.005, 4), feed_max),
            "feed_start_h": float(round(rng.uniform(48.0, 96.0))),
            "glucose_target_g_per_l": float(round(rng.uniform(glucose_low, glucose_high) * 2.0) / 2.0),
        }
        key = tuple(changes.values())
        if key in seen:
            continue
        seen.add(key)
        varied = validate_model(RecipeConfig, recipe.model_copy(update=changes).model_dump(), source=f"development recipe {len(batches) + 1}")
        data = batch.model_dump()
        data["recipe"] = varied.model_dump()
        batches.append(validate_model(BatchConfig, data, source=f"development batch {len(batches) + 1}"))
    return batches


def development_batches(
    loaded: LoadedSimulation, n: int, rng_seed: int, *, id_prefix: str = "PD", model: CultureModel | None = None, until_h: float | None = None
) -> list[BatchRecord]:
    """``n`` process-development batches on the plant of ``loaded``, each with its own recipe (:func:`development_recipes`) and seed.

    Batch ids are ``<id_prefix>-<seed>-<i>``-like and unique within the call;
    each batch's simulation seed differs (batch-to-batch variation of the
    truth, sampling times and noise, as far as ``loaded``'s simulation config
    draws them). ``until_h`` shortens every batch (tests).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = np.random.default_rng(rng_seed)
    recipes = development_recipes(loaded.batch, n, rng)
    seeds = [int(seed) for seed in np.random.SeedSequence(rng_seed).generate_state(n)]
    records = []
    for i, (batch, seed) in enumerate(zip(recipes, seeds, strict=True), start=1):
        batch_id = f"{id_prefix}{rng_seed % 1000:03d}-{i:02d}"
        batch = validate_model(BatchConfig, {**batch.model_dump(), "batch_id": batch_id}, source=f"development batch {batch_id}")
        simulation = loaded.simulation.model_copy(update={"seed": seed})
        records.append(record_batch(loaded.model_copy(update={"batch": batch, "simulation": simulation}), model=model, until_h=until_h))
    return records
