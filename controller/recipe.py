"""The platform recipe: the fixed feeding, temperature and harvest schedule plants run today.

The simulated PLC runs it locally when remote control is off or its watchdog
has tripped; the runtime falls back to it after repeated solver failures and
when the monitor stands the NMPC down (its temperature shift then a ramp at the
setpoint rate limit centred on the shift time: the step's degree-hours in moves
the runtime may write); every benchmark compares against it.

Glucose: after each lab result the glucose feed is re-set so that, at the
consumption seen between the last two samples, glucose returns to the target
over the correction horizon (the usual bolus arithmetic of a process engineer,
spread over a day). The glucose the nutrient feed brings is counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import astuple, dataclass
from typing import Any

import structlog

from controller.config import EquipmentLimits, RecipeConfig
from controller.types import LabResult, Setpoints
from plant_models.parameters import MediaComposition

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class _GlucoseObservation:
    taken_at_h: float
    glucose_g_per_l: float
    volume_l: float
    glucose_delivered_g: float


class PlatformRecipe:
    """Stateful only in what it has learned from lab results; time-based otherwise."""

    def __init__(
        self,
        recipe: RecipeConfig,
        media: MediaComposition,
        equipment: EquipmentLimits,
        initial_volume_l: float,
        *,
        temperature_rate_degc_per_h: float | None = None,
        cycle_h: float = 1.0,
    ) -> None:
        """``temperature_rate_degc_per_h``: a controller's setpoint rate limit. The temperature shift is then a ramp at that rate
        centred on the shift time, each cycle (``cycle_h``) given the ramp's value at its middle: the step's degree-hours, in moves
        the rate limit lets through (:meth:`~controller.config.RecipeConfig.temperature_ramped_at`). None: the step, as a PLC's
        own recipe makes it."""
        if temperature_rate_degc_per_h is not None and not (math.isfinite(temperature_rate_degc_per_h) and temperature_rate_degc_per_h > 0.0):
            raise ValueError(f"temperature_rate_degc_per_h must be None (the step) or finite and above 0, got {temperature_rate_degc_per_h}")
        if not (math.isfinite(cycle_h) and cycle_h > 0.0):
            raise ValueError(f"cycle_h must be finite and above 0, got {cycle_h}")
        self._recipe = recipe
        self._temperature_rate = temperature_rate_degc_per_h
        self._cycle_h = cycle_h
        self._media = media
        self._equipment = equipment
        self._initial_volume_l = initial_volume_l
        self._feed_rate_lph = recipe.feed_fraction_of_initial_volume_per_day * initial_volume_l / 24.0
        self._glucose_rate_lph = 0.0
        self._last_glucose: _GlucoseObservation | None = None
        self._consumption_seen = False
        self._low_viability_seen = False

    @property
    def glucose_rate_lph(self) -> float:
        return self._glucose_rate_lph

    @property
    def glucose_consumption_seen(self) -> bool:
        """Whether :attr:`glucose_rate_lph` rests on a consumption measured between two lab results, not on a deficit alone
        (kept across a restart with :meth:`glucose_state`)."""
        return self._consumption_seen

    def feed_rate_lph(self, process_time_h: float) -> float:
        return self._feed_rate_lph if process_time_h >= self._recipe.feed_start_h else 0.0

    def temperature_degc(self, process_time_h: float) -> float:
        """The recipe's temperature setpoint for the cycle from ``process_time_h``: the initial one, the shifted one from the shift on
        (with a rate limit, the ramp between them centred on the shift)."""
        if self._temperature_rate is None:
            return self._recipe.temperature_at(process_time_h)
        return self._recipe.temperature_ramped_at(process_time_h + 0.5 * self._cycle_h, self._temperature_rate)

    def on_lab_result(self, result: LabResult, *, volume_l: float, glucose_delivered_g: float) -> None:
        """Take a newly published result set.

        ``volume_l`` and ``glucose_delivered_g`` (nominal glucose delivered by
        both feeds since inoculation) are the values at the sample's draw time.
        """
        if result.measured("viability_pct") and result.viability_pct < self._recipe.harvest_viability_pct:
            self._low_viability_seen = True
        if not result.measured("glucose_g_per_l"):
            return
        observation = _GlucoseObservation(result.taken_at_h, result.glucose_g_per_l, volume_l, glucose_delivered_g)
        previous, self._last_glucose = self._last_glucose, observation
        consumption_g_per_h = 0.0
        if previous is not None and observation.taken_at_h > previous.taken_at_h:
            consumed_g = (
                previous.glucose_g_per_l * previous.volume_l + (observation.glucose_delivered_g - previous.glucose_delivered_g) - observation.glucose_g_per_l * observation.volume_l
            )
            consumption_g_per_h = max(0.0, consumed_g / (observation.taken_at_h - previous.taken_at_h))
            self._consumption_seen = True
        deficit_g = (self._recipe.glucose_target_g_per_l - observation.glucose_g_per_l) * volume_l
        feed_glucose_g_per_h = self.feed_rate_lph(result.taken_at_h + self._recipe.glucose_correction_horizon_h / 2.0) * self._media.nutrient_feed_glucose_g_per_l
        needed_g_per_h = consumption_g_per_h + deficit_g / self._recipe.glucose_correction_horizon_h - feed_glucose_g_per_h
        rate = max(0.0, needed_g_per_h) / self._media.glucose_feed_g_per_l
        self._glucose_rate_lph = min(rate, self._equipment.glucose_rate_max_lph)

    def glucose_state(self) -> dict[str, Any]:
        """What the recipe has learned from the lab results, for a restart (:meth:`restore_glucose_state`)."""
        last = self._last_glucose
        return {
            "last_glucose": None if last is None else list(astuple(last)),
            "glucose_rate_lph": self._glucose_rate_lph,
            "consumption_seen": self._consumption_seen,
            "low_viability_seen": self._low_viability_seen,
        }

    def restore_glucose_state(self, data: Mapping[str, Any]) -> None:
        """Take up :meth:`glucose_state` saved before a restart. A damaged entry (not finite numbers, a negative rate) is no
        evidence: the recipe starts afresh, as it did before restarts kept it (its glucose feed 0 until the next result, the
        consumption measured again by the next two)."""
        try:
            last = data.get("last_glucose")
            observation = None if last is None else _GlucoseObservation(*(float(value) for value in last))
            rate = float(data.get("glucose_rate_lph", 0.0))
            seen, low = data.get("consumption_seen", False), data.get("low_viability_seen", False)
            numbers = [rate] if observation is None else [rate, *astuple(observation)]
            if not (all(math.isfinite(value) for value in numbers) and rate >= 0.0 and isinstance(seen, bool) and isinstance(low, bool)):
                raise ValueError("not finite, negative or not a flag")
        except (TypeError, ValueError) as error:
            log.warning("recipe_restore_ignored", saved=repr(dict(data))[:200], error=str(error))
            return
        self._last_glucose, self._glucose_rate_lph = observation, min(rate, self._equipment.glucose_rate_max_lph)
        self._consumption_seen, self._low_viability_seen = seen and observation is not None, low

    def harvest_due(self, process_time_h: float) -> bool:
        return process_time_h >= self._recipe.harvest_h or self._low_viability_seen

    def glucose_room_l(self, process_time_h: float) -> float:
        """The volume kept free for the glucose feed at ``process_time_h``: ``glucose_room_per_day`` × the initial volume × the days left to the harvest."""
        return self._recipe.glucose_room_per_day * self._initial_volume_l * max(0.0, self._recipe.harvest_h - process_time_h) / 24.0

    def nutrient_stop_l(self, process_time_h: float) -> float:
        """The volume at which the recipe stops its nutrient feed at ``process_time_h``: the high-level feed stop less :meth:`glucose_room_l`.

        The trust region holds every plan below it too (controller.trust): should the NMPC stand down, the recipe finds the room its
        glucose feed needs to the harvest.
        """
        return self._feed_stop_l - self.glucose_room_l(process_time_h)

    @property
    def _feed_stop_l(self) -> float:
        """The PLC's high-level feed stop: ``feed_stop_below_max_l`` below the maximum working volume (``controller.safety.volume_limit_l``)."""
        return self._equipment.max_working_volume_l - self._recipe.feed_stop_below_max_l

    def setpoints(self, process_time_h: float, *, volume_l: float | None = None) -> Setpoints:
        """The recipe's setpoints now; with a known ``volume_l``, the feeds stop near the maximum working volume.

        The high-level feed stop is what a PLC's own recipe does: a reactor
        that a controller filled close to its maximum is not overfilled by the
        schedule when the operator takes local control. The nutrient feed
        stops first, :meth:`glucose_room_l` before the feed stop, so that the
        glucose feed can keep the culture fed to the harvest (a reactor filled
        with nutrient feed starves). An unknown volume (None or NaN) leaves the
        schedule as it is.
        """
        if not math.isfinite(process_time_h):
            raise ValueError(f"process time must be finite, got {process_time_h}")
        volume = math.nan if volume_l is None else volume_l  # comparisons with NaN are false: an unknown volume stops nothing
        full = volume >= self._feed_stop_l
        nutrient_full = volume >= self.nutrient_stop_l(process_time_h)
        return Setpoints(
            feed_rate_lph=0.0 if nutrient_full else self.feed_rate_lph(process_time_h),
            glucose_rate_lph=0.0 if full else self._glucose_rate_lph,
            temperature_degc=self.temperature_degc(process_time_h),
            harvest=self.harvest_due(process_time_h),
        )
