"""The trust region the NMPC plans in, and the performance monitor that widens, narrows or withdraws it.

A model is trusted only where it has been checked. The region is one
mechanism with two sources of *reach* (how far a plan may go from the
platform recipe's own trajectory):

- **calibration envelope**: a model calibrated on batch records carries the
  operating envelope those records covered, per process phase (temperature,
  nutrient feed per volume, glucose level; :func:`controller.calibration.operating_envelope`).
  The reach is that envelope plus a configured margin, joined with the
  recipe band where they overlap (a calibrated model may go wherever an
  uncalibrated one may), and the region starts at full width: the data
  checked the model there.
- **recipe band**: a model with no envelope (the nominal kinetics) is trusted
  only near what the plant has always run: the recipe's temperature, its
  feed per initial volume (and no feed where the recipe feeds none) and its
  glucose target (the plan's glucose at most the target, unless
  ``glucose_reach_above_g_per_l`` is set), within configured reaches. The
  region starts at ``initial_width`` of those reaches (0.3 by default: an
  uncalibrated model is unsure), widens with each lab result that confirms
  the model, and goes beyond them only as the batch's own lab results
  confirm the model's predictions days ahead (the earned reach, up to
  ``max_reach_scale`` times). A calibrated model whose envelope was withheld
  (not shown to rank its records' outcomes right) plans in this band too,
  held at its start: no result widens it or earns reach (:attr:`TrustRegion.widens`).

The region's *width* ``w`` ∈ [0, 1] scales the reach: a bound is
``recipe + w · (edge − recipe)``. At ``w = 0`` the plan follows the recipe's
temperature and feed and keeps glucose at its target; the harvest moves no
further than ``w · harvest_reach_h`` from the recipe's. The nutrient feed's reach takes its own width, never more
than ``w``: only results of the fed culture widen it (:attr:`TrustRegion.feed_width`). The recipe's
temperature is the controller's recipe's (:class:`~controller.recipe.PlatformRecipe`):
its shift as a ramp the NMPC's rate limit can follow, centred on the shift time.

The performance monitor holds each new lab result (VCD, titer, glucose)
against what the plan in force ``lead_h`` before its draw predicted for it.
Within tolerance on every measured field it *confirms* the model and widens
the region by ``widen_step`` (unless the band is held); beyond tolerance on any field, or with the
mean error of a field over the last ``bias_window`` results beyond
``bias_threshold`` tolerances (a bias, each result within tolerance; of VCD
and titer, only the plant giving less than the model said), it
*misses*, and the region shrinks by ``shrink_factor``. After ``misses_to_recipe``
misses in a row the NMPC stands down and the platform recipe runs until an
operator re-enables it (:meth:`TrustRegion.reenable`). Each step is alarmed
(:meth:`TrustRegion.alarms`) and so audited by the runtime.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeGuard

import numpy as np
import structlog
from pydantic import Field, model_validator

from controller.config import BatchConfig
from controller.mpc import PlanBounds
from controller.recipe import PlatformRecipe
from controller.types import LabResult, Setpoints
from plant_models.cho import STATE_INDEX
from plant_models.config_loading import FrozenConfig
from plant_models.parameters import PhaseEnvelope

log = structlog.get_logger(__name__)

MONITORED: tuple[tuple[str, str], ...] = (("vcd_1e6_per_ml", "viable_cells"), ("titer_g_per_l", "titer"), ("glucose_g_per_l", "glucose"))
"""Lab field → model state the monitor compares."""

BIAS_BELOW_ONLY = frozenset({"vcd_1e6_per_ml", "titer_g_per_l"})
"""The lab fields whose bias counts only below the predictions with :attr:`TrustRegionConfig.bias_below_only` (glucose counts both ways)."""

MAX_GLUCOSE_SHORTFALL_G_PER_L = 20.0
"""A saved glucose shortfall is clipped here, and a damaged one taken as this (the safe side): more than any glucose window, so the floor becomes the target."""


class Tolerance(FrozenConfig):
    relative: float = Field(gt=0.0, le=5.0, description="miss beyond this fraction of the measured value [-]")
    floor: float = Field(ge=0.0, description="and beyond this absolute difference (for small values) [field unit]")

    def limit(self, measured: float) -> float:
        return max(self.relative * abs(measured), self.floor)


class TrustRegionConfig(FrozenConfig):
    """Where the NMPC may plan, and how lab results move that."""

    enabled: bool = Field(default=True, description="plan inside the trust region; off: the equipment's range and the configured glucose window")
    temperature_reach_degc: float = Field(default=1.5, ge=0.0, le=10.0, description="recipe band: farthest from the recipe's temperature at full width [°C]")
    feed_reach_per_day: float = Field(
        default=0.02, ge=0.0, le=0.2, description="recipe band: farthest from the recipe's nutrient feed at full width, as a fraction of the initial volume per day [-/day]"
    )
    feed_lead_h: float = Field(
        default=0.0,
        ge=0.0,
        le=240.0,
        description=(
            "recipe band: how long before the recipe's feed start the NMPC may start feeding; earlier, where the recipe feeds"
            " nothing, the band holds the feed at 0 as the recipe does. 0: no feed before the recipe's. Feed cannot be taken back,"
            " and a culture fed before the recipe feeds it is not in the recipe's neighbourhood (measured on the plant `inhibitor`:"
            " 24 h lost 0.1-1.0 % more against the recipe; docs/trust-region.md) [h]"
        ),
    )
    glucose_reach_g_per_l: float = Field(default=2.5, ge=0.0, le=10.0, description="recipe band: farthest below the recipe's glucose target at full width [g/L]")
    glucose_reach_above_g_per_l: float = Field(
        default=0.0,
        ge=0.0,
        le=10.0,
        description=(
            "recipe band: farthest above the recipe's glucose target at full width [g/L]; 0: the plan holds glucose at most at the"
            " target. Glucose fed cannot be taken back, and a culture held above the recipe's level is not in its neighbourhood"
            " (overflow to lactate, osmolality). Measured: 2.5 bought nothing on the three tuning plants and lost 0.3-3.2 % on"
            " `inhibitor` (docs/trust-region.md)"
        ),
    )
    harvest_reach_h: float = Field(default=24.0, ge=0.0, le=240.0, description="farthest from the recipe's harvest at full width [h]")
    envelope_margin_degc: float = Field(default=0.5, ge=0.0, le=5.0, description="calibration envelope: temperature margin beyond what the data covered [°C]")
    envelope_margin_relative: float = Field(default=0.1, ge=0.0, le=1.0, description="calibration envelope: feed and glucose margin, as a fraction of the covered span [-]")
    initial_width: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description=(
            "recipe band: width at inoculation, widened by widen_step with each lab result that confirms the model; 1: the band's"
            " whole reach from the start. 0.3: an uncalibrated model is unsure, and on the held-out plant `inhibitor` the whole"
            " reach from the start made every batch worse than the recipe (docs/trust-region.md, 'How wide at the start') [-]"
        ),
    )
    reenable_width: float = Field(default=0.3, ge=0.0, le=1.0, description="any source: width after an engineer's re-enable, this batch's results having stood the model down [-]")
    evidence_lapse_h: float = Field(
        default=96.0,
        gt=0.0,
        le=720.0,
        description=(
            "no lab result held against the model for this long (counted from the cycle that checked the last one, or from the region's"
            " first cycle: inoculation, a take-over, a re-enable; the clock goes on across a restart): a LIMS outage, results held back,"
            " a runtime restarting too often to have a day-old plan to check. The width falls to reenable_width and the earned reach to"
            " 1, as for a model this batch has not checked, with the alarm nmpc_lab_results_overdue; the next results earn them again."
            " 96 h: a weekend without samples (Friday's result to Monday's, 72 h) is no lapse [h]"
        ),
    )
    widen_step: float = Field(
        default=0.15,
        ge=0.0,
        le=1.0,
        description="width added by a lab result that confirms the plan's prediction; the nutrient feed's own width only by one drawn lead_h after the recipe's feed start [-]",
    )
    shrink_factor: float = Field(default=0.5, ge=0.0, le=1.0, description="width kept after a lab result that misses it [-]")
    misses_to_recipe: int = Field(default=3, ge=1, le=100, description="misses in a row after which the NMPC stands down for the platform recipe")
    lead_h: float = Field(default=24.0, gt=0.0, le=240.0, description="a lab result is held against the plan in force this long before its draw [h]")
    bias_window: int = Field(default=3, ge=1, le=20, description="lab results over which the monitor looks for a bias [-]")
    bias_threshold: float = Field(
        default=0.6, gt=0.0, le=5.0, description="a mean error (in tolerances, same sign) beyond this over bias_window results is a miss, though each was within tolerance [-]"
    )
    bias_below_only: bool = Field(
        default=True,
        description=(
            "a bias of VCD or titer counts only where the plant gave less than the model said: a model that over-promises cells or"
            " product steers the batch wrong, one that under-promises them does not. Glucose counts either way (more than predicted:"
            " the plan over-feeds), and so does a single result beyond tolerance. False: a bias either way is a miss, every field [-]"
        ),
    )
    prediction_sigmas: float = Field(
        default=0.0,
        ge=0.0,
        le=10.0,
        description=(
            "the plan's own predictive spread counted into each tolerance: limit = hypot(tolerance, prediction_sigmas × predicted sd) [-]; 0 by default: the estimator"
            " widens its spread exactly where the model is wrong, and a monitor that forgives that spread keeps a wrong model in charge (docs/trust-region.md)"
        ),
    )
    long_lead_h: float = Field(
        default=72.0,
        gt=0.0,
        le=240.0,
        description=(
            "each lab result is also held against the model run this long before its draw, from the estimate then, with the inputs the plant"
            " was actually given; results that confirm it and the day-ahead plan earn reach. Also the end-game's length: a move made this"
            " close to the harvest is one no such replay checks before it (endgame_holds_what_ran) [h]"
        ),
    )
    replay_gap_h: float = Field(
        default=6.0,
        gt=0.0,
        le=24.0,
        description=(
            "a gap between cycles (a lost connection, during which the PLC ran its local recipe) up to this long is bridged in the model runs"
            " the checks replay: with the feed the flow totals show across it and the temperature read back after it; a longer one, or one"
            " without both totals, starts them again. Gaps of up to two cycles are always bridged, so a value below that changes nothing [h]"
        ),
    )
    reach_step: float = Field(default=0.25, ge=0.0, le=2.0, description="reach scale added by a lab result that confirms the plan at lead_h and at long_lead_h [-]")
    reach_reset_tolerances: float = Field(
        default=2.0,
        ge=1.0,
        le=10.0,
        description=(
            "a lab result the day-ahead check confirmed but the long_lead_h replay missed: by more than this many tolerances (any field) the"
            " reach returns to 1, by less the part earned beyond 1 is halved; a day-ahead miss always returns it to 1 [-]"
        ),
    )
    max_reach_scale: float = Field(
        default=3.0,
        ge=1.0,
        le=10.0,
        description=(
            "earned reach: the recipe band's reaches are scaled by at most this much; a calibration envelope is extended by (scale − 1) times"
            " the band's reaches beyond its margin [-]"
        ),
    )
    endgame_holds_what_ran: bool = Field(
        default=True,
        description=(
            "from long_lead_h before the recipe's harvest on, the plan's temperature and nutrient feed stay within what the batch has run"
            " so far (and the recipe's own): a move made then is one no lab result checks before the harvest"
        ),
    )
    vcd: Tolerance = Tolerance(relative=0.2, floor=0.5)
    titer: Tolerance = Tolerance(relative=0.15, floor=0.1)
    glucose: Tolerance = Tolerance(relative=0.3, floor=0.75)
    glucose_margins: float = Field(
        default=2.0,
        ge=0.0,
        le=10.0,
        description=(
            "the plan keeps glucose this many day-ahead glucose errors above the starvation limit (never above the recipe's glucose target),"
            " whatever the source; one error is the glucose tolerance's floor, or the largest shortfall (predicted − measured, against the"
            " model run with the inputs applied) of the last bias_window lab results that compared glucose so, when that is larger [-]"
        ),
    )

    @model_validator(mode="after")
    def _long_lead_is_longer(self) -> TrustRegionConfig:
        if self.evidence_lapse_h <= self.lead_h:
            raise ValueError(
                f"evidence_lapse_h ({self.evidence_lapse_h}) must be longer than lead_h ({self.lead_h}): the first lab result a plan can be held against comes lead_h after it"
            )
        if self.long_lead_h <= self.lead_h:
            raise ValueError(f"long_lead_h ({self.long_lead_h}) must be longer than lead_h ({self.lead_h}): earned reach needs predictions further ahead than the day-ahead check")
        return self

    def tolerance(self, field: str) -> Tolerance:
        return {"vcd_1e6_per_ml": self.vcd, "titer_g_per_l": self.titer, "glucose_g_per_l": self.glucose}[field]


class RegionSource(str, Enum):
    CALIBRATION_ENVELOPE = "calibration_envelope"
    RECIPE_BAND = "recipe_band"
    OFF = "off"


@dataclass(frozen=True)
class LabCheck:
    """One lab result held against the plan in force ``lead_h`` before its draw."""

    seq: int
    taken_at_h: float
    plan_made_at_h: float
    errors: dict[str, float]
    """Lab field → (measured − predicted) / tolerance: beyond ±1 is a miss."""
    confirmed: bool
    width_after: float
    biased: tuple[str, ...] = ()
    """Lab fields whose mean error over the monitor's window was beyond its bias threshold."""
    long_from_h: float = math.nan
    """The estimate the long-lead replay started from (NaN: none was known ``long_lead_h`` before the draw)."""
    long_errors: dict[str, float] = field(default_factory=dict)
    """Lab field → error in tolerances against that replay."""
    reach_scale_after: float = 1.0
    replayed: bool = False
    """The day-ahead prediction was the model run from the estimate the plan started from with the inputs applied since, not the plan's own."""
    glucose_shortfall_g_per_l: float = math.nan
    """Predicted − measured glucose [g/L] (positive: the culture had less than the model said; NaN: glucose not measured or not accepted)."""
    shadow: bool = False
    """Made while the NMPC stood down: against the model run with the recipe's inputs; it moves neither the width nor the reach."""

    @property
    def long_confirmed(self) -> bool:
        """The model run from the estimate ``long_lead_h`` before the draw, with the inputs applied since, predicted every field within tolerance (False when there was none)."""
        return bool(self.long_errors) and all(abs(error) <= 1.0 for error in self.long_errors.values())

    def describe(self) -> str:
        verdict = "confirmed" if self.confirmed else "missed"
        bias = f"; biased: {', '.join(name.split('_')[0] for name in self.biased)} off the same way result after result" if self.biased else ""
        what = f"the model run from {self.plan_made_at_h:.0f} h with the inputs applied since" if self.replayed else f"the plan made at {self.plan_made_at_h:.0f} h"
        stood = "while the NMPC stood down, " if self.shadow else ""
        text = f"{stood}lab result {self.seq} (drawn {self.taken_at_h:.0f} h) {verdict} {what} ({_errors_text(self.errors)}{bias})"
        if self.long_errors:
            verdict = "confirmed" if self.long_confirmed else "missed"
            text += f"; {verdict} the model run from {self.long_from_h:.0f} h with the inputs applied since ({_errors_text(self.long_errors)})"
        if self.glucose_shortfall_g_per_l > 0.0:
            text += f"; glucose {self.glucose_shortfall_g_per_l:.2f} g/L below the model's"
        return text + f"; reach x{self.reach_scale_after:.2f}"


