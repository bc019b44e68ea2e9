"""The next batch's recipe, chosen by the calibrated model near the recipes its records ran or within the recipe band.

On a plant whose structure the model does not share, the model's
trajectories miss the lab results within days, and the performance monitor
hands each batch back to the platform recipe (docs/trust-region.md). Yet a
calibrated model can still tell which of two *whole recipes* gives more
product: that is a question about the records' outcomes, which the fit has
seen, not about the shape of a trajectory. This module asks it, and answers
with a recipe of the platform's own family (docs/calibration.md §7):

1. **The ranking check.** The model must order the records' outcomes as they
   happened. For each record, the product at its last titer result (the
   titer times the measured volume then, per day of reactor occupancy) is
   taken from the measured titer and from the fitted one (the record's own
   inputs). Only records comparable with the batch file are ranked (scale,
   reactor, media, scoring, harvest time: :func:`ranking_check`). Their rank
   correlation must reach ``min_rank_correlation`` over at least
   ``min_records`` distinct recipes whose measured outcomes differ by at
   least ``min_outcome_spread``. Otherwise no recipe is proposed: a model
   that cannot rank the batches it was fitted to cannot choose the next one.
2. **The search.** Within the range the records' recipes covered (the
   temperatures with ``temperature_margin_degc``, the nutrient feed with
   ``feed_margin_relative`` of its span, the shift time and the harvest as
   the records ran them), and within ``max_steps_from_a_record`` grid steps
   of a recipe some record ran (the box alone would combine the extremes of
   different records); or, with ``within_recipe_band``, a whole recipe in
   the trust region's recipe band around the batch file's recipe
   (:class:`RecipeBand`: where the runtime lets the NMPC move the inputs on
   a model no lab result has checked yet): each region searched on its own,
   from its own starting points, never a mix. A coordinate search on the model's forecast of the
   recipe (controller.forecast: the recipe's own glucose arithmetic on
   emulated daily samples) finds the recipe of most score that keeps glucose
   ``glucose_margin_g_per_l`` above the starvation limit, osmolality below
   its limit, and the harvest's viability and quality ``viability_margin_pct``
   and ``quality_margin`` inside the NMPC's harvest specifications.
3. **The gain.** The proposal must beat the model's forecast of the batch's
   own recipe by ``min_gain_fraction``; else the batch's recipe stays. So it
   does where the model forecasts that recipe to break a margin.

A proposal is a new batch file for an engineer to review, not a change the
runtime makes: the recipe is what the NMPC's trust region is drawn around and
what it stands down to (and, where the site programs it so, what the PLC runs
on its own), so it goes through the site's change control.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog
from pydantic import Field, ValidationError

from controller.calibration import BatchFit, CalibrationResult
from controller.config import BatchConfig, RecipeConfig
from controller.estimator import ExtendedKalmanEstimator
from controller.forecast import ForecastDivergedError, ForecastInputError, ForecastKernel, StartedSchedule, forecast, recipe_schedule
from controller.kpis import batch_score_g_per_day
from controller.mpc import MpcConfig
from controller.recipe import PlatformRecipe
from controller.records import BatchRecord
from controller.trust import TrustRegionConfig
from plant_models.cho import STATE_INDEX, CultureModel
from plant_models.config_loading import FrozenConfig
from plant_models.parameters import CultureParameters, parameter_vector

log = structlog.get_logger(__name__)

VARIED: tuple[str, ...] = (
    "temperature_initial_degc",
    "temperature_shifted_degc",
    "temperature_shift_h",
    "feed_fraction_of_initial_volume_per_day",
    "harvest_h",
)
"""The recipe's fields the search moves; the others (feed start, glucose target, …) stay the batch's own."""


class ProposalSettings(FrozenConfig):
    """How a recipe is proposed from a calibrated model (docs/calibration.md §7)."""

    min_records: int = Field(
        default=5,
        ge=3,
        le=1000,
        description="records the ranking check needs; with 5, a model with no skill at ranking passes a threshold of 0.8 by chance 1 time in 15, with 4 one in 6 [-]",
    )
    min_rank_correlation: float = Field(
        default=0.8, ge=-1.0, le=1.0, description="rank correlation of the fitted against the measured outcomes of the records the model must reach [-]"
    )
    min_outcome_spread: float = Field(
        default=0.05, ge=0.0, le=1.0, description="the records' measured outcomes must differ by this fraction of their mean, best to worst, to be ranked at all [-]"
    )
    volume_tolerance: float = Field(default=0.05, ge=0.0, le=1.0, description="a record is ranked only if inoculated within this fraction of the batch file's volume [-]")
    harvest_tolerance_h: float = Field(
        default=36.0, gt=0.0, le=240.0, description="a record is ranked only if its last titer result was drawn within this of the records' median [h]"
    )
    temperature_margin_degc: float = Field(default=0.5, ge=0.0, le=5.0, description="temperatures beyond what the records' recipes ran [°C]")
    feed_margin_relative: float = Field(default=0.1, ge=0.0, le=1.0, description="nutrient feed beyond the records' recipes, as a fraction of their span [-]")
    temperature_step_degc: float = Field(default=0.5, gt=0.0, le=5.0, description="grid of the temperatures searched [°C]")
    time_step_h: float = Field(default=24.0, gt=0.0, le=240.0, description="grid of the shift and harvest times searched [h]")
    feed_step_per_day: float = Field(default=0.0025, gt=0.0, le=0.1, description="grid of the nutrient feed searched, as a fraction of the initial volume per day [-/day]")
    glucose_margin_g_per_l: float = Field(default=1.0, ge=0.0, le=10.0, description="the forecast glucose stays this far above the starvation limit [g/L]")
    viability_margin_pct: float = Field(default=5.0, ge=0.0, le=50.0, description="the forecast viability at harvest stays this far above the NMPC's minimum [%]")
    quality_margin: float = Field(default=0.02, ge=0.0, le=0.5, description="the forecast galactosylated fraction at harvest stays this far above the specification [-]")
    min_gain_fraction: float = Field(default=0.03, ge=0.0, le=1.0, description="the proposal's forecast score must beat the batch's recipe's by this fraction [-]")
    sweeps: int = Field(default=3, ge=1, le=20, description="passes of the coordinate search over the varied fields [-]")
    within_recipe_band: bool = Field(
        default=True,
        description=(
            "also search the trust region's recipe band around the batch file's recipe (its reaches at width 1, no reach earned:"
            " TrustRegionConfig), whatever the records ran: where the runtime lets the NMPC move the inputs on a model no lab result"
            " has checked, a model that passed the ranking check may choose the recipe (docs/calibration.md §7)"
        ),
    )
    max_steps_from_a_record: int = Field(
        default=2,
        ge=0,
        le=1000,
        description=(
            "a candidate outside the recipe band is searched only within this many grid steps, in every varied field at once, of a recipe"
            " some record (or the batch file) ran, and within the records' box: the box over the fields would combine the extremes of"
            " different records, a recipe none of them ran [-]"
        ),
    )

    @property
    def grid_steps(self) -> dict[str, float]:
        """Varied field → the step of its search grid."""
        return {
            "temperature_initial_degc": self.temperature_step_degc,
            "temperature_shifted_degc": self.temperature_step_degc,
            "temperature_shift_h": self.time_step_h,
            "feed_fraction_of_initial_volume_per_day": self.feed_step_per_day,
            "harvest_h": self.time_step_h,
        }


@dataclass(frozen=True)
class RecipeBand:
    """The trust region's recipe band in the recipe's own terms: how far a recipe may be from the batch file's and stay inside the
    band the NMPC plans in with a model no lab result has checked (TrustRegionConfig's reaches at width 1, no reach earned)."""

    temperature_degc: float
    feed_per_day: float
    """Nutrient feed, as a fraction of the initial volume per day (the recipe's own unit)."""
    harvest_h: float

    @classmethod
    def of(cls, trust: TrustRegionConfig) -> RecipeBand | None:
        """The band of ``trust`` (None where the trust region is off: there is no band to search)."""
        if not trust.enabled:
            return None
        return cls(trust.temperature_reach_degc, trust.feed_reach_per_day, trust.harvest_reach_h)

    def bounds(self, recipe: RecipeConfig) -> dict[str, tuple[float, float]]:
        """Varied field → the band's interval around ``recipe``'s value (the shift time: ``recipe``'s own; moving it puts the
        temperature a whole shift away from the recipe's for a while, which :meth:`holds` checks)."""
        reach = {
            "temperature_initial_degc": self.temperature_degc,
            "temperature_shifted_degc": self.temperature_degc,
            "temperature_shift_h": 0.0,
            "feed_fraction_of_initial_volume_per_day": self.feed_per_day,
            "harvest_h": self.harvest_h,
        }
        return {name: (float(getattr(recipe, name)) - reach[name], float(getattr(recipe, name)) + reach[name]) for name in VARIED}

    def holds(self, candidate: RecipeConfig, recipe: RecipeConfig) -> bool:
        """``candidate``'s temperature stays within reach of ``recipe``'s at every time of the batch (the two shifts may differ), and
        its nutrient feed and harvest within theirs."""
        tolerance = 1e-9
        for t in (0.0, candidate.temperature_shift_h, recipe.temperature_shift_h):
            if abs(candidate.temperature_at(t) - recipe.temperature_at(t)) > self.temperature_degc + tolerance:
                return False
        feed = abs(candidate.feed_fraction_of_initial_volume_per_day - recipe.feed_fraction_of_initial_volume_per_day)
        return feed <= self.feed_per_day + tolerance and abs(candidate.harvest_h - recipe.harvest_h) <= self.harvest_h + tolerance


@dataclass(frozen=True)
class RecordOutcome:
    """One record's outcome, measured and as the fitted model ran it with the record's own inputs."""

    batch_id: str
    at_h: float
    """The last titer result's draw."""
    measured_score_g_per_day: float
    fitted_score_g_per_day: float


@dataclass(frozen=True)
class RankingCheck:
    outcomes: tuple[RecordOutcome, ...]
    correlation: float
    """Spearman rank correlation of fitted against measured (NaN: fewer than two records with an outcome)."""
    passed: bool
    reason: str
    """Why it failed (empty when it passed)."""
    chance: float
    """How often a model with no skill at ranking would reach the threshold over this many records (:func:`chance_of_passing`)."""
    excluded: tuple[str, ...] = ()
    """Records left out of the ranking, each with why (another scale, reactor, medium or harvest time: outcomes that differ for that)."""
    misranked: bool = False
    """The records sufficed to rank, and the model was not shown to rank them right (its correlation fell short; not merely too few
    or too alike to tell)."""


@dataclass(frozen=True)
class RecipeForecast:
    recipe: RecipeConfig
    score_g_per_day: float
    harvest_h: float
    feasible: bool
    why_not: str
    """The first specification the forecast breaks (empty when feasible)."""


@dataclass(frozen=True)
class RecipeProposal:
    """What the model proposes for the next batch; ``recipe`` is None where it proposes nothing (``reason`` says why)."""

    recipe: RecipeConfig | None
    ranking: RankingCheck
    baseline: RecipeForecast | None
    """The model's forecast of the batch's own recipe."""
    best: RecipeForecast | None
    """The best feasible recipe the search found (also when its gain is too small)."""
    bounds: dict[str, tuple[float, float]]
    forecasts: int
    reason: str
    settings: ProposalSettings
    """The settings the proposal was made with (its margins are the report's)."""
    band: RecipeBand | None = None
    """The recipe band searched besides the records' recipes (None: the records' alone)."""
    region: str = ""
    """Where the proposed recipe lies: in the recipe band, or near a recipe a record ran (empty when nothing is proposed)."""

    @property
    def predicted_gain_fraction(self) -> float:
        return gain_fraction(self.best, self.baseline)

    def changes(self, recipe: RecipeConfig) -> dict[str, tuple[float, float]]:
        """Field → (the batch's value, the proposed one), where they differ."""
        return recipe_changes(recipe, self.recipe) if self.recipe is not None else {}


def gain_fraction(best: RecipeForecast | None, baseline: RecipeForecast | None) -> float:
    """How much more the model forecasts for ``best`` than for ``baseline`` (NaN without both, or without a baseline score)."""
    if best is None or baseline is None or baseline.score_g_per_day <= 0.0:
        return math.nan
    return best.score_g_per_day / baseline.score_g_per_day - 1.0


def recipe_changes(old: RecipeConfig, new: RecipeConfig) -> dict[str, tuple[float, float]]:
    """Varied field → (``old``'s value, ``new``'s), where they differ."""
    return {name: (getattr(old, name), getattr(new, name)) for name in VARIED if getattr(old, name) != getattr(new, name)}


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size)
    ranks[order] = np.arange(values.size, dtype=float)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (NaN for fewer than two pairs or a constant series)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size < 2 or x.size != y.size:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    if np.ptp(rx) == 0.0 or np.ptp(ry) == 0.0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def chance_of_passing(n: int, threshold: float) -> float:
    """The probability that ``n`` outcomes ranked at random reach a rank correlation of ``threshold``: exact up to 8 (every order
    counted), else the normal approximation of Spearman's null distribution (sd 1/√(n − 1))."""
    if n < 2:
        return 1.0
    if n <= 8:
        denominator = n * (n * n - 1)
        reached = sum(1 for order in itertools.permutations(range(n)) if 1.0 - 6.0 * sum((i - j) ** 2 for i, j in enumerate(order)) / denominator >= threshold - 1e-12)
        return reached / math.factorial(n)
    return 0.5 * math.erfc(threshold * math.sqrt(n - 1) / math.sqrt(2.0))


