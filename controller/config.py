"""Configuration of a batch: inoculation record, media, equipment, recipe, limits, economics.

Shared by the runtime (its safety filter, fallback recipe and KPIs) and the
simulator (its PLC logic and plant). Loaded from ``configs/batch/*.yaml``.

A batch file is a **process template** (:class:`BatchTemplate`): what every
batch of one process in one reactor shares. Without ``batch_id`` the runtime
follows the PLC's ``Status.BatchId`` from batch to batch; with one it is
pinned to that batch. One batch's config (:class:`BatchConfig`) is the
template with the batch's id (:meth:`BatchTemplate.for_batch`): what the
history records for each run, and what the simulator inoculates.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Self

import numpy as np
from pydantic import Field, field_validator, model_validator

from plant_models.cho import GLUCOSE_G_PER_MOL, LACTATE_G_PER_MOL, STATE_INDEX, STATES
from plant_models.config_loading import FieldError, FrozenConfig, load_yaml_model
from plant_models.parameters import MediaComposition

HOURS_PER_YEAR = 24.0 * 365.0
MINUTES_PER_DAY = 24 * 60


class InoculationRecord(FrozenConfig):
    """What the batch record says about the culture at inoculation (process time 0)."""

    viable_cell_density_1e6_per_ml: float = Field(gt=0.0, le=10.0, description="seeding density [1e6 cells/mL]")
    viability_pct: float = Field(gt=0.0, le=100.0, description="seeding viability [%]")
    volume_l: float = Field(gt=0.0, description="working volume after inoculation [L]")
    glucose_g_per_l: float = Field(ge=0.0, le=30.0, description="glucose after inoculation [g/L]")
    glutamine_mm: float = Field(ge=0.0, le=50.0, description="glutamine after inoculation [mM]")
    lactate_g_per_l: float = Field(ge=0.0, le=10.0, description="lactate after inoculation [g/L]")
    ammonia_mm: float = Field(ge=0.0, le=30.0, description="ammonia after inoculation [mM]")
    osmolality_mosm_per_kg: float = Field(ge=200.0, le=600.0, description="medium osmolality after inoculation [mOsm/kg]")
    titer_g_per_l: float = Field(default=0.0, ge=0.0, le=1.0, description="product carried over from the seed train [g/L]")
    temperature_degc: float = Field(ge=30.0, le=40.0, description="culture temperature at inoculation [°C]")

    @model_validator(mode="after")
    def _osmolality_covers_metabolites(self) -> InoculationRecord:
        if self.other_osmolytes_mosm_per_kg < 0.0:
            raise FieldError(
                "osmolality_mosm_per_kg",
                self.osmolality_mosm_per_kg,
                f"must be at least what glucose, lactate, glutamine and ammonia alone contribute ({self.osmolality_mosm_per_kg - self.other_osmolytes_mosm_per_kg:.0f} mOsm/kg)",
            )
        return self

    @property
    def other_osmolytes_mosm_per_kg(self) -> float:
        return (
            self.osmolality_mosm_per_kg
            - self.glucose_g_per_l * 1000.0 / GLUCOSE_G_PER_MOL
            - self.lactate_g_per_l * 1000.0 / LACTATE_G_PER_MOL
            - self.glutamine_mm
            - self.ammonia_mm
        )

    def initial_state(self) -> np.ndarray:
        """The model state vector at inoculation."""
        x = np.zeros(len(STATES))
        viable = self.viable_cell_density_1e6_per_ml
        x[STATE_INDEX["viable_cells"]] = viable
        x[STATE_INDEX["dead_cells"]] = viable * (100.0 - self.viability_pct) / self.viability_pct
        x[STATE_INDEX["glucose"]] = self.glucose_g_per_l
        x[STATE_INDEX["glutamine"]] = self.glutamine_mm
        x[STATE_INDEX["lactate"]] = self.lactate_g_per_l
        x[STATE_INDEX["ammonia"]] = self.ammonia_mm
        x[STATE_INDEX["other_osmolytes"]] = self.other_osmolytes_mosm_per_kg
        x[STATE_INDEX["titer"]] = self.titer_g_per_l
        x[STATE_INDEX["galactosylated_titer"]] = 0.0
        x[STATE_INDEX["volume"]] = self.volume_l
        x[STATE_INDEX["temperature"]] = self.temperature_degc
        x[STATE_INDEX["base_added"]] = 0.0
        return x


class EquipmentLimits(FrozenConfig):
    """The equipment's ranges: what the PLC accepts and what the reactor holds."""

    max_working_volume_l: float = Field(gt=0.0, description="maximum working volume [L]")
    feed_rate_max_lph: float = Field(gt=0.0, description="nutrient feed pump range upper end [L/h]")
    glucose_rate_max_lph: float = Field(gt=0.0, description="glucose feed pump range upper end [L/h]")
    temperature_min_degc: float = Field(ge=25.0, le=40.0, description="lowest temperature setpoint [°C]")
    temperature_max_degc: float = Field(ge=25.0, le=40.0, description="highest temperature setpoint [°C]")

    @model_validator(mode="after")
    def _ordered(self) -> EquipmentLimits:
        if self.temperature_min_degc >= self.temperature_max_degc:
            raise FieldError("temperature_min_degc", self.temperature_min_degc, f"must be below temperature_max_degc ({self.temperature_max_degc})")
        return self


