"""Data-quality checks: each problem is caught, named, and only critical ones stop a cycle."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from controller.ports import Reading
from controller.quality import DataQualityChecker, DataQualityConfig, QualityReport, SignalCheck
from plant_models.config_loading import validate_model
from plant_models.errors import ConfigError

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def scan(**overrides: float | bool | tuple[float, bool] | Reading) -> dict[str, Reading]:
    """A plausible scan of every signal the checks look at; keyword names use '_' for '.'."""
    values: dict[str, float | int | bool | str] = {
        "Status.ProcessTime": 10.0,
        "Status.Phase": 1,
        "Status.RemoteEnabled": True,
        "Status.WatchdogTripped": False,
        "Status.BatchId": "BR01",
        "Sample.Seq": 0,
        "Sample.TakenAt": math.nan,
        "PV.FeedTotal": 1.0,
        "PV.GlucoseFeedTotal": 0.5,
        "SP.FeedRate": 0.0,
        "SP.GlucoseRate": 0.0,
        "SP.Temperature": 36.5,
        "PV.Temperature": 36.5,
        "PV.Volume": 1400.0,
        "PV.BaseTotal": 0.1,
        "PV.OUR": 2.0,
        "PV.CER": 1.8,
        "PV.Capacitance": 5.0,
    }
    for tag in ("VCD", "Viability", "Glucose", "Lactate", "Glutamine", "Ammonia", "Titer", "Osmolality"):
        values[f"Sample.{tag}"] = math.nan
    readings = {name: Reading(value, not (isinstance(value, float) and math.isnan(value) and name.startswith("Sample.")), NOW) for name, value in values.items()}
    for key, value in overrides.items():
        name = key.replace("_", ".", 1)
        if isinstance(value, Reading):
            readings[name] = value
        elif isinstance(value, tuple):
            readings[name] = Reading(value[0], value[1], NOW)
        else:
            readings[name] = Reading(value, True, NOW)
    return readings


def test_a_clean_scan_passes_and_makes_an_observation():
    report = DataQualityChecker().check(scan(), wall_now=NOW)
    assert report.problems == {} and report.usable
    observation = report.observation()
    assert observation.process_time_h == 10.0 and observation.online["volume_l"] == 1400.0 and observation.lab_result is None


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ({"PV_OUR": (2.0, False)}, "Bad status"),
        ({"PV_OUR": math.inf}, "non-finite"),
        ({"PV_Temperature": 95.0}, "outside the plausible range"),
        ({"PV_Capacitance": Reading(5.0, True, NOW - timedelta(hours=1))}, "stale"),
    ],
)
def test_each_problem_is_named_and_the_value_left_out(override, problem):
    report = DataQualityChecker().check(scan(**override), wall_now=NOW)
    (signal,) = report.problems
    assert problem in report.problems[signal]
    assert report.usable, "an online probe is not a critical input"
    assert signal.replace("PV.", "") not in report.accepted


def test_a_critical_signal_that_fails_stops_the_cycle():
    report = DataQualityChecker().check(scan(PV_FeedTotal=(1.0, False)), wall_now=NOW)
    assert report.critical == ("PV.FeedTotal",) and not report.usable
    with pytest.raises(ValueError, match="PV.FeedTotal"):
        report.observation()


def test_a_totaliser_that_goes_back_is_rejected():
    checker = DataQualityChecker()
    checker.check(scan(PV_FeedTotal=5.0))
    report = checker.check(scan(PV_FeedTotal=4.0))
    assert "went back" in report.problems["PV.FeedTotal"] and not report.usable


def test_a_frozen_signal_is_caught_after_its_cycles():
    checker = DataQualityChecker()
    values = [2.0, 2.01, 2.01, 2.01, 2.01, 2.01]
    reports = [checker.check(scan(PV_OUR=Reading(v, True, NOW + timedelta(minutes=i)))) for i, v in enumerate(values)]
    assert "PV.OUR" not in reports[3].problems
    assert reports[4].problems["PV.OUR"] == "frozen: the same value or scan time for 4 cycles"


def test_a_source_timestamp_that_stops_is_frozen_even_if_the_value_moves():
    checker = DataQualityChecker()
    reports = [checker.check(scan(PV_OUR=Reading(2.0 + 0.1 * i, True, NOW))) for i in range(4)]
    assert reports[3].problems["PV.OUR"].startswith("frozen")


def test_a_spike_is_rejected_once_and_a_confirmed_step_accepted():
    checker = DataQualityChecker()
    checker.check(scan(PV_Volume=1400.0))
    spike = checker.check(scan(PV_Volume=1900.0))
    assert spike.problems["PV.Volume"].startswith("spike")
    back = checker.check(scan(PV_Volume=1401.0))
    assert "PV.Volume" not in back.problems
    checker.check(scan(PV_Volume=1700.0))
    confirmed = checker.check(scan(PV_Volume=1702.0))
    assert "PV.Volume" not in confirmed.problems, "a new level read twice is believed"


def test_a_lab_result_is_new_only_when_the_sequence_moves_and_negative_fields_are_not_measured():
    checker = DataQualityChecker()
    fields = {"Sample_Seq": 3, "Sample_TakenAt": 6.0, "Sample_VCD": 1.2, "Sample_Glucose": -0.1, "Sample_Titer": (0.0, False)}
    report = checker.check(scan(**fields))
    lab = report.lab_result
    assert lab is not None and lab.seq == 3 and lab.taken_at_h == 6.0 and lab.vcd_1e6_per_ml == 1.2
    assert math.isnan(lab.glucose_g_per_l) and "negative" in report.problems["Sample.Glucose"]
    assert math.isnan(lab.titer_g_per_l)
    checker.commit_lab(3)
    assert checker.check(scan(**fields)).lab_result is None


def test_configured_checks_merge_over_the_defaults():
    config = DataQualityConfig(signals={"PV.Temperature": SignalCheck(low=30.0, high=40.0)})
    report = DataQualityChecker(config).check(scan(PV_Temperature=29.0))
    assert "outside the plausible range [30.0, 40.0]" in report.problems["PV.Temperature"]
    assert DataQualityChecker(config).check(scan(PV_FeedTotal=(1.0, False))).critical == ("PV.FeedTotal",), "defaults of other signals stay"


def test_an_override_of_a_critical_signal_keeps_it_critical_so_a_bad_value_stops_the_cycle():
    config = validate_model(DataQualityConfig, {"signals": {"PV.FeedTotal": {"low": 0.0}}}, source="runtime.yaml")
    check = config.check_of("PV.FeedTotal")
    assert check is not None and check.critical and (check.low, check.high) == (0.0, 1.0e6)
    report = DataQualityChecker(config).check(scan(PV_FeedTotal=(1.0, False)))
    assert report.critical == ("PV.FeedTotal",) and not report.usable


@pytest.mark.parametrize("signal", ["Status.ProcessTime", "Status.Phase", "PV.FeedTotal", "PV.GlucoseFeedTotal", "SP.FeedRate", "SP.GlucoseRate", "SP.Temperature"])
def test_a_signal_the_cycle_cannot_run_without_cannot_be_made_non_critical(signal):
    with pytest.raises(ConfigError, match=rf"runtime.yaml: signals\.{signal}\.critical: must stay true.*got False"):
        validate_model(DataQualityConfig, {"signals": {signal: {"critical": False}}}, source="runtime.yaml")


def test_an_optional_signal_may_be_made_critical_or_not():
    config = validate_model(DataQualityConfig, {"signals": {"PV.OUR": {"critical": True}, "PV.Volume": {"critical": False}}}, source="runtime.yaml")
    assert config.check_of("PV.OUR").critical and config.check_of("PV.OUR").frozen_cycles == 4  # type: ignore[union-attr]
    assert not config.check_of("PV.Volume").critical  # type: ignore[union-attr]


def test_inverted_plausible_range_is_refused():
    with pytest.raises(ConfigError, match=r"signals\.PV\.Temperature\.low: must not be above high \(30\.0\); got 40\.0"):
        validate_model(DataQualityConfig, {"signals": {"PV.Temperature": {"low": 40.0, "high": 30.0}}}, source="runtime.yaml")


def test_an_observation_without_a_signal_it_needs_names_it_instead_of_a_key_error():
    report = DataQualityChecker().check(scan(), wall_now=NOW)
    accepted = {name: value for name, value in report.accepted.items() if name != "PV.FeedTotal"}
    incomplete = QualityReport(accepted, {"PV.FeedTotal": "Bad status"}, critical=())
    with pytest.raises(ValueError, match=r"PV\.FeedTotal \(Bad status\)"):
        incomplete.observation()