def record_outcome(record: BatchRecord, fit: BatchFit) -> RecordOutcome | None:
    """The record's product at its last titer result, measured and fitted, per day of occupancy to then; None without a titer or a volume then."""
    times, titers = record.lab_series("titer_g_per_l")
    volume = record.online.signal("volume_l")
    good = np.isfinite(volume)
    if times.size == 0 or not good.any() or "titer_g_per_l" not in fit.fitted:
        return None
    at_h = float(times[-1])
    volume_l = float(np.interp(at_h, record.online.time_h[good], volume[good]))
    fitted_titer = float(np.interp(at_h, fit.time_h, fit.fitted["titer_g_per_l"]))
    turnaround = record.batch.economics.turnaround_days
    return RecordOutcome(
        batch_id=record.batch_id,
        at_h=at_h,
        measured_score_g_per_day=float(batch_score_g_per_day(float(titers[-1]) * volume_l, at_h, turnaround)),
        fitted_score_g_per_day=float(batch_score_g_per_day(fitted_titer * volume_l, at_h, turnaround)),
    )


def _incomparable(record: BatchRecord, batch: BatchConfig, settings: ProposalSettings) -> str:
    """Why ``record``'s outcome cannot be ranked beside the others for ``batch`` (empty: it can): outcomes at another scale, in
    another size of reactor or medium, or scored otherwise differ for that, not for their recipes. (Pumps and setpoint ranges
    bound what a recipe may ask, which the search checks per candidate; they do not change an outcome.)"""
    theirs = record.batch
    volume, ours = theirs.inoculation.volume_l, batch.inoculation.volume_l
    if abs(volume - ours) > settings.volume_tolerance * ours:
        return f"{record.batch_id}: inoculated at {volume:g} L, the batch file at {ours:g} L"
    reactor, ours_reactor = theirs.equipment.max_working_volume_l, batch.equipment.max_working_volume_l
    if abs(reactor - ours_reactor) > settings.volume_tolerance * ours_reactor:
        return f"{record.batch_id}: a reactor of {reactor:g} L working volume, the batch file's {ours_reactor:g} L"
    for name in ("media", "economics"):  # what the culture is fed and how its outcome is scored
        if getattr(theirs, name) != getattr(batch, name):
            return f"{record.batch_id}: another {name} block than the batch file's"
    return ""