class RecipeConfig(FrozenConfig):
    """The fixed platform recipe the PLC runs locally and every benchmark compares against."""

    feed_fraction_of_initial_volume_per_day: float = Field(ge=0.0, le=0.2, description="nutrient feed per day as a fraction of the initial volume [-/day]")
    feed_start_h: float = Field(ge=0.0, description="process time the nutrient feed starts [h]")
    glucose_target_g_per_l: float = Field(gt=0.0, le=15.0, description="glucose the glucose feed aims for [g/L]")
    glucose_correction_horizon_h: float = Field(gt=0.0, le=72.0, description="time over which a glucose deficit is made up [h]")
    temperature_initial_degc: float = Field(ge=30.0, le=40.0, description="culture temperature before the shift [°C]")
    temperature_shifted_degc: float = Field(ge=30.0, le=40.0, description="culture temperature after the shift [°C]")
    temperature_shift_h: float = Field(ge=0.0, description="process time of the temperature shift [h]")
    harvest_h: float = Field(gt=0.0, description="process time of the scheduled harvest [h]")
    harvest_viability_pct: float = Field(ge=0.0, le=100.0, description="harvest early once a lab viability falls below this [%]")
    feed_stop_below_max_l: float = Field(default=5.0, ge=0.0, description="high-level feed stop: both feeds stop once the working volume is within this of the maximum [L]")
    glucose_room_per_day: float = Field(
        default=0.006,
        ge=0.0,
        le=0.1,
        description=(
            "room kept for the glucose feed: the nutrient feed stops once the volume is within this much per day left to the harvest, times the initial volume,"
            " of the feed stop (the glucose feed goes on to the feed stop itself); an NMPC's plan keeps the same room [-/day]"
        ),
    )

    def temperature_at(self, process_time_h: float) -> float:
        """The temperature setpoint at ``process_time_h``: the initial one, the shifted one from the shift on."""
        return self.temperature_initial_degc if process_time_h < self.temperature_shift_h else self.temperature_shifted_degc

    def temperature_ramped_at(self, process_time_h: float, rate_degc_per_h: float) -> float:
        """The shift as a setpoint limited to ``rate_degc_per_h`` can make it: a ramp centred on the shift time.

        The ramp has the step's degree-hours (as much warmer before the shift time as colder after it), so a culture whose
        temperature follows its setpoint with a lag sees the shift when the step would have made it. A ramp that ends at the
        shift time cools it hours early; one that starts there, hours late. Measured on the plant ``inhibitor`` with the band
        pinned to the recipe (docs/trust-region.md): the ramp that ended at the shift made 446.9 g/day, this one 448.7, the
        recipe's step 450.7. A shift closer to inoculation than half the ramp starts its ramp at 0 h (warmer than the step
        after the shift: the degree-hours before 0 h cannot be had); a shift at 0 h is the shifted temperature, as the step.
        """
        if not math.isfinite(process_time_h):
            raise ValueError(f"process time must be finite, got {process_time_h}")
        if not (math.isfinite(rate_degc_per_h) and rate_degc_per_h > 0.0):
            raise ValueError(f"the temperature rate limit must be finite and above 0, got {rate_degc_per_h}")
        delta = self.temperature_shifted_degc - self.temperature_initial_degc
        half_h = abs(delta) / (2.0 * rate_degc_per_h)
        if half_h == 0.0 or self.temperature_shift_h <= 0.0:
            return self.temperature_at(process_time_h)
        start_h = max(0.0, self.temperature_shift_h - half_h)
        done = min(1.0, max(0.0, (process_time_h - start_h) / (2.0 * half_h)))
        return self.temperature_initial_degc + done * delta


