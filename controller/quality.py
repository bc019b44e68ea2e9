"""Data-quality checks: which of a scan's values the cycle may use, and whether it may run at all.

Every cycle's scan passes through one :class:`DataQualityChecker` before the
estimator sees it, in the runtime and in the in-process closed loop alike.
Per signal (``configs`` may tighten or loosen each check):

- **Bad** status (OPC UA StatusCode, Modbus quality bit): rejected.
- **NaN or ±Inf**: rejected.
- **Out of range**: outside the signal's plausible ``[low, high]``: rejected.
- **Stale**: a source timestamp older than ``stale_after_s`` wall seconds.
- **Frozen**: a signal that is never constant in a live culture (off-gas,
  capacitance) reads the same value, or the same source timestamp, for
  ``frozen_cycles`` cycles in a row: the probe or its transmitter has stopped.
- **Spike**: a step from the last accepted value beyond ``max_step`` (or
  ``max_step_relative``) in one cycle is rejected once; a second reading that
  confirms the new level is accepted (a real step, for example a probe
  recalibration, is not rejected forever).
- **Totals** (feed, glucose feed) must not decrease.

A *critical* signal (the batch clock, the feed totalisers, the setpoint
read-backs, the PLC's status) that fails makes the whole cycle fail: the
runtime then writes no setpoints. A lab result set counts as new only when
``Sample.Seq`` moves; a lab field that is Bad, non-finite or negative is
taken as not measured (the estimator's gate handles values that are merely
implausible, such as a typo ×10).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import Field, field_validator, model_validator

from controller.nmpc import CycleObservation
from controller.ports import ScannedValue
from controller.types import LAB_FIELDS, LabResult, Setpoints
from plant_models.config_loading import FieldError, FrozenConfig

ONLINE_SIGNALS: dict[str, str] = {
    "PV.OUR": "our_mmol_per_l_h",
    "PV.CER": "cer_mmol_per_l_h",
    "PV.Capacitance": "capacitance_pf_per_cm",
    "PV.Volume": "volume_l",
    "PV.Temperature": "temperature_degc",
    "PV.BaseTotal": "base_total_l",
}
"""PLC signal → the estimator's online measurement name."""
SAMPLE_SIGNALS: tuple[str, ...] = (
    "Sample.VCD",
    "Sample.Viability",
    "Sample.Glucose",
    "Sample.Lactate",
    "Sample.Glutamine",
    "Sample.Ammonia",
    "Sample.Titer",
    "Sample.Osmolality",
)
"""The lab result fields in :data:`~controller.types.LAB_FIELDS` order."""
SETPOINT_SIGNALS: tuple[str, ...] = ("SP.FeedRate", "SP.GlucoseRate", "SP.Temperature")
TOTAL_SIGNALS: tuple[str, ...] = ("PV.FeedTotal", "PV.GlucoseFeedTotal")
CYCLE_SIGNALS: tuple[str, ...] = ("Status.ProcessTime", "Status.Phase", *TOTAL_SIGNALS, *SETPOINT_SIGNALS)
"""Signals a cycle cannot run without (the batch clock and phase, the feed totals, the setpoint read-backs): always critical."""


class SignalCheck(FrozenConfig):
    low: float | None = Field(default=None, description="lowest plausible value, engineering units")
    high: float | None = Field(default=None, description="highest plausible value, engineering units")
    max_step: float | None = Field(default=None, gt=0.0, description="largest plausible change in one cycle, engineering units")
    max_step_relative: float | None = Field(default=None, gt=0.0, description="largest plausible change in one cycle, relative to the last accepted value")
    frozen_cycles: int | None = Field(default=None, ge=2, description="identical value or source timestamp this many cycles in a row means the signal has stopped")
    critical: bool = Field(default=False, description="if this signal fails, the cycle writes no setpoints")

    def outside(self, value: float) -> bool:
        """Whether ``value`` lies outside the plausible ``[low, high]``."""
        return (self.low is not None and value < self.low) or (self.high is not None and value > self.high)

    @model_validator(mode="after")
    def _ordered(self) -> SignalCheck:
        if self.low is not None and self.high is not None and self.low > self.high:
            raise FieldError("low", self.low, f"must not be above high ({self.high})")
        return self