def ranking_check(records: Sequence[BatchRecord], calibration: CalibrationResult, batch: BatchConfig, settings: ProposalSettings) -> RankingCheck:
    """Does the fitted model order the records' outcomes as they happened? (item 1 of the module's description)

    Only records comparable with ``batch`` are ranked (:func:`_incomparable`), and only those whose last titer result was drawn
    within ``harvest_tolerance_h`` of the others' median: the outcomes then differ by their recipes, not by a scale or a harvest
    time that both the measured and the fitted outcome share. ``min_records`` counts distinct recipes.
    """
    fits = {fit.batch_id: fit for fit in calibration.batches}
    excluded: list[str] = []
    candidates: list[tuple[BatchRecord, RecordOutcome]] = []
    for record in records:
        why = _incomparable(record, batch, settings) if record.batch_id in fits else f"{record.batch_id}: not in the calibration"
        outcome = record_outcome(record, fits[record.batch_id]) if not why else None
        if not why and outcome is None:
            why = f"{record.batch_id}: no titer result or volume"
        if why:
            excluded.append(why)
        elif outcome is not None:
            candidates.append((record, outcome))
    if candidates:
        median_h = float(np.median([outcome.at_h for _, outcome in candidates]))
        for record, outcome in list(candidates):
            if abs(outcome.at_h - median_h) > settings.harvest_tolerance_h:
                excluded.append(f"{record.batch_id}: last titer result at {outcome.at_h:g} h, the records' median at {median_h:g} h")
                candidates.remove((record, outcome))
    outcomes = tuple(outcome for _, outcome in candidates)
    recipes = len({record.batch.recipe for record, _ in candidates})
    measured = [o.measured_score_g_per_day for o in outcomes]
    correlation = spearman(measured, [o.fitted_score_g_per_day for o in outcomes])
    chance = chance_of_passing(len(outcomes), settings.min_rank_correlation)

    def refused(reason: str) -> RankingCheck:
        return RankingCheck(outcomes, correlation, False, reason, chance, tuple(excluded))

    if recipes < settings.min_records:
        left_out = f" ({len(excluded)} left out: {'; '.join(excluded)})" if excluded else ""
        return refused(f"{recipes} comparable records of distinct recipes with a titer result{left_out}; the ranking check needs {settings.min_records}")
    spread = (max(measured) - min(measured)) / max(float(np.mean(measured)), 1e-9)
    if spread < settings.min_outcome_spread:
        return refused(
            f"the records' outcomes differ by {100 * spread:.1f} % best to worst, below {100 * settings.min_outcome_spread:.0f} %: too alike to check how the model ranks them"
        )
    if not correlation >= settings.min_rank_correlation - 1e-9:  # NaN fails too; 1e-9: ρ = 0.8 of 5 ranks comes out as 0.7999999999999999
        reason = f"the model ranks the records' outcomes with a rank correlation of {correlation:+.2f} to the measured ones, below {settings.min_rank_correlation:+.2f}"
        return RankingCheck(outcomes, correlation, False, reason, chance, tuple(excluded), misranked=True)
    return RankingCheck(outcomes, correlation, True, "", chance, tuple(excluded))