class ProcessLimits(FrozenConfig):
    """Limits the KPIs count violations of and the controller must respect."""

    glucose_min_g_per_l: float = Field(ge=0.0, description="glucose below this is starvation [g/L]")
    osmolality_max_mosm_per_kg: float = Field(gt=200.0, description="osmolality above this harms the product [mOsm/kg]")
    latest_harvest_h: float = Field(gt=0.0, le=HOURS_PER_YEAR, description="the batch ends here at the latest [h]")


class Economics(FrozenConfig):
    turnaround_days: float = Field(ge=0.0, le=30.0, description="days the reactor is occupied between batches (clean, sterilise, inoculate) [day]")


BATCH_ID_MAX_CHARS = 16
"""``Status.BatchId`` is 16 ASCII characters at most (the reference PLC's Modbus registers 70-77)."""
ANY_BATCH_ID = "(any batch)"
"""The id :meth:`BatchTemplate.for_batch` gives a template that names no batch, for what depends on no batch (the MPC's problem)."""


def batch_id_problem(batch_id: str) -> str | None:
    """Why ``batch_id`` cannot be a batch's id (empty, too long, not printable ASCII); None when it can."""
    if not batch_id.strip():
        return "is empty"
    if len(batch_id) > BATCH_ID_MAX_CHARS:
        return f"is {len(batch_id)} characters long, more than the {BATCH_ID_MAX_CHARS} the PLC stores"
    if not batch_id.isascii():
        return f"must be ASCII (the PLC stores it as {BATCH_ID_MAX_CHARS} ASCII characters)"
    if batch_id != batch_id.strip():
        return "must not begin or end with a space (it names files, logs and audit records, and the PLC's would not match)"
    if not batch_id.isprintable():
        return "must be printable ASCII: no control characters such as a line break or a tab (it names files, logs and audit records)"
    return None