def _beyond(mean_error: float, threshold: float, *, below_only: bool) -> bool:
    """A mean error (measured − predicted, in tolerances) that is a bias: beyond ``threshold``, or with ``below_only`` below −``threshold``."""
    return mean_error < -threshold if below_only else abs(mean_error) > threshold


def _errors_text(errors: dict[str, float]) -> str:
    return ", ".join(f"{name.split('_')[0]} {error:+.1f}×tol" for name, error in errors.items())


@dataclass(frozen=True)
class Replay:
    """The model run from an earlier estimate with the inputs the plant was actually given, to a lab result's draw."""

    from_h: float
    """When the estimate it started from was made."""
    taken_at_h: float
    predicted: dict[str, float]
    """Lab field (of :data:`MONITORED`) → the value the run reached at the draw."""


@dataclass(frozen=True)
class _Prediction:
    made_at_h: float
    times_h: np.ndarray
    states: np.ndarray
    """(len(MONITORED), len(times_h)) predicted VCD, titer and glucose."""
    sd: np.ndarray
    """Same shape: the prediction's standard deviation (zeros when the source states none)."""

    def at(self, time_h: float, sigmas: float) -> dict[str, tuple[float, float]]:
        """Lab field → (predicted value, ``sigmas`` × its sd) at ``time_h``."""
        return {
            name: (float(np.interp(time_h, self.times_h, self.states[i])), sigmas * float(np.interp(time_h, self.times_h, self.sd[i]))) for i, (name, _) in enumerate(MONITORED)
        }