def misranking(records: Sequence[BatchRecord], calibration: CalibrationResult, batches: Sequence[BatchConfig], settings: ProposalSettings | None = None) -> RankingCheck | None:
    """The ranking check that withholds the envelope, over the records comparable with each of ``batches`` and with each record's
    own batch file (every group of comparable records, whatever their order): the first that found the model not ranking its
    records right; else, if none passed, the first (too few distinct recipes, or outcomes too alike, to rank); None when one passed
    and none found it wrong. An envelope is earned by a passed check, not by the absence of a failed one (measured: a model
    calibrated on a plant's own batches of one recipe kept its envelope, passed the monitor's checks and lost 12–19 % against the
    recipe on the held-out plant ``inhibitor``, docs/calibration.md §7 item 4)."""
    settings = settings or ProposalSettings()
    checks = [ranking_check(records, calibration, batch, settings) for batch in [*batches, *(record.batch for record in records)]]
    wrong = next((check for check in checks if check.misranked), None)
    if wrong is not None:
        return wrong
    if any(check.passed for check in checks):
        return None
    return checks[0] if checks else None


def with_reach_earned(parameters: CultureParameters, ranking: RankingCheck | None) -> CultureParameters:
    """The calibrated parameters as the NMPC may use them: a model not shown to rank its records' outcomes right (``ranking`` not
    passed: it ranked them wrong, or they were too few or too alike to rank) keeps no operating envelope.

    Its trust region is then the recipe band, the recipe's own neighbourhood, held at its start: the plant's next results confirm a
    model fitted to its records almost by construction, so they neither widen it nor earn reach (controller.trust.TrustRegion.widens,
    docs/trust-region.md). The envelope is where the records checked the model's trajectories; a model whose ranking of the
    records' outcomes falls short has not shown that its trajectories there make its decisions right. Measured: `cell_cycle`,
    calibrated on its development records and then on its own batches, passed the monitor's checks long enough to lose 2–36 %
    against the recipe in three batches of five with the envelope (ranked +0.26 to +0.54, then −0.05), and none in the recipe band
    (docs/calibration.md §7). Records too few or too alike to rank show nothing either: the held-out plant `inhibitor`'s model,
    calibrated on its own batches of one recipe, kept its envelope, passed the monitor's checks and lost 12–19 % against the
    recipe, batch after batch. An envelope is earned by a passed check.
    """
    if ranking is None or ranking.passed:
        return parameters
    warning = envelope_withheld_text(ranking)
    provenance = parameters.provenance
    update: dict[str, object] = {"envelope": ()}
    if provenance is not None:
        update["provenance"] = provenance.model_copy(update={"warnings": (*provenance.warnings, warning)})
    log.warning("calibration_envelope_withheld", reason=ranking.reason)
    return parameters.model_copy(update=update)