class BatchTemplate(FrozenConfig):
    """Everything about a process's batches that is not cell kinetics; ``batch_id`` pins it to one batch."""

    batch_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=BATCH_ID_MAX_CHARS,
        description="pin the runtime to this batch: Status.BatchId must be it, and the runtime ends at its harvest; "
        "absent: the runtime follows the PLC's Status.BatchId from batch to batch (16 ASCII characters at most)",
    )
    cycle_period_h: float = Field(gt=0.0, le=24.0, description="control cycle period, equal to the PLC's [h]")
    inoculation: InoculationRecord
    media: MediaComposition
    equipment: EquipmentLimits
    recipe: RecipeConfig
    limits: ProcessLimits
    economics: Economics

    @field_validator("cycle_period_h")
    @classmethod
    def _whole_minutes_dividing_a_day(cls, period_h: float) -> float:
        minutes = period_h * 60.0
        if minutes < 1.0 - 1e-9:
            raise ValueError("must be at least one minute (0.0167 h): the PLC and the simulated plant count whole minutes")
        if abs(minutes - round(minutes)) > 1e-6:
            raise ValueError(f"must be a whole number of minutes (this is {minutes:.4g} min)")
        if MINUTES_PER_DAY % round(minutes):
            raise ValueError(
                f"must be a period that divides a day into whole cycles (24 h / {period_h:g} h = {24.0 / period_h:.4g}); for example 0.25, 0.5, 1, 2, 3, 4, 6, 8, 12 or 24 h"
            )
        return period_h

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        inoculation, equipment, recipe, limits = self.inoculation, self.equipment, self.recipe, self.limits
        problem = batch_id_problem(self.batch_id) if self.batch_id is not None else None
        if problem is not None:
            raise FieldError("batch_id", self.batch_id, problem)
        if inoculation.volume_l >= equipment.max_working_volume_l:
            raise FieldError("inoculation.volume_l", inoculation.volume_l, f"must be below equipment.max_working_volume_l ({equipment.max_working_volume_l})")
        if limits.osmolality_max_mosm_per_kg <= inoculation.osmolality_mosm_per_kg:
            raise FieldError(
                "limits.osmolality_max_mosm_per_kg",
                limits.osmolality_max_mosm_per_kg,
                f"must be above inoculation.osmolality_mosm_per_kg ({inoculation.osmolality_mosm_per_kg}): the batch would start beyond its limit",
            )
        if limits.latest_harvest_h < self.cycle_period_h:
            raise FieldError("limits.latest_harvest_h", limits.latest_harvest_h, f"must be at least one cycle, cycle_period_h ({self.cycle_period_h})")
        temperature_range = f"[{equipment.temperature_min_degc}, {equipment.temperature_max_degc}]"
        for name in ("temperature_initial_degc", "temperature_shifted_degc"):
            value = getattr(recipe, name)
            if not equipment.temperature_min_degc <= value <= equipment.temperature_max_degc:
                raise FieldError(
                    f"recipe.{name}", value, f"must be within the equipment's setpoint range {temperature_range} (equipment.temperature_min_degc, equipment.temperature_max_degc)"
                )
        feed_rate_lph = recipe.feed_fraction_of_initial_volume_per_day * inoculation.volume_l / 24.0
        if feed_rate_lph > equipment.feed_rate_max_lph:
            raise FieldError(
                "recipe.feed_fraction_of_initial_volume_per_day",
                recipe.feed_fraction_of_initial_volume_per_day,
                f"asks for {feed_rate_lph:.1f} L/h of nutrient feed (this fraction of inoculation.volume_l, {inoculation.volume_l} L, a day), above equipment.feed_rate_max_lph ({equipment.feed_rate_max_lph} L/h)",
            )
        if recipe.harvest_h > limits.latest_harvest_h:
            raise FieldError("recipe.harvest_h", recipe.harvest_h, f"must not be after limits.latest_harvest_h ({limits.latest_harvest_h})")
        if recipe.glucose_target_g_per_l <= limits.glucose_min_g_per_l:
            raise FieldError(
                "recipe.glucose_target_g_per_l", recipe.glucose_target_g_per_l, f"must be above limits.glucose_min_g_per_l ({limits.glucose_min_g_per_l}), the starvation limit"
            )
        if recipe.glucose_target_g_per_l >= self.media.glucose_feed_g_per_l:
            raise FieldError(
                "recipe.glucose_target_g_per_l",
                recipe.glucose_target_g_per_l,
                f"must be below media.glucose_feed_g_per_l ({self.media.glucose_feed_g_per_l}), what the glucose feed carries",
            )
        headroom_l = equipment.max_working_volume_l - inoculation.volume_l
        if recipe.feed_stop_below_max_l >= headroom_l:
            raise FieldError(
                "recipe.feed_stop_below_max_l",
                recipe.feed_stop_below_max_l,
                f"must be below the room left after inoculation ({headroom_l:g} L = equipment.max_working_volume_l - inoculation.volume_l), or the feeds never run",
            )
        return self

    @property
    def pinned(self) -> bool:
        """Whether this template names its batch (the runtime then runs that batch only)."""
        return self.batch_id is not None

    def for_batch(self, batch_id: str | None = None) -> BatchConfig:
        """This template as the config of batch ``batch_id`` (default: the pinned one, else :data:`ANY_BATCH_ID`).

        Raises :class:`ValueError` when ``batch_id`` cannot be a batch's id (:func:`batch_id_problem`).
        """
        chosen = batch_id if batch_id is not None else self.batch_id or ANY_BATCH_ID
        problem = batch_id_problem(chosen)
        if problem is not None:
            raise ValueError(f"batch id {chosen!r} {problem}")
        if isinstance(self, BatchConfig) and self.batch_id == chosen:
            return self
        return BatchConfig.model_validate({**self.model_dump(), "batch_id": chosen})

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        return load_yaml_model(path, cls)


class BatchConfig(BatchTemplate):
    """One batch: a template with the batch's id."""

    batch_id: str = Field(min_length=1, max_length=BATCH_ID_MAX_CHARS, description="batch identifier (16 ASCII characters at most)")