class TrustRegion:
    """The region, its width and the performance monitor of one batch."""

    def __init__(self, batch: BatchConfig, recipe: PlatformRecipe, envelope: tuple[PhaseEnvelope, ...], config: TrustRegionConfig | None = None, *, fitted: bool = False) -> None:
        """``fitted``: the kinetics were calibrated on the plant's records (a provenance). Fitted with no envelope (one withheld: the
        model was not shown to rank its records' outcomes right), the recipe band stays at its width: see :attr:`widens`."""
        self.config = config or TrustRegionConfig()
        self._batch = batch
        self._recipe = recipe
        self._envelope = tuple(sorted(envelope, key=lambda phase: phase.start_h))
        if not self.config.enabled:
            self.source = RegionSource.OFF
        elif self._envelope:
            self.source = RegionSource.CALIBRATION_ENVELOPE
        else:
            self.source = RegionSource.RECIPE_BAND
        self.widens = not (fitted and self.source is RegionSource.RECIPE_BAND)
        """Whether confirming lab results widen the region and earn reach. Not for a model fitted to the plant's records and not shown
        to rank their outcomes right: the plant's next results confirm such a model almost by construction, so they say nothing of its
        decisions, and its ranking of the records said they may be wrong. Measured on `inhibitor` and `cell_cycle` (docs/trust-region.md,
        "A calibrated model the ranking check did not pass"). Misses still narrow the band and stand the NMPC down."""
        self.width = self._initial_width()
        self.feed_width = self.width
        """The width the nutrient feed's reach takes (never more than :attr:`width`): widened only by confirming lab results drawn at
        least ``lead_h`` after the recipe's feed start (also with ``feed_lead_h``, which lets a plan feed earlier: cautious). Results
        of the unfed culture check the model's growth, not what more or less feed does: measured on the blind plant `clonal`, three of them widened the band to 0.75 before the feed began, and the plan
        fed 20-50 % above the recipe until the results of the fed culture missed (docs/trust-region.md, "Evidence of the fed culture")."""
        self.reach_scale = 1.0
        """Earned reach: how far beyond its configured reach (or margin) the region goes; grows with results that confirm the plan a day and ``long_lead_h`` ahead."""
        self.misses = 0
        self.stood_down = False
        self.shadow_confirmations = 0
        """Stood down: lab results in a row the model run with the recipe's inputs predicted within tolerance (:meth:`check`)."""
        self.shadow_checks = 0
        """Stood down: lab results held against the model run with the recipe's inputs since the stand-down (or the restart)."""
        self._shortfalls: deque[float] = deque(maxlen=self.config.bias_window)
        """Predicted − measured glucose of the last ``bias_window`` checks that compared glucose against the model run with the inputs applied."""
        self.checks: list[LabCheck] = []
        self._predictions: deque[_Prediction] = deque()
        self._ran = np.full((2, 2), np.nan)
        """The lowest and highest temperature setpoint [°C] (row 0) and nutrient feed [L/h] (row 1) of the production phase (NaN: none known)."""
        self._evidence_h = math.nan
        """Process time of the cycle that last held a lab result against the model (NaN: none yet; the first cycle seen starts the clock)."""
        self._evidence_is_result = False
        """Whether :attr:`_evidence_h` is a checked result's, not the region's first cycle (after inoculation, a restart, a re-enable)."""
        self._now_h = math.nan
        """Process time of the cycle now (the last :meth:`ran`)."""
        self.overdue_since_h = math.nan
        """Process time from which the lab results were overdue (:attr:`TrustRegionConfig.evidence_lapse_h`; NaN: they are not)."""
        self._planned_harvest_h = batch.recipe.harvest_h
        """The harvest of the last plan bounded (the recipe's until one is)."""

    def _initial_width(self) -> float:
        return 1.0 if self.source is not RegionSource.RECIPE_BAND else self.config.initial_width

    @property
    def active(self) -> bool:
        return self.source is not RegionSource.OFF

    # ------------------------------------------------------------------ region

    def harvest_window_h(self, now_h: float) -> tuple[float, float]:
        """Earliest and latest harvest the plan may choose (never before now, never after the batch's latest)."""
        recipe_h, latest_h = self._batch.recipe.harvest_h, self._batch.limits.latest_harvest_h
        if not self.active:
            return now_h, latest_h
        reach = self.width * self.reach_scale * self.config.harvest_reach_h
        return max(now_h, recipe_h - reach), max(now_h, min(recipe_h + reach, latest_h))

    def _phase(self, time_h: float) -> PhaseEnvelope:
        for phase in self._envelope:
            if time_h < phase.end_h:
                return phase
        return self._envelope[-1]

    @property
    def endgame_from_h(self) -> float:
        """From here on a move is one no long-lead replay checks before the harvest: ``long_lead_h`` before the recipe's harvest or
        the plan's, whichever is earlier (a plan that harvests early has its end-game early)."""
        return min(self._batch.recipe.harvest_h, self._planned_harvest_h) - self.config.long_lead_h

    @property
    def production_from_h(self) -> float:
        """The inputs run from here on are the batch's production phase: a day (``lead_h``) after the recipe's temperature shift and
        feed start, when a plan has come down the rate-limited ramp into the region after the shift (a ramp centred on the shift
        ends half its length after it: 3.5 h at the platform's 3.5 °C and 0.5 °C/h, within the day)."""
        recipe = self._batch.recipe
        return max(recipe.temperature_shift_h, recipe.feed_start_h) + self.config.lead_h

    def in_endgame(self, now_h: float) -> bool:
        """The plan's temperature and feed hold within what the batch has run (:attr:`TrustRegionConfig.endgame_holds_what_ran`)."""
        return self.config.endgame_holds_what_ran and self.active and now_h >= self.endgame_from_h

    def ran(self, time_h: float, setpoints: Setpoints) -> None:
        """Take note of the setpoints the plant ran (read back) at ``time_h``: the range of the production phase's temperature and
        nutrient feed. Before that phase (the warm growth phase, the days before the feed starts), a value outside the equipment's
        range (a bad read-back) or not finite, nothing is noted. Called every cycle, it also moves the clock of :meth:`_lapse`."""
        self._lapse(time_h)
        equipment = self._batch.equipment
        if not time_h >= self.production_from_h:
            return
        for row, value, low, high in (
            (0, setpoints.temperature_degc, equipment.temperature_min_degc, equipment.temperature_max_degc),
            (1, setpoints.feed_rate_lph, 0.0, equipment.feed_rate_max_lph),
        ):
            if math.isfinite(value) and low <= value <= high:
                self._ran[row] = (np.fmin(self._ran[row, 0], value), np.fmax(self._ran[row, 1], value))

    def _lapse(self, time_h: float) -> None:
        """No lab result held against the model for ``evidence_lapse_h``: what the batch's results had earned is no longer known to
        hold. The width falls to ``reenable_width`` (never widens) and the earned reach to 1; the next checked results earn them again."""
        if not math.isfinite(time_h):
            return
        self._now_h = time_h
        if not math.isfinite(self._evidence_h):
            self._evidence_h, self._evidence_is_result = time_h, False
            return
        cfg = self.config
        if self.stood_down or time_h - self._evidence_h <= cfg.evidence_lapse_h or math.isfinite(self.overdue_since_h):
            return
        self.overdue_since_h = self._evidence_h + cfg.evidence_lapse_h
        log.warning("trust_lab_results_overdue", last_evidence_h=self._evidence_h, process_time_h=time_h, width=self.width, reach_scale=self.reach_scale)
        self.width = min(self.width, cfg.reenable_width)
        self.feed_width = min(self.feed_width, self.width)
        self.reach_scale = 1.0

    def _restart_evidence_clock(self) -> None:
        """The lapse's clock starts again at the next cycle (no result checked since), and nothing is overdue."""
        self._evidence_h, self._evidence_is_result, self.overdue_since_h = math.nan, False, math.nan

    def _edges(self, time_h: float, volume_l: float, endgame: bool) -> tuple[float, float, float, float, float, float]:
        """At ``time_h``: the feed rate's lower and upper bound [L/h], the temperature's [°C] and the glucose window's edges [g/L].

        ``endgame``: the plan starts in the end-game (:meth:`in_endgame`), so the temperature and feed are held within what the batch has run.
        """
        temperature, feed = self._recipe.temperature_degc(time_h), self._recipe.feed_rate_lph(time_h)
        feed_low, feed_high, temperature_low, temperature_high, glucose_low, glucose_high = self._region_edges(time_h, volume_l, temperature, feed)
        if endgame:
            # What the lab checks comes days after the move (a productivity that follows the temperature with a lag, a titer
            # assayed a day later): a move made now is one no result takes back before the harvest. The recipe's own stays allowed.
            (t_ran_low, t_ran_high), (f_ran_low, f_ran_high) = self._ran
            temperature_low = max(temperature_low, float(np.fmin(t_ran_low, temperature)))
            temperature_high = min(temperature_high, float(np.fmax(t_ran_high, temperature)))
            feed_low = max(feed_low, float(np.fmin(f_ran_low, feed)))
            feed_high = min(feed_high, float(np.fmax(f_ran_high, feed)))
        return feed_low, feed_high, temperature_low, temperature_high, glucose_low, glucose_high

    def _region_edges(self, time_h: float, volume_l: float, temperature: float, feed: float) -> tuple[float, float, float, float, float, float]:
        """The region's edges at ``time_h`` (:meth:`_edges` without the end-game) about the recipe's ``temperature`` and ``feed`` then."""
        cfg, batch, w, scale = self.config, self._batch, self.width, self.reach_scale
        w_feed = min(w, self.feed_width)
        target = batch.recipe.glucose_target_g_per_l
        # The recipe band: the recipe's own neighbourhood, where the plant has always run, whatever the model (its reach scaled by
        # what the batch's results earned).
        t_low, t_high = temperature - scale * cfg.temperature_reach_degc, temperature + scale * cfg.temperature_reach_degc
        reach_lph = scale * cfg.feed_reach_per_day * batch.inoculation.volume_l / 24.0
        if feed <= 0.0 and self._recipe.feed_rate_lph(time_h + cfg.feed_lead_h) <= 0.0:
            reach_lph = 0.0  # the recipe feeds nothing now nor within feed_lead_h: neither does its band
        f_low, f_high = max(0.0, feed - reach_lph), feed + reach_lph
        g_low, g_high = target - scale * cfg.glucose_reach_g_per_l, target + scale * cfg.glucose_reach_above_g_per_l
        if self.source is RegionSource.CALIBRATION_ENVELOPE:
            # And where the records checked the model: the envelope and its margin, extended by (scale − 1) times the band's reach
            # as the results earn it. A calibrated model may go wherever an uncalibrated one may, and where its records went.
            phase = self._phase(time_h)
            earned = scale - 1.0
            t_low, t_high = _joined(
                (t_low, t_high),
                (
                    phase.temperature_degc.low - cfg.envelope_margin_degc - earned * cfg.temperature_reach_degc,
                    phase.temperature_degc.high + cfg.envelope_margin_degc + earned * cfg.temperature_reach_degc,
                ),
            )
            feeds, glucose = phase.feed_per_volume_per_day, phase.glucose_g_per_l
            f_margin = cfg.envelope_margin_relative * (feeds.high - feeds.low)
            earned_lph = earned * cfg.feed_reach_per_day * batch.inoculation.volume_l / 24.0
            f_low, f_high = _joined(
                (f_low, f_high), (max(0.0, max(0.0, feeds.low - f_margin) * volume_l / 24.0 - earned_lph), (feeds.high + f_margin) * volume_l / 24.0 + earned_lph)
            )
            if glucose.high > 0.0:
                g_margin = cfg.envelope_margin_relative * (glucose.high - glucose.low)
                g_low = min(g_low, glucose.low - g_margin - earned * cfg.glucose_reach_g_per_l)
                g_high = max(g_high, glucose.high + g_margin + earned * cfg.glucose_reach_above_g_per_l)
        # Starvation is a hard limit, and a day-ahead glucose prediction is trusted only to ±glucose_error_g_per_l (the batch's own
        # shortfalls widen it): whatever the source, the plan keeps glucose_margins of those above the limit.
        g_low = min(target, max(g_low, batch.limits.glucose_min_g_per_l + cfg.glucose_margins * self.glucose_error_g_per_l))
        return (
            feed - w_feed * max(0.0, feed - f_low),
            feed + w_feed * max(0.0, f_high - feed),
            temperature - w * max(0.0, temperature - t_low),
            temperature + w * max(0.0, t_high - temperature),
            target - w * max(0.0, target - g_low),
            target + w * max(0.0, g_high - target),
        )

    def bounds(self, starts_h: np.ndarray, durations_h: np.ndarray, *, volume_l: np.ndarray, previous_inputs: np.ndarray, temperature_rate_degc_per_h: float) -> PlanBounds | None:
        """Per-stage bounds for a plan on this stage grid; None when the region is off.

        ``volume_l`` is the expected volume per stage (feed bounds of the
        envelope are per volume), its first entry the volume now. The glucose feed is bounded only by its
        pump (the recipe's own glucose feed follows the lab results): the
        glucose *level* is held in the region instead. The temperature bounds
        are relaxed where the setpoint rate limit needs it: each stage can
        reach the next stage's region (a narrowed region, an envelope's phase
        boundary, the end-game's clamp), and the fastest way from ``previous_inputs`` into the region is
        allowed, so a region that moves (the shift, a narrowing) never makes
        the plan infeasible. The volume ceiling keeps room for the recipe's
        glucose feed to the recipe's harvest (``recipe.glucose_room_per_day``):
        the fallback must be able to run whenever the monitor stands the NMPC down.
        The feed's lower bounds never fill that room (the ceiling is a soft
        constraint of the plan, the input bounds are hard).
        """
        if not self.active:
            return None
        n = len(starts_h)
        self._planned_harvest_h = float(starts_h[-1]) + float(durations_h[-1])
        endgame = self.in_endgame(float(starts_h[0]))
        edges = np.array([self._edges(float(t), float(v), endgame) for t, v in zip(starts_h, np.broadcast_to(volume_l, (n,)), strict=True)]).T
        lower = np.vstack([edges[0], np.zeros(n), edges[2]])
        upper = np.vstack([edges[1], np.full(n, self._batch.equipment.glucose_rate_max_lph), edges[3]])
        rate = temperature_rate_degc_per_h
        elapsed = np.cumsum(durations_h)
        # Each stage may be where a ramp at the rate limit must already be to meet a later stage's region (a narrowed region, an envelope's phase boundary).
        low_ahead, high_ahead = math.inf, -math.inf
        for k in range(n - 1, -1, -1):
            original = lower[2, k], upper[2, k]
            lower[2, k] = min(lower[2, k], low_ahead - rate * elapsed[k])
            upper[2, k] = max(upper[2, k], high_ahead + rate * elapsed[k])
            low_ahead, high_ahead = min(low_ahead, original[1] + rate * elapsed[k]), max(high_ahead, original[0] - rate * elapsed[k])
        previous_temperature = float(previous_inputs[2])
        lower[2] = np.minimum(lower[2], previous_temperature + rate * elapsed)  # coming up from below the region
        upper[2] = np.maximum(upper[2], previous_temperature - rate * elapsed)  # coming down from above it
        # A plan that fills the reactor leaves the recipe no room to feed the glucose it needs should the NMPC stand down: keep the recipe's room free.
        ends_h = np.asarray(starts_h, dtype=float) + np.asarray(durations_h, dtype=float)
        volume_upper = np.array([self._recipe.nutrient_stop_l(float(t)) for t in ends_h])
        # The region's least feed must not fill that room: a narrowed region around a schedule that ignores the volume
        # (the recipe stops its nutrient feed at the room; its schedule does not) would force the plan over its ceiling.
        lower[0] = _fill_lower_bounds(lower[0], np.asarray(durations_h, dtype=float), float(np.broadcast_to(volume_l, (n,))[0]), volume_upper)
        return PlanBounds(inputs_lower=lower, inputs_upper=upper, glucose_lower=edges[4], glucose_upper=edges[5], volume_upper=volume_upper)

    # ----------------------------------------------------------------- monitor

    def remember(self, made_at_h: float, times_h: np.ndarray, states: np.ndarray, sd: np.ndarray | None = None) -> None:
        """Keep a plan's prediction (stage-end times from ``made_at_h`` and the states there) for the lab results to come.

        ``sd``: the prediction's standard deviation per state on the same times (the estimator's forecast along the plan); a lab
        result is then a miss only beyond the tolerance and ``prediction_sigmas`` of it together. A correct model predicts no
        better than the state it starts from: early in a batch, with the inoculum's VCD known to ±10 %, a day of exponential
        growth spreads the prediction by more than the VCD tolerance, and counting that as the model's fault stood a correct
        model down.
        """
        rows = [STATE_INDEX[state] for _, state in MONITORED]
        times = np.asarray(times_h, dtype=float).copy()
        spread = np.zeros((len(rows), times.size)) if sd is None else np.nan_to_num(np.asarray(sd, dtype=float)[rows, :], nan=0.0)
        self._predictions.append(_Prediction(made_at_h, times, np.asarray(states)[rows, :].copy(), spread))
        keep_after_h = made_at_h - self.config.lead_h - 48.0
        while len(self._predictions) > 1 and self._predictions[1].made_at_h <= keep_after_h:
            self._predictions.popleft()

    def check(self, lab: LabResult, accepted: frozenset[str] | None = None, replay: Replay | None = None, day_replay: Replay | None = None) -> LabCheck | None:
        """Hold a new lab result against the plan in force ``lead_h`` before its draw; widen or narrow the region. None when no such plan is known.

        A result already checked (same ``seq``) is not checked again: one result is one piece of evidence, however often a retried
        cycle hands it over.

        ``accepted``: the fields the estimator's gate accepted (None: all measured ones). A value the gate rejected (a typo, a swapped
        sample) says nothing about the model: it is neither a confirmation nor a miss.

        ``replay``: the model run from the estimate ``long_lead_h`` before the draw with the inputs actually applied since (the
        controller makes it: :meth:`controller.nmpc.NmpcController.replay`). A model whose predictions hold a day ahead is not
        thereby right about the days after, and only those decide where a plan ends up: the reach scale grows by ``reach_step``
        (up to ``max_reach_scale``) only with results that confirm both the day-ahead plan and the replay. It returns to 1 at a
        day-ahead miss or a replay miss beyond ``reach_reset_tolerances``; a replay just beyond tolerance halves what was earned
        (a replay starts from an estimate three days old, whose own error a right model carries forward). The replay, not the plan
        made ``long_lead_h`` before, is the evidence: the plans of the days between
        changed the inputs, above all the glucose feed, and a plan's three-day-old glucose says more about the replanning than
        about the model.
        """
        if not self.active:
            return None
        if any(check.seq == lab.seq for check in self.checks):
            return None  # handed over again (its cycle failed after the check, or was abandoned): it has counted once
        cfg = self.config
        day_replay, replay = (run if run is not None and run.taken_at_h == lab.taken_at_h else None for run in (day_replay, replay))
        if self.stood_down:
            return self._shadow_check(lab, accepted, replay, day_replay)
        plan = self._plan_before(lab.taken_at_h, cfg.lead_h)
        if plan is None:
            return None
        predicted = plan.at(lab.taken_at_h, cfg.prediction_sigmas)
        if day_replay is not None:
            predicted = {name: (day_replay.predicted[name], spread) for name, (_, spread) in predicted.items() if name in day_replay.predicted}
        errors = self._errors(predicted, lab, accepted)
        if not errors:
            return None
        # Counted from the cycle that checked it (its arrival, 3-5 h after the draw): a lapse is about results that stopped coming.
        now_h = self._now_h if math.isfinite(self._now_h) else lab.taken_at_h
        self._evidence_h = max(self._evidence_h, now_h) if math.isfinite(self._evidence_h) else now_h
        self._evidence_is_result, self.overdue_since_h = True, math.nan
        biased = self._biased(errors, shadow=False)
        confirmed = all(abs(error) <= 1.0 for error in errors.values()) and not biased
        long_errors = self._run_errors(replay, lab, accepted)
        long_worst = max((abs(error) for error in long_errors.values()), default=0.0)
        long_missed = long_worst > 1.0
        # Against the model run with the inputs applied only: the plan's own glucose a day ahead is as much the replanning's as the model's.
        shortfall = predicted["glucose_g_per_l"][0] - lab.glucose_g_per_l if day_replay is not None and "glucose_g_per_l" in errors else math.nan
        if confirmed:
            self.misses = 0
            if self.widens:
                self.width = min(1.0, self.width + cfg.widen_step)
                if lab.taken_at_h >= self._batch.recipe.feed_start_h + cfg.lead_h:  # the plan it confirms fed the culture
                    self.feed_width = min(1.0, self.feed_width + cfg.widen_step)
        else:
            self.misses += 1
            self.width *= cfg.shrink_factor
            self.feed_width *= cfg.shrink_factor
            if self.misses >= cfg.misses_to_recipe:
                self.stood_down = True
                self.shadow_checks = self.shadow_confirmations = 0
        if not confirmed or long_worst > cfg.reach_reset_tolerances:
            self.reach_scale = 1.0
        elif long_missed:  # just beyond tolerance three days ahead: the estimate's own error, carried forward, can do that to a right model
            self.reach_scale = 1.0 + 0.5 * (self.reach_scale - 1.0)
        elif long_errors and self.widens:
            self.reach_scale = min(cfg.max_reach_scale, self.reach_scale + cfg.reach_step)
        from_h = day_replay.from_h if day_replay is not None else plan.made_at_h
        result = self._record(lab, from_h, errors, confirmed, biased, replay, long_errors, replayed=day_replay is not None, shortfall=shortfall)
        if math.isfinite(shortfall):  # a result without a glucose comparison says nothing either way: it does not push one out
            self._shortfalls.append(shortfall)
        return result

    def _biased(self, errors: dict[str, float], *, shadow: bool) -> tuple[str, ...]:
        """The fields whose mean error over the last ``bias_window`` results (this one and the checks of the same kind before it) is
        beyond ``bias_threshold``: each may be within tolerance, all off the same way. With ``bias_below_only``, a VCD or titer
        mean counts only below the predictions (the plant gave less than the model said). Shadow checks look only at the shadow
        checks of the present stand-down (the last ``shadow_checks``; fewer after a restart), the others at the checks made while
        the NMPC planned."""
        cfg = self.config
        kept = self.checks[max(0, len(self.checks) - self.shadow_checks) :] if shadow else [check for check in self.checks if not check.shadow]
        same_kind = [check.errors for check in kept]
        window = [*same_kind[max(0, len(same_kind) - cfg.bias_window + 1) :], errors]
        return tuple(
            name
            for name in errors
            if len(window) == cfg.bias_window
            and all(name in errors_then for errors_then in window)
            and _beyond(sum(errors_then[name] for errors_then in window) / cfg.bias_window, cfg.bias_threshold, below_only=cfg.bias_below_only and name in BIAS_BELOW_ONLY)
        )

    def _shadow_check(self, lab: LabResult, accepted: frozenset[str] | None, replay: Replay | None, day_replay: Replay | None) -> LabCheck | None:
        """Stood down: hold ``lab`` against the model run with what the recipe gave, a day and ``long_lead_h`` ahead, and count the
        results in a row within tolerance on both (and no bias; a result with no long-lead replay known leaves the count as it is, a
        miss a day ahead resets it): evidence for the engineer who decides on a re-enable, and only that.
        Measured (docs/trust-region.md): a model that predicts the recipe's own course can still lose with its own moves, so the
        monitor never puts the NMPC back itself. The width, the reach and the glucose floor stay as they are. None without a day-ahead run (the replay
        memory starts again after a restart or a long gap)."""
        if day_replay is None:
            return None
        errors = self._run_errors(day_replay, lab, accepted)
        if not errors:
            return None
        long_errors = self._run_errors(replay, lab, accepted)
        biased = self._biased(errors, shadow=True)
        confirmed = all(abs(error) <= 1.0 for error in (*errors.values(), *long_errors.values())) and not biased
        # The glucose floor keeps the shortfalls seen while the NMPC planned: results under the recipe must not push the one
        # that stood it down out of memory and lower the floor an engineer's re-enable plans with. On the check only.
        shortfall = day_replay.predicted["glucose_g_per_l"] - lab.glucose_g_per_l if "glucose_g_per_l" in errors else math.nan
        self.shadow_checks += 1
        if not confirmed:
            self.shadow_confirmations = 0
        elif long_errors:  # within tolerance a day and long_lead_h ahead: one more in a row
            self.shadow_confirmations += 1
        # (within tolerance a day ahead with no long-lead replay known, after a restart or a long gap: the count stays)
        return self._record(lab, day_replay.from_h, errors, confirmed, biased, replay, long_errors, replayed=True, shortfall=shortfall, shadow=True)

    def _record(
        self,
        lab: LabResult,
        from_h: float,
        errors: dict[str, float],
        confirmed: bool,
        biased: tuple[str, ...],
        replay: Replay | None,
        long_errors: dict[str, float],
        *,
        replayed: bool,
        shortfall: float,
        shadow: bool = False,
    ) -> LabCheck:
        """One check, with the width and reach it left, appended to :attr:`checks`."""
        long_from_h = replay.from_h if replay is not None and long_errors else math.nan
        result = LabCheck(lab.seq, lab.taken_at_h, from_h, errors, confirmed, self.width, biased, long_from_h, long_errors, self.reach_scale, replayed, shortfall, shadow)
        self.checks.append(result)
        return result

    @property
    def glucose_error_g_per_l(self) -> float:
        """One day-ahead glucose error: the glucose tolerance's floor, or the largest shortfall of the last ``bias_window`` glucose comparisons when larger.

        A model that over-predicts glucose by more than the floor's assumption plans the culture towards starvation with a
        margin it does not have; the batch's own results say how far off it is. Each result counts for ``bias_window`` checks,
        so the margin narrows again once the model's glucose holds.
        """
        return max([self.config.glucose.floor, *(value for value in self._shortfalls if math.isfinite(value))])

    def _plan_before(self, taken_at_h: float, lead_h: float) -> _Prediction | None:
        """The plan in force ``lead_h`` before ``taken_at_h``, if it predicted that far."""
        before = [p for p in self._predictions if p.made_at_h <= taken_at_h - lead_h + 1e-9]
        if not before or not before[-1].times_h[0] <= taken_at_h <= before[-1].times_h[-1]:
            return None
        return before[-1]

    def _errors(self, predicted: dict[str, tuple[float, float]], lab: LabResult, accepted: frozenset[str] | None) -> dict[str, float]:
        """Lab field → (measured − predicted) / tolerance for the fields measured and accepted; ``predicted``: field → (value, spread to count in)."""
        errors: dict[str, float] = {}
        for name, _ in MONITORED:
            if name not in predicted or not lab.measured(name) or (accepted is not None and name not in accepted):
                continue
            measured = float(getattr(lab, name))
            mean, spread = predicted[name]
            errors[name] = (measured - mean) / math.hypot(self.config.tolerance(name).limit(measured), spread)
        return errors

    def _run_errors(self, run: Replay | None, lab: LabResult, accepted: frozenset[str] | None) -> dict[str, float]:
        """Lab field → error in tolerances against a model run (no spread counted in); none without the run."""
        return self._errors({name: (value, 0.0) for name, value in run.predicted.items()}, lab, accepted) if run is not None else {}

    def reenable(self) -> None:
        """An operator puts the NMPC back in charge after a stand-down: the miss count at 0, the region at ``reenable_width`` whatever
        its source. A calibrated model starts a batch at full width because its records checked it; this batch's results have
        since contradicted it, so it earns its width again as an unchecked model does (measured: docs/trust-region.md)."""
        self.stood_down = False
        self.misses = 0
        self.shadow_confirmations = self.shadow_checks = 0
        self.width = self.feed_width = min(self.config.reenable_width, self._initial_width())  # never wider than a site's own start
        self.reach_scale = 1.0
        self._restart_evidence_clock()
        self._predictions.clear()  # the glucose error stays: the model's glucose shortfalls are still evidence

    # ------------------------------------------------------------------ report

    def alarms(self) -> dict[str, str]:
        """Active alarms: the NMPC stood down, or the last lab results missed the plan (region narrowed), or the batch's glucose
        shortfalls hold the plan's glucose at the recipe's target."""
        alarms: dict[str, str] = {}
        last = self.checks[-1].describe() if self.checks else ""
        if self.stood_down:
            results = "1 lab result" if self.misses == 1 else f"{self.misses} lab results in a row"
            alarms["nmpc_stood_down"] = f"{results} missed the plan's predictions; {self._stood_down_text()} (last: {last})"
            return alarms
        if self.misses:
            alarms["nmpc_predictions_missed"] = f"{last}: trust region narrowed to {self.width:.0%}"
        if self.active and math.isfinite(self.overdue_since_h):
            alarms["nmpc_lab_results_overdue"] = (
                f"no lab result has been held against the model since{'' if self._evidence_is_result else ' the region started at'}"
                f" {self._evidence_h:.0f} h (overdue from {self.overdue_since_h:.0f} h:"
                f" evidence_lapse_h {self.config.evidence_lapse_h:g} h): the trust region is back to {self.width:.0%} and its earned reach"
                + (" to x1, as for a model this batch has not checked, until new results confirm it" if self.widens else " to x1 (a held band: no result widens it)")
            )
        if self.active and self.glucose_floor_at_target:
            alarms["nmpc_glucose_floor_at_target"] = self._floor_at_target_text()
        return alarms

    def _stood_down_text(self) -> str:
        """What runs now, and what the model has shown since it stood down."""
        ahead = f"a day and {self.config.long_lead_h:.0f} h ahead"
        if not self.shadow_checks:
            shown = "no lab result has been held against the model since"
        elif self.shadow_confirmations:
            shown = f"since then the model run with what the recipe gave predicted the last {self.shadow_confirmations} lab result(s) in a row within tolerance {ahead}"
        else:
            shown = (
                f"since then {self.shadow_checks} lab result(s) were held against the model run with what the recipe gave, and 0 of the last in a row were within tolerance {ahead}"
            )
        return f"the platform recipe runs until an engineer re-enables the NMPC; {shown} (a model that predicts the recipe's course may still lose with its own moves)"

    @property
    def glucose_floor_at_target(self) -> bool:
        """The batch's own glucose shortfalls, not the configuration, lift the glucose floor to the recipe's target (where the cap holds it)."""
        cfg, limit, target = self.config, self._batch.limits.glucose_min_g_per_l, self._batch.recipe.glucose_target_g_per_l
        error = self.glucose_error_g_per_l
        return limit + cfg.glucose_margins * cfg.glucose.floor < target <= limit + cfg.glucose_margins * error

    def _floor_at_target_text(self) -> str:
        error, target = self.glucose_error_g_per_l, self._batch.recipe.glucose_target_g_per_l
        recent = [check for check in self.checks if check.glucose_shortfall_g_per_l == error]
        if recent:
            why = f"lab result {recent[-1].seq} (drawn {recent[-1].taken_at_h:.0f} h) had {error:.2f} g/L less glucose than the model predicted a day ahead"
        elif error >= MAX_GLUCOSE_SHORTFALL_G_PER_L:
            why = "the glucose shortfalls saved before the restart were unreadable (taken as the largest)"
        else:
            why = f"a lab result before the restart had {error:.2f} g/L less glucose than the model predicted a day ahead"
        return (
            f"{why}: the plan holds glucose at the recipe's target of"
            f" {target:g} g/L, as the recipe would, until {self.config.bias_window} results in a row show no shortfall that large (a wrong"
            " glucose result the estimator's gate accepted holds it there too)"
        )

    def summary(self, now_h: float | None = None, volume_l: float | None = None) -> dict[str, Any]:
        """The region as plain data, for the cycle record, the screen and the report."""
        data: dict[str, Any] = {
            "source": self.source.value,
            "width": self.width,
            "feed_width": min(self.width, self.feed_width),
            "widens": self.widens,
            "reach_scale": self.reach_scale,
            "misses": self.misses,
            "stood_down": self.stood_down,
            "shadow_confirmations": self.shadow_confirmations,
            "shadow_checks": self.shadow_checks,
            "glucose_error_g_per_l": self.glucose_error_g_per_l,
        }
        if math.isfinite(self.overdue_since_h):
            data["lab_results_overdue_since_h"] = self.overdue_since_h
        if now_h is not None and self.active:
            endgame = self.in_endgame(now_h)
            feed_low, feed_high, temperature_low, temperature_high, glucose_low, glucose_high = self._edges(
                now_h, volume_l if volume_l is not None else self._batch.inoculation.volume_l, endgame
            )
            data["temperature_degc"] = [temperature_low, temperature_high]
            data["feed_rate_lph"] = [feed_low, feed_high]
            data["glucose_min_g_per_l"] = glucose_low
            data["glucose_max_g_per_l"] = glucose_high
            data["harvest_h"] = list(self.harvest_window_h(now_h))
            data["endgame"] = endgame
        if self.checks:
            data["last_check"] = self.checks[-1].describe()
            data["last_check_confirmed"] = self.checks[-1].confirmed
            data["last_check_shadow"] = self.checks[-1].shadow
        return data

    def to_dict(self) -> dict[str, Any]:
        """What a restart needs (the predictions are not kept: the first lab results after a restart are not checked)."""
        return {
            "width": self.width,
            "feed_width": self.feed_width,
            "reach_scale": self.reach_scale,
            "misses": self.misses,
            "stood_down": self.stood_down,
            "shadow_confirmations": self.shadow_confirmations,
            "shadow_checks": self.shadow_checks,
            "glucose_shortfalls_g_per_l": [value if math.isfinite(value) else None for value in self._shortfalls],
            "ran_temperature_degc": [value if math.isfinite(value) else None for value in self._ran[0]],
            "ran_feed_lph": [value if math.isfinite(value) else None for value in self._ran[1]],
            "last_evidence_h": self._evidence_h if math.isfinite(self._evidence_h) else None,
            "last_evidence_is_result": self._evidence_is_result,
            "lab_results_overdue_since_h": self.overdue_since_h if math.isfinite(self.overdue_since_h) else None,
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Take up a saved region. A reach scale or miss count that is no finite number (a damaged or edited resume state) is no
        evidence: the region takes a fresh one's. A width that is missing or none takes the safe side, the narrow width of a re-enable
        (a fresh region's when that is narrower): a batch its results had narrowed does not come back wide. A NaN would have made every
        bound NaN, and the harvest window [now, now]: a harvest at once. A stand-down flag that is no boolean stands the NMPC down (the
        safe side)."""
        safe = min(self.width, self.config.reenable_width)
        self.width = float(np.clip(_saved_number(data, "width", safe), 0.0, 1.0))
        self.reach_scale = float(np.clip(_saved_number(data, "reach_scale", 1.0), 1.0, self.config.max_reach_scale))
        if not self.widens and (self.width > self._initial_width() or self.reach_scale > 1.0):
            # Saved by a band that widened (a batch begun before the hold, a model approved over another's resume state, an edit):
            # a held band is never wider than its start, nor earns reach, whatever was saved.
            log.warning("trust_restore_value_ignored", field="width", saved=f"{self.width:g}, reach x{self.reach_scale:g}", used=f"{self._initial_width():g}, reach x1")
            self.width, self.reach_scale = min(self.width, self._initial_width()), 1.0
        # Missing (a state saved before the feed kept its own width) or damaged: whether results of the fed culture widened it is
        # not known, so the feed takes the narrowest of the saved width, a re-enable's and a fresh region's (the safe side).
        self.feed_width = min(_saved_fraction(data, "feed_width", min(self.width, self.config.reenable_width, self._initial_width())), self.width)
        self.misses = int(np.clip(_saved_number(data, "misses", 0.0), 0, self.config.misses_to_recipe))
        # The lapse's clock goes on across a restart (a runtime that restarts every few hours never has a day-old plan to check a
        # result against): missing (a state saved before it was kept), it starts at the first cycle after the restart; damaged, the
        # results are taken as overdue now (the safe side).
        evidence = data.get("last_evidence_h")
        self._restart_evidence_clock()
        if evidence is not None:
            if _is_finite_number(evidence):
                self._evidence_h, self._evidence_is_result = float(evidence), data.get("last_evidence_is_result") is True
                overdue = data.get("lab_results_overdue_since_h")
                if _is_finite_number(overdue):
                    self.overdue_since_h = float(overdue)
            else:
                log.warning("trust_restore_value_ignored", field="last_evidence_h", saved=repr(evidence), used="overdue now")
                self.width, self.reach_scale = min(self.width, self.config.reenable_width), 1.0
                self.feed_width = min(self.feed_width, self.width)
        self._shortfalls.clear()
        self._shortfalls.extend(_saved_shortfalls(data))
        self._ran = np.array([_saved_range(data, "ran_temperature_degc"), _saved_range(data, "ran_feed_lph")])
        stood_down = data.get("stood_down", False)
        if not isinstance(stood_down, bool):  # "false" is a non-empty string: bool() would read it as True, and so would this, on purpose
            log.warning("trust_restore_value_ignored", field="stood_down", saved=repr(stood_down), used=True)
            stood_down = True  # a damaged stand-down flag is no evidence the model is fit: the recipe runs until an engineer re-enables
        self.stood_down = stood_down
        # What the model showed since the stand-down: none unless stood down; a damaged count is none (collected again).
        self.shadow_checks, self.shadow_confirmations = (_saved_count(data, name) if stood_down else 0 for name in ("shadow_checks", "shadow_confirmations"))
        self.shadow_confirmations = min(self.shadow_confirmations, self.shadow_checks)


def _joined(band: tuple[float, float], envelope: tuple[float, float]) -> tuple[float, float]:
    """The band's interval and the envelope's as one: both, where they overlap or touch; the band alone where they do not, for the
    values between them are in neither (an envelope of other recipes' records far from this recipe's setpoint)."""
    if envelope[0] <= band[1] and band[0] <= envelope[1]:
        return min(band[0], envelope[0]), max(band[1], envelope[1])
    return band


def _is_finite_number(value: object) -> TypeGuard[int | float]:
    """A finite int or float of a resume state (a boolean is none: JSON's true is not 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _saved_shortfalls(data: dict[str, Any]) -> list[float]:
    """The saved glucose shortfalls (None: none for that check). Missing: none (a state saved before they were kept). Damaged (no list of
    numbers or nulls): one of :data:`MAX_GLUCOSE_SHORTFALL_G_PER_L`, logged: the floor at the recipe's target until new results say otherwise."""
    saved = data.get("glucose_shortfalls_g_per_l", [])
    if not isinstance(saved, list) or not all(value is None or _is_finite_number(value) for value in saved):
        log.warning("trust_restore_value_ignored", field="glucose_shortfalls_g_per_l", saved=repr(saved), used=[MAX_GLUCOSE_SHORTFALL_G_PER_L])
        return [MAX_GLUCOSE_SHORTFALL_G_PER_L]
    return [math.nan if value is None else float(np.clip(value, -MAX_GLUCOSE_SHORTFALL_G_PER_L, MAX_GLUCOSE_SHORTFALL_G_PER_L)) for value in saved]


def _saved_range(data: dict[str, Any], name: str) -> tuple[float, float]:
    """A saved range of inputs the batch ran: (low, high). Missing or damaged: none known (logged when damaged), so the end-game
    holds the plan at the recipe's own inputs (the safe side)."""
    saved = data.get(name)
    if saved is None or saved == [None, None]:
        return math.nan, math.nan
    if isinstance(saved, list) and len(saved) == 2 and all(_is_finite_number(value) for value in saved) and saved[0] <= saved[1]:
        return float(saved[0]), float(saved[1])
    log.warning("trust_restore_value_ignored", field=name, saved=repr(saved), used=None)
    return math.nan, math.nan


def _saved_count(data: dict[str, Any], name: str) -> int:
    """A saved count of lab results: a whole number ≥ 0; missing: 0; damaged (no whole number ≥ 0, a boolean): 0, logged."""
    value = data.get(name, 0)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10_000:
        return value
    log.warning("trust_restore_value_ignored", field=name, saved=repr(value), used=0)
    return 0


def _saved_fraction(data: dict[str, Any], name: str, default: float) -> float:
    """``data[name]`` as a width in [0, 1]; ``default`` when it is missing, no number (a boolean or a string is none: ``true``
    would read as the widest) or outside [0, 1], which no saved state holds (logged: a damaged or edited resume state)."""
    if name not in data:
        return default
    value = data[name]
    if _is_finite_number(value) and 0.0 <= value <= 1.0:
        return float(value)
    log.warning("trust_restore_value_ignored", field=name, saved=repr(value), used=default)
    return default


def _saved_number(data: dict[str, Any], name: str, default: float) -> float:
    """``data[name]`` as a float; ``default`` when it is missing or no finite number (logged: a damaged or edited resume state)."""
    value = data.get(name, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isfinite(number):
        return number
    log.warning("trust_restore_value_ignored", field=name, saved=repr(value), used=default)
    return default


def _fill_lower_bounds(feed_lower_lph: np.ndarray, durations_h: np.ndarray, volume_now_l: float, volume_upper_l: np.ndarray) -> np.ndarray:
    """The nutrient feed's lower bounds per stage, cut where feeding at them would take the volume above ``volume_upper_l`` at the stage's end."""
    cut = np.array(feed_lower_lph, dtype=float)
    volume = volume_now_l
    for k, duration in enumerate(durations_h):
        room_lph = max(0.0, (float(volume_upper_l[k]) - volume) / duration) if duration > 0.0 else 0.0
        cut[k] = min(cut[k], room_lph)
        volume += cut[k] * duration
    return cut