def envelope_withheld_text(ranking: RankingCheck) -> str:
    return (
        f"no operating envelope: the model was not shown to rank its records' outcomes right ({ranking.reason}); the NMPC plans in the"
        " recipe band, held at its start (docs/calibration.md §7, item 4)"
    )


def search_bounds(records: Sequence[BatchRecord], batch: BatchConfig, settings: ProposalSettings, band: RecipeBand | None = None) -> dict[str, tuple[float, float]]:
    """Field → (lowest, highest) value the search may give it: what the records' recipes ran, with the margins, joined with the
    ``band`` around the batch file's recipe (both hold that recipe's value, so together they are one interval), within the equipment."""
    recipes = [record.batch.recipe for record in records] + [batch.recipe]
    equipment = batch.equipment
    margins = {"temperature_initial_degc": settings.temperature_margin_degc, "temperature_shifted_degc": settings.temperature_margin_degc}
    feeds = [float(recipe.feed_fraction_of_initial_volume_per_day) for recipe in recipes]
    margins["feed_fraction_of_initial_volume_per_day"] = settings.feed_margin_relative * (max(feeds) - min(feeds))
    around = band.bounds(batch.recipe) if band is not None else {}
    limits = {
        "temperature_initial_degc": (equipment.temperature_min_degc, equipment.temperature_max_degc),
        "temperature_shifted_degc": (equipment.temperature_min_degc, equipment.temperature_max_degc),
        "feed_fraction_of_initial_volume_per_day": (0.0, equipment.feed_rate_max_lph * 24.0 / batch.inoculation.volume_l),
        "temperature_shift_h": (-math.inf, math.inf),
        "harvest_h": (-math.inf, batch.limits.latest_harvest_h),
    }
    bounds: dict[str, tuple[float, float]] = {}
    for name in VARIED:
        values = [float(getattr(recipe, name)) for recipe in recipes]
        low, high = min(values) - margins.get(name, 0.0), max(values) + margins.get(name, 0.0)
        if name in around:
            low, high = min(low, around[name][0]), max(high, around[name][1])
        bounds[name] = (max(low, limits[name][0]), min(high, limits[name][1]))
    return bounds