def _default_checks() -> dict[str, SignalCheck]:
    live: dict[str, Any] = {"frozen_cycles": 4, "max_step_relative": 0.5}
    return {
        "Status.ProcessTime": SignalCheck(low=0.0, high=24.0 * 365.0, critical=True),
        "Status.Phase": SignalCheck(low=0, high=2, critical=True),
        "Status.RemoteEnabled": SignalCheck(critical=True),
        "Status.WatchdogTripped": SignalCheck(critical=True),
        "Sample.Seq": SignalCheck(critical=True),
        "PV.FeedTotal": SignalCheck(low=0.0, high=1.0e6, critical=True),
        "PV.GlucoseFeedTotal": SignalCheck(low=0.0, high=1.0e6, critical=True),
        "SP.FeedRate": SignalCheck(low=0.0, high=1.0e6, critical=True),
        "SP.GlucoseRate": SignalCheck(low=0.0, high=1.0e6, critical=True),
        "SP.Temperature": SignalCheck(low=0.0, high=60.0, critical=True),
        "PV.Temperature": SignalCheck(low=0.0, high=60.0, max_step=3.0),
        "PV.Volume": SignalCheck(low=0.0, high=1.0e6, max_step=100.0),
        "PV.BaseTotal": SignalCheck(low=0.0, high=1.0e6),
        "PV.OUR": SignalCheck(low=0.0, high=500.0, **live),
        "PV.CER": SignalCheck(low=0.0, high=500.0, **live),
        "PV.Capacitance": SignalCheck(low=0.0, high=2000.0, **live),
    }


class DataQualityConfig(FrozenConfig):
    stale_after_s: float = Field(default=900.0, gt=0.0, description="a source timestamp older than this (wall clock) is stale [s]")
    spike_floor: float = Field(default=1.0, ge=0.0, description="a relative spike limit never goes below this absolute change")
    signals: dict[str, SignalCheck] = Field(
        default_factory=_default_checks,
        description="per-signal checks, merged over the defaults: the fields given replace the default's, the others (critical among them) stay",
    )

    @field_validator("signals", mode="before")
    @classmethod
    def _merge_over_defaults(cls, given: Any) -> Any:
        if not isinstance(given, Mapping):
            return given
        merged: dict[str, Any] = dict(_DEFAULTS)
        for name, check in given.items():
            default = _DEFAULTS.get(name)
            if isinstance(check, SignalCheck):
                check = check.model_dump(include=check.model_fields_set)
            merged[name] = {**default.model_dump(exclude_unset=True), **check} if default is not None and isinstance(check, Mapping) else check
        return merged

    @model_validator(mode="after")
    def _cycle_signals_stay_critical(self) -> DataQualityConfig:
        for name in CYCLE_SIGNALS:
            if not self.signals[name].critical:
                raise FieldError(
                    f"signals.{name}.critical",
                    False,
                    f"must stay true: the cycle cannot run without {name} (critical signals: {', '.join(CYCLE_SIGNALS)})",
                )
        return self

    def check_of(self, name: str) -> SignalCheck | None:
        return self.signals.get(name)


_DEFAULTS = _default_checks()


@dataclass(frozen=True)
class QualityReport:
    """One scan, checked."""

    accepted: dict[str, float | int | bool | str]
    """Signals that passed, with their values."""
    problems: dict[str, str]
    """Signal → why it was rejected."""
    critical: tuple[str, ...]
    """Critical signals among the rejected: the cycle must not write setpoints."""
    lab_result: LabResult | None = None
    new_lab_seq: int | None = None

    @property
    def usable(self) -> bool:
        return not self.critical

    def observation(self) -> CycleObservation:
        """The estimator's and the controller's view (only when :attr:`usable`)."""
        if not self.usable:
            raise ValueError(f"critical signals failed their checks: {', '.join(self.critical)}")
        a = self.accepted
        missing = [name for name in CYCLE_SIGNALS if name not in a]
        if missing:
            reasons = ", ".join(f"{name} ({self.problems.get(name, 'not in the scan')})" for name in missing)
            raise ValueError(f"the cycle needs signals that were not accepted: {reasons}")
        feed_rate_lph, glucose_rate_lph, temperature_degc = (float(a[signal]) for signal in SETPOINT_SIGNALS)
        return CycleObservation(
            process_time_h=float(a["Status.ProcessTime"]),
            online={name: float(a[signal]) for signal, name in ONLINE_SIGNALS.items() if signal in a},
            feed_total_l=float(a["PV.FeedTotal"]),
            glucose_feed_total_l=float(a["PV.GlucoseFeedTotal"]),
            applied=Setpoints(feed_rate_lph, glucose_rate_lph, temperature_degc),
            lab_result=self.lab_result,
        )


@dataclass
class _Track:
    last_accepted: float | None = None
    last_raw: float | None = None
    spike_pending: bool = False
    same_count: int = 0
    last_stamp: datetime | None = None


