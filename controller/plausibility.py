"""Physical cross-checks between signals that each passed their own data-quality checks.

:mod:`controller.quality` judges every signal alone: a mis-scaled volume tag
(scale 0.1 in the tag map) reads a steady, finite, in-range, moving value and
passes. Only another signal can contradict it. A :class:`PlausibilityChecker`
(one per batch) cross-checks every cycle's observation:

- **Volume balance**: the working volume is the inoculation volume plus
  everything pumped in (nutrient feed, glucose feed, base) minus what left
  (samples, evaporation). The load cell must agree with that within
  :attr:`PlausibilityConfig.volume_tolerance_l` or
  :attr:`~PlausibilityConfig.volume_tolerance_fraction` of the volume; it may
  read lower by a further :attr:`~PlausibilityConfig.volume_loss_allowance_l_per_day`
  per day of culture.
- **Capacitance against OUR**: both follow the viable biomass, so their ratio
  moves only as fast as the cells' physiology (growth phase, temperature).
  The batch's own recent ratio is the reference, not any model coefficient:
  after a warm-up, a ratio that departs from the median of the last hours at
  a similar culture temperature by more than a factor (a probe's scale jumps),
  or one signal that rises strongly over a day at constant temperature while
  the other stays flat (a probe stuck at a level with live noise) is a
  contradiction. Only a rise is judged: a fall of OUR alone is physiology
  (growth stopping, cooling), while biomass that doubles in a day is growing
  and respires more in total. Readings that contradict are not learned, so a lasting fault
  stays reported instead of becoming the new reference.

A signal missing from :attr:`CycleObservation.online` (its quality check
failed) is not checked. What a contradiction means for the cycle (a fault, no
writes) is the runtime's decision; the checker only reports.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

from pydantic import Field, model_validator

from controller.config import BatchConfig
from controller.nmpc import CycleObservation
from plant_models.config_loading import FrozenConfig

HOURS_PER_DAY = 24.0


class ContradictionCode(StrEnum):
    """Which cross-check found the contradiction (the alarm's name in the runtime)."""

    VOLUME_BALANCE = "volume_balance"
    CAPACITANCE_OUR = "capacitance_our"


@dataclass(frozen=True)
class Contradiction:
    """Signals that cannot all be right: the numbers are in :attr:`message`."""

    code: ContradictionCode
    signals: tuple[str, ...]
    """The PLC signals involved."""
    message: str
    """What was measured, what was expected and the tolerance, with units."""
    measured: float
    expected: float
    tolerance: float


class PlausibilityConfig(FrozenConfig):
    """Tolerances of the cross-checks. The defaults suit a stirred tank of 50 L to 20 m³ with load cells, totalised pumps and off-gas OUR."""

    volume_tolerance_l: float = Field(default=20.0, gt=0.0, description="the volume balance always tolerates this disagreement (load-cell accuracy, pump calibration) [L]")
    volume_tolerance_fraction: float = Field(
        default=0.015,
        gt=0.0,
        le=0.5,
        description="and this fraction of the expected volume, when larger: load cells and feed pumps are good to about 0.5-1 % each [-]",
    )
    volume_loss_allowance_l_per_day: float = Field(
        default=2.0,
        ge=0.0,
        description="the load cell may read below the balance by this much more per day of culture: samples and evaporation into the off-gas [L/day]",
    )
    base_rate_allowance_lph: float = Field(
        default=0.5,
        ge=0.0,
        description="while PV.BaseTotal is unusable its last value stands in, and the load cell may read above the balance by this much more per hour since [L/h]",
    )
    capacitance_floor_pf_per_cm: float = Field(default=1.0, ge=0.0, description="capacitance below this is too close to the probe's noise and background for a ratio [pF/cm]")
    our_floor_mmol_per_l_h: float = Field(default=0.5, ge=0.0, description="OUR below this is too close to the off-gas analysers' resolution for a ratio [mmol/L/h]")
    ratio_warmup_cycles: int = Field(default=12, ge=1, description="cycles with both signals above their floors that are only learned before the capacitance/OUR ratio is judged")
    ratio_reference_window_h: float = Field(
        default=12.0, gt=0.0, description="the reference ratio is the median of the accepted ratios of this many hours before the last accepted one [h]"
    )
    ratio_reference_min_samples: int = Field(default=4, ge=1, description="fewer accepted ratios at the current temperature than this: no reference, the ratio is learned")
    ratio_current_cycles: int = Field(default=3, ge=1, description="the ratio judged is the median of this many latest cycles (one spike is not a contradiction)")
    ratio_factor: float = Field(
        default=1.7,
        gt=1.0,
        description="capacitance/OUR more than this factor above or below its reference is a contradiction (simulated batches at constant temperature: within 1.3) [-]",
    )
    temperature_band_degc: float = Field(
        default=1.0,
        gt=0.0,
        description="ratios count as comparable only within this culture temperature of each other: respiration per cell follows temperature, the biovolume does not [°C]",
    )
    movement_window_h: float = Field(default=24.0, gt=0.0, description="window of the one-rises-the-other-does-not check [h]")
    movement_factor: float = Field(
        default=1.6,
        gt=1.0,
        description=(
            "one signal rising by more than this factor over the window while the other stays still is a contradiction "
            "(simulated batches: none above 1.4); respiration per cell falls by up to 1.7 when growth stops, so falls are not judged [-]"
        ),
    )
    still_factor: float = Field(default=1.05, gt=1.0, description="the other changing by less than this factor, either way, counts as still [-]")

    @model_validator(mode="after")
    def _still_below_moving(self) -> PlausibilityConfig:
        if self.still_factor >= self.movement_factor:
            raise ValueError("still_factor must be below movement_factor")
        return self


@dataclass(frozen=True)
class _RatioSample:
    time_h: float
    capacitance_pf_per_cm: float
    our_mmol_per_l_h: float
    temperature_degc: float

    @property
    def ratio(self) -> float:
        return self.capacitance_pf_per_cm / self.our_mmol_per_l_h


VOLUME_SIGNALS = ("PV.Volume", "PV.FeedTotal", "PV.GlucoseFeedTotal", "PV.BaseTotal")
RATIO_SIGNALS = ("PV.Capacitance", "PV.OUR")


class PlausibilityChecker:
    """Cross-checks a batch's observations cycle after cycle; one per batch (the ratio check learns the batch's own history)."""

    def __init__(self, batch: BatchConfig, config: PlausibilityConfig | None = None) -> None:
        self.batch = batch
        self.config = config or PlausibilityConfig()
        self._last_base: tuple[float, float] | None = None
        """(process time, PV.BaseTotal) last seen."""
        self._ratio_history: deque[_RatioSample] = deque()
        self._recent: deque[_RatioSample] = deque(maxlen=self.config.ratio_current_cycles)
        self._ratio_cycles_seen = 0
        self._ratio_fault: Contradiction | None = None
        """The ratio contradiction in force: it holds until the ratio is back within the band of a comparable reference, or :meth:`relearn`."""

    def check(self, observation: CycleObservation) -> tuple[Contradiction, ...]:
        """The contradictions in this cycle's observation; empty when every cross-check that could run agrees."""
        found = [self._volume_balance(observation), *self._capacitance_our(observation)]
        return tuple(contradiction for contradiction in found if contradiction is not None)

    def expected_volume_l(self, observation: CycleObservation) -> float:
        """The working volume the balance gives: inoculation + nutrient feed + glucose feed + base (the last base total seen when it is missing).

        Losses (samples, evaporation) are not subtracted: the figure is an
        upper estimate, the one to hold against the working volume limit.
        """
        base_l, _ = self._base_total(observation)
        return self.batch.inoculation.volume_l + observation.feed_total_l + observation.glucose_feed_total_l + base_l

    def relearn(self) -> None:
        """Forget the capacitance/OUR history (after a probe is repaired or recalibrated): the ratio check warms up again."""
        self._ratio_history.clear()
        self._recent.clear()
        self._ratio_cycles_seen = 0
        self._ratio_fault = None

    # ------------------------------------------------------------ volume balance

    def _base_total(self, observation: CycleObservation) -> tuple[float, float]:
        """(base total to use [L], hours since it was read)."""
        base = observation.online.get("base_total_l")
        if base is not None and math.isfinite(base):
            if self._last_base is None or observation.process_time_h >= self._last_base[0]:
                self._last_base = (observation.process_time_h, base)
            return base, 0.0
        if self._last_base is None:
            return 0.0, max(0.0, observation.process_time_h)
        time_h, base = self._last_base
        return base, max(0.0, observation.process_time_h - time_h)

    def _volume_balance(self, observation: CycleObservation) -> Contradiction | None:
        measured = observation.online.get("volume_l")
        if measured is None or not math.isfinite(measured):
            return None
        cfg = self.config
        _, base_age_h = self._base_total(observation)
        expected = self.expected_volume_l(observation)
        tolerance = max(cfg.volume_tolerance_l, cfg.volume_tolerance_fraction * expected)
        days = max(0.0, observation.process_time_h) / HOURS_PER_DAY
        low = expected - tolerance - cfg.volume_loss_allowance_l_per_day * days
        high = expected + tolerance + cfg.base_rate_allowance_lph * base_age_h
        if low <= measured <= high:
            return None
        side, bound = ("above", high) if measured > high else ("below", low)
        base_note = f", base total {base_age_h:.0f} h old" if base_age_h > 0.0 else ""
        message = (
            f"PV.Volume reads {measured:.1f} L, {abs(measured - expected):.1f} L {side} the balance's {expected:.1f} L "
            f"(inoculation {self.batch.inoculation.volume_l:.1f} + feed {observation.feed_total_l:.1f} + glucose feed "
            f"{observation.glucose_feed_total_l:.1f} + base {expected - self.batch.inoculation.volume_l - observation.feed_total_l - observation.glucose_feed_total_l:.1f} L"
            f"{base_note}); plausible range [{low:.1f}, {high:.1f}] L (tolerance {tolerance:.1f} L, losses up to "
            f"{cfg.volume_loss_allowance_l_per_day * days:.1f} L); the nearest bound {bound:.1f} L"
        )
        return Contradiction(ContradictionCode.VOLUME_BALANCE, VOLUME_SIGNALS, message, measured=measured, expected=expected, tolerance=abs(bound - expected))

    # --------------------------------------------------------- capacitance / OUR

    def _capacitance_our(self, observation: CycleObservation) -> list[Contradiction | None]:
        cfg = self.config
        capacitance = observation.online.get("capacitance_pf_per_cm")
        our = observation.online.get("our_mmol_per_l_h")
        if capacitance is None or our is None or not (math.isfinite(capacitance) and math.isfinite(our)):
            return []
        if capacitance < cfg.capacitance_floor_pf_per_cm or our < cfg.our_floor_mmol_per_l_h:
            return []
        temperature = observation.online.get("temperature_degc", observation.applied.temperature_degc)
        now = _RatioSample(observation.process_time_h, capacitance, our, temperature)
        self._drop_old(now.time_h)
        gap_h = self.batch.cycle_period_h * (cfg.ratio_current_cycles + 0.5)
        while self._recent and now.time_h - self._recent[0].time_h > gap_h:
            self._recent.popleft()
        self._recent.append(now)
        self._ratio_cycles_seen += 1
        if self._ratio_cycles_seen <= cfg.ratio_warmup_cycles:
            self._ratio_history.append(now)
            return []
        found = [self._ratio_departs(now), self._one_still(now)]
        if not any(found):
            self._ratio_history.append(now)
        return found

    def _drop_old(self, now_h: float) -> None:
        """Keep what the reference and the movement window need, anchored at the last accepted sample so a lasting fault keeps its reference."""
        if not self._ratio_history:
            return
        keep_h = max(self.config.ratio_reference_window_h, self.config.movement_window_h) + 3.0 * self.batch.cycle_period_h
        anchor_h = self._ratio_history[-1].time_h
        while self._ratio_history and self._ratio_history[0].time_h < min(now_h, anchor_h) - keep_h:
            self._ratio_history.popleft()

    def _ratio_departs(self, now: _RatioSample) -> Contradiction | None:
        cfg = self.config
        if not self._ratio_history:
            return None
        anchor_h = self._ratio_history[-1].time_h
        reference = [
            sample.ratio
            for sample in self._ratio_history
            if sample.time_h > anchor_h - cfg.ratio_reference_window_h and abs(sample.temperature_degc - now.temperature_degc) <= cfg.temperature_band_degc
        ]
        current = statistics.median(sample.ratio for sample in self._recent)
        if len(reference) < cfg.ratio_reference_min_samples:
            if self._ratio_fault is None:
                return None
            # No comparable reference (the temperature moved): a contradiction in force is not learned away.
            fault = self._ratio_fault
            message = (
                f"capacitance/OUR is {current:.3g} pF/cm per mmol/L/h at {now.temperature_degc:.1f} °C, no accepted ratio within "
                f"{cfg.temperature_band_degc:g} °C to compare with; the contradiction found before holds ({fault.message})"
            )
            return Contradiction(ContradictionCode.CAPACITANCE_OUR, RATIO_SIGNALS, message, measured=current, expected=fault.expected, tolerance=cfg.ratio_factor)
        expected = statistics.median(reference)
        factor = current / expected
        if 1.0 / cfg.ratio_factor <= factor <= cfg.ratio_factor:
            self._ratio_fault = None
            return None
        message = (
            f"capacitance/OUR is {current:.3g} pF/cm per mmol/L/h (median of the last {len(self._recent)} cycles: PV.Capacitance "
            f"{now.capacitance_pf_per_cm:.3g} pF/cm, PV.OUR {now.our_mmol_per_l_h:.3g} mmol/L/h now), {factor:.2f} times its reference "
            f"{expected:.3g} (median of {len(reference)} accepted cycles at {now.temperature_degc:.1f} ± {cfg.temperature_band_degc:g} °C); "
            f"plausible within a factor {cfg.ratio_factor:g}"
        )
        self._ratio_fault = Contradiction(ContradictionCode.CAPACITANCE_OUR, RATIO_SIGNALS, message, measured=current, expected=expected, tolerance=cfg.ratio_factor)
        return self._ratio_fault

    def _one_still(self, now: _RatioSample) -> Contradiction | None:
        cfg = self.config
        start_h = now.time_h - cfg.movement_window_h
        window = [sample for sample in self._ratio_history if sample.time_h >= start_h - 2.0 * self.batch.cycle_period_h]
        then = [sample for sample in window if sample.time_h <= start_h]
        if not then or any(abs(sample.temperature_degc - now.temperature_degc) > cfg.temperature_band_degc for sample in window):
            return None
        then = then[-cfg.ratio_current_cycles :]
        capacitance_factor = statistics.median(s.capacitance_pf_per_cm for s in self._recent) / statistics.median(s.capacitance_pf_per_cm for s in then)
        our_factor = statistics.median(s.our_mmol_per_l_h for s in self._recent) / statistics.median(s.our_mmol_per_l_h for s in then)
        moves = {"PV.Capacitance": capacitance_factor, "PV.OUR": our_factor}
        moving = max(moves, key=lambda name: moves[name])
        still = min(moves, key=lambda name: moves[name])
        if moves[moving] < cfg.movement_factor or abs(math.log(moves[still])) > math.log(cfg.still_factor):
            return None
        message = (
            f"{moving} rose by a factor {moves[moving]:.2f} in {now.time_h - then[-1].time_h:.0f} h at {now.temperature_degc:.1f} °C while "
            f"{still} changed by a factor {moves[still]:.3f}: both follow the viable biomass; one rising by more than {cfg.movement_factor:g} "
            f"while the other stays within {cfg.still_factor:g} suggests a stuck {still}"
        )
        return Contradiction(ContradictionCode.CAPACITANCE_OUR, (still, moving), message, measured=moves[still], expected=moves[moving], tolerance=cfg.still_factor)