def steps_from_recipes(recipe: RecipeConfig, recipes: Sequence[RecipeConfig], steps: dict[str, float]) -> float:
    """Grid steps from ``recipe`` to the nearest of ``recipes``: in the field furthest from it (each field in its own steps)."""
    return min(max(abs(float(getattr(recipe, name)) - float(getattr(other, name))) / steps[name] for name in VARIED) for other in recipes)


def _grid(low: float, high: float, step: float, keep: float) -> list[float]:
    """``low`` to ``high`` in ``step``s, both ends (rounded inwards to 6 decimals) and ``keep`` (the batch's own value, where inside) included."""
    low_in, high_in = math.ceil(low * 1e6) / 1e6, math.floor(high * 1e6) / 1e6
    values = {min(max(round(float(v), 6), low_in), high_in) for v in np.arange(low, high + 1e-9, step)} | {low_in, high_in}
    if low - 1e-9 <= keep <= high + 1e-9:
        values.add(float(keep))
    return sorted(values)


class RecipeForecaster:
    """The model's forecast of a whole batch under a recipe of the platform family, from the batch's inoculation."""

    def __init__(self, parameters: CultureParameters, batch: BatchConfig, mpc: MpcConfig, settings: ProposalSettings, model: CultureModel | None = None) -> None:
        self._model = model or CultureModel()
        self._batch = batch
        self._mpc = mpc
        self._settings = settings
        # Every forecast starts from the same belief at inoculation; a forecast leaves the estimator as it was (controller.forecast).
        self._estimator = ExtendedKalmanEstimator.from_batch(self._model, batch, parameter_vector(parameters, batch.media))
        self._kernel = ForecastKernel(self._estimator, model=self._model)
        self.count = 0
        """Forecasts run (a recipe asked for again is answered from :attr:`_seen`)."""
        self._seen: dict[RecipeConfig, RecipeForecast] = {}

    def __call__(self, recipe: RecipeConfig) -> RecipeForecast:
        if recipe not in self._seen:
            self._seen[recipe] = self._judge(recipe)
        return self._seen[recipe]

    def _judge(self, recipe: RecipeConfig) -> RecipeForecast:
        try:  # the candidate must make a valid batch file: within the pump, the setpoint range, the latest harvest
            BatchConfig.model_validate({**self._batch.model_dump(), "recipe": recipe.model_dump()})
        except ValidationError as error:
            return RecipeForecast(recipe, math.nan, math.nan, False, f"not a valid batch file: {error.errors()[0]['msg']}")
        try:
            return self._forecast(recipe)
        except (ForecastDivergedError, ForecastInputError) as error:
            return RecipeForecast(recipe, math.nan, math.nan, False, f"the forecast failed: {error}")

    def _forecast(self, recipe: RecipeConfig) -> RecipeForecast:
        batch, settings = self._batch, self._settings
        run = recipe_schedule(PlatformRecipe(recipe, batch.media, batch.equipment, batch.inoculation.volume_l), media=batch.media, glucose_delivered_g=0.0).begin(0.0)
        planned_h = min(recipe.harvest_h, batch.limits.latest_harvest_h)
        result = forecast(self._estimator, StartedSchedule(run), until_h=planned_h, kernel=self._kernel)
        self.count += 1
        harvest = result.at_harvest(batch.economics.turnaround_days, harvest_h=planned_h if run.harvest_due_h is None else min(planned_h, run.harvest_due_h))
        k = result.index_at(harvest.harvest_time_h)
        glucose_low = float(np.min(result.state_mean[STATE_INDEX["glucose"], : k + 1]))
        osmolality_high = float(np.max(result.output_mean["osmolality"][: k + 1]))
        viability = float(result.output_mean["viability"][k])
        quality = float(result.state_mean[STATE_INDEX["galactosylated_titer"], k]) / max(harvest.titer_g_per_l, 1e-9)
        checks = (
            (glucose_low >= batch.limits.glucose_min_g_per_l + settings.glucose_margin_g_per_l, f"glucose falls to {glucose_low:.2f} g/L"),
            (osmolality_high <= batch.limits.osmolality_max_mosm_per_kg, f"osmolality reaches {osmolality_high:.0f} mOsm/kg"),
            (viability >= self._mpc.viability_at_harvest_min_pct + settings.viability_margin_pct, f"viability at harvest {viability:.1f} %"),
            (quality >= self._mpc.galactosylated_fraction_min + settings.quality_margin, f"galactosylated fraction at harvest {quality:.3f}"),
        )
        why_not = next((text for ok, text in checks if not ok), "")
        return RecipeForecast(recipe=recipe, score_g_per_day=harvest.score_g_per_day, harvest_h=harvest.harvest_time_h, feasible=not why_not, why_not=why_not)