@dataclass
class DataQualityChecker:
    """Checks scans cycle after cycle (it remembers what it accepted); one per batch."""

    config: DataQualityConfig = field(default_factory=DataQualityConfig)
    last_lab_seq: int = 0
    _tracks: dict[str, _Track] = field(default_factory=dict)

    def check(self, scan: Mapping[str, ScannedValue], *, wall_now: datetime | None = None) -> QualityReport:
        """Check one scan; ``wall_now`` (UTC) enables the stale-timestamp check for values that carry one."""
        accepted: dict[str, float | int | bool | str] = {}
        problems: dict[str, str] = {}
        for name, reading in scan.items():
            if name.startswith("Sample.") and name != "Sample.Seq":
                continue
            problem = self._problem(name, reading, wall_now)
            if problem is None:
                accepted[name] = reading.value
            else:
                problems[name] = problem
        for name in self._critical_names():
            if name not in scan:
                problems[name] = "missing from the scan"
        lab, seq = self._lab(scan, accepted, problems)
        critical = tuple(sorted(name for name in problems if (check := self.config.check_of(name)) is not None and check.critical))
        return QualityReport(accepted, problems, critical, lab, seq)

    def expect_at_least(self, signal: str, value: float) -> None:
        """A totaliser's last known value (from a resumed estimator): a reading below it fails as having gone back."""
        track = self._tracks.setdefault(signal, _Track())
        track.last_accepted = value

    def commit_lab(self, seq: int) -> None:
        """The cycle used the lab result ``seq``: the next one is new only when ``Sample.Seq`` moves again."""
        self.last_lab_seq = seq

    # ------------------------------------------------------------------ checks

    def _critical_names(self) -> list[str]:
        names = {**_DEFAULTS, **self.config.signals}
        return [name for name, check in names.items() if check.critical]

    def _problem(self, name: str, reading: ScannedValue, wall_now: datetime | None) -> str | None:
        if not reading.good:
            return "Bad status"
        value = reading.value
        check = self.config.check_of(name)
        if isinstance(value, bool | str):
            return None
        number = float(value)
        if not math.isfinite(number):
            return f"non-finite value {number!r}"
        if check is None:
            return None
        if check.outside(number):
            return f"{number:.6g} outside the plausible range [{check.low}, {check.high}]"
        stamp: datetime | None = getattr(reading, "source_time", None)
        if stamp is not None and wall_now is not None:
            age_s = (wall_now - (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC))).total_seconds()
            if age_s > self.config.stale_after_s:
                return f"stale: scanned {age_s:.0f} s ago (limit {self.config.stale_after_s:.0f} s)"
        track = self._tracks.setdefault(name, _Track())
        try:
            return self._history_problem(name, number, stamp, check, track)
        finally:
            track.last_raw = number

    def _history_problem(self, name: str, number: float, stamp: datetime | None, check: SignalCheck, track: _Track) -> str | None:
        if name in TOTAL_SIGNALS and track.last_accepted is not None and number < track.last_accepted:
            return f"totaliser went back from {track.last_accepted:.6g} to {number:.6g}"
        if check.frozen_cycles is not None:
            unchanged = track.last_raw == number or (stamp is not None and stamp == track.last_stamp)
            track.same_count = track.same_count + 1 if unchanged else 1
            track.last_stamp = stamp
            if track.same_count >= check.frozen_cycles:
                return f"frozen: the same value or scan time for {track.same_count} cycles"
        if track.last_accepted is not None and (check.max_step is not None or check.max_step_relative is not None):
            limit = check.max_step if check.max_step is not None else math.inf
            if check.max_step_relative is not None:
                limit = min(limit, max(self.config.spike_floor, check.max_step_relative * abs(track.last_accepted)))
            if abs(number - track.last_accepted) > limit:
                confirmed = track.spike_pending and track.last_raw is not None and abs(number - track.last_raw) <= limit
                if not confirmed:
                    track.spike_pending = True
                    return f"spike: {track.last_accepted:.6g} -> {number:.6g} in one cycle (limit {limit:.3g})"
        track.spike_pending = False
        track.last_accepted = number
        return None

    def _lab(self, scan: Mapping[str, ScannedValue], accepted: Mapping[str, object], problems: dict[str, str]) -> tuple[LabResult | None, int | None]:
        if "Sample.Seq" not in accepted:
            return None, None
        seq = int(accepted["Sample.Seq"])  # type: ignore[call-overload]
        if seq == self.last_lab_seq:
            return None, None
        taken = scan.get("Sample.TakenAt")
        if taken is None or not taken.good or not math.isfinite(float(taken.value)):
            problems["Sample.TakenAt"] = f"Sample.Seq moved to {seq} but the draw time is unusable"
            return None, None
        values: dict[str, float] = {}
        for signal, name in zip(SAMPLE_SIGNALS, LAB_FIELDS, strict=True):
            reading = scan.get(signal)
            number = float(reading.value) if reading is not None and reading.good and not isinstance(reading.value, str) else math.nan
            if math.isfinite(number) and number < 0.0:
                problems[signal] = f"negative lab value {number:.6g}, taken as not measured"
                number = math.nan
            values[name] = number
        return LabResult(seq=seq, taken_at_h=float(taken.value), **values), seq