def _coordinate_search(
    start: RecipeForecast, bounds: dict[str, tuple[float, float]], steps: dict[str, float], sweeps: int, allowed: Callable[[RecipeConfig], bool], forecaster: RecipeForecaster
) -> RecipeForecast:
    """The best feasible recipe a coordinate search from ``start`` finds (``start`` itself where nothing beats it, feasible or not)."""
    best, current = start, start.recipe
    for _ in range(sweeps):
        improved = False
        for name in VARIED:
            low, high = bounds[name]
            for value in _grid(low, high, steps[name], float(getattr(current, name))):
                if math.isclose(value, getattr(current, name), abs_tol=1e-6):
                    continue
                recipe = current.model_copy(update={name: value})
                if not allowed(recipe):
                    continue
                candidate = forecaster(recipe)
                if candidate.feasible and (not best.feasible or candidate.score_g_per_day > best.score_g_per_day):
                    best, improved = candidate, True
            current = best.recipe
        if not improved:
            break
    return best


def propose_recipe(
    records: Sequence[BatchRecord],
    calibration: CalibrationResult,
    batch: BatchConfig,
    *,
    mpc: MpcConfig | None = None,
    settings: ProposalSettings | None = None,
    model: CultureModel | None = None,
    trust: TrustRegionConfig | None = None,
) -> RecipeProposal:
    """The recipe the calibrated model proposes for the next batch of ``batch`` (``recipe`` None: none, and ``reason`` says why).

    ``trust``: the runtime's trust region, whose recipe band is searched too (``within_recipe_band``); None: the defaults."""
    settings = settings or ProposalSettings()
    band = RecipeBand.of(trust or TrustRegionConfig()) if settings.within_recipe_band else None
    ranking = ranking_check(records, calibration, batch, settings)
    bounds = search_bounds(records, batch, settings, band)
    if not ranking.passed:
        log.info("recipe_not_proposed", reason=ranking.reason)
        return RecipeProposal(None, ranking, None, None, bounds, 0, ranking.reason, settings, band)
    forecaster = RecipeForecaster(calibration.parameters, batch, mpc or MpcConfig(), settings, model)
    steps = settings.grid_steps
    baseline = forecaster(batch.recipe)
    if not baseline.feasible:
        # A recipe of less forecast product could look better only for breaking nothing in the model's forecast: no ground to change it.
        reason = f"the model forecasts that the batch file's own recipe breaks a margin ({baseline.why_not}): review the model and the recipe first"
        log.info("recipe_not_proposed", reason=reason)
        return RecipeProposal(None, ranking, baseline, None, bounds, forecaster.count, reason, settings, band)
    ran = [record.batch.recipe for record in records] + [batch.recipe]

    box = search_bounds(records, batch, settings)  # the records' own box: the band widens the grid, not what is near a record

    def near_a_record(recipe: RecipeConfig) -> bool:
        inside = all(box[name][0] - 1e-9 <= float(getattr(recipe, name)) <= box[name][1] + 1e-9 for name in VARIED)
        return inside and steps_from_recipes(recipe, ran, steps) <= settings.max_steps_from_a_record + 1e-9

    def in_band(recipe: RecipeConfig) -> bool:
        return band is not None and band.holds(recipe, batch.recipe)

    # Two regions, each searched on its own: whole recipes in the band, from the batch file's recipe; and recipes near those the
    # records ran, from the batch file's and from each record's (a coordinate search ends at the first local optimum on its way:
    # measured on amino_acid, from the batch's recipe alone +35 % where a record's led to +57 %). Never a mix of the two (a
    # record's temperatures with the band's feed), and a search allowed both would leave the band at its first step towards a record.
    # Each on its own grid, whose edges are the region's (the records' box grows by its margins batch by batch: a grid over the joined
    # box would miss its edge, and a recipe could no longer walk with it).
    starts = dict.fromkeys([batch.recipe, *(batch.recipe.model_copy(update={name: getattr(recipe, name) for name in VARIED}) for recipe in ran)])
    searches = [(start, box, near_a_record) for start in starts]
    if band is not None:
        searches.insert(0, (batch.recipe, search_bounds([], batch, settings, band), in_band))
    best = baseline
    for start, grid, allowed in searches:
        found = _coordinate_search(forecaster(start), grid, steps, settings.sweeps, allowed, forecaster)
        if found.feasible and found.score_g_per_day > best.score_g_per_day:
            best = found
    gain = gain_fraction(best, baseline)
    if best.recipe == batch.recipe or not gain >= settings.min_gain_fraction:
        reason = f"the best recipe the model finds gains {100 * gain:.1f} % on the batch's own in its forecast, below {100 * settings.min_gain_fraction:.0f} %"
        log.info("recipe_not_proposed", reason=reason)
        return RecipeProposal(None, ranking, baseline, best, bounds, forecaster.count, reason, settings, band)
    region = (
        "in the recipe band around the batch's recipe"
        if in_band(best.recipe)
        else (f"within {settings.max_steps_from_a_record} grid steps of a recipe the records or the batch file ran")
    )
    log.info("recipe_proposed", gain_pct=round(100 * gain, 1), forecasts=forecaster.count, rank_correlation=round(ranking.correlation, 2), region=region)
    return RecipeProposal(best.recipe, ranking, baseline, best, bounds, forecaster.count, "", settings, band, region)
