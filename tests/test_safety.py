"""The safety filter never feeds toward a volume that any reading says is at the limit (issue 11)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.plausibility import PlausibilityChecker
from controller.quality import DataQualityChecker
from controller.safety import filter_setpoints, volume_limit_l
from controller.types import Setpoints
from simulator.batch import build_simulated_plc
from simulator.plc import PHASE_RUNNING, TagReading
from tests.conftest import CONFIGS

LAST = Setpoints(1.0, 0.5, 36.5)


def _filter(batch, requested: Setpoints, readings, dt_h: float = 1.0):
    return filter_setpoints(requested, LAST, batch, temperature_rate_degc_per_h=0.5, dt_h=dt_h, volume_readings_l=readings)


def test_the_limit_is_the_plcs_high_level_feed_stop(batch):
    assert volume_limit_l(batch) == batch.equipment.max_working_volume_l - batch.recipe.feed_stop_below_max_l == 1995.0


def test_without_readings_the_feeds_pass_as_before(batch):
    full = Setpoints(batch.equipment.feed_rate_max_lph, batch.equipment.glucose_rate_max_lph, 36.5)
    assert filter_setpoints(full, LAST, batch, temperature_rate_degc_per_h=0.5, dt_h=1.0) == _filter(batch, full, ())
    assert _filter(batch, full, ()).setpoints == full


@pytest.mark.parametrize("at_or_above_l", [1995.0, 1995.001, 2073.0, 1.0e6])
def test_any_reading_at_the_limit_stops_both_feeds_and_says_which(batch, at_or_above_l):
    readings = {"PV.Volume": 207.3, "volume balance": at_or_above_l, "estimator": 1980.0}
    filtered = _filter(batch, Setpoints(10.0, 2.0, 36.2), readings)
    assert (filtered.setpoints.feed_rate_lph, filtered.setpoints.glucose_rate_lph) == (0.0, 0.0)
    assert filtered.setpoints.temperature_degc == 36.2
    (message,) = filtered.adjustments
    assert "volume balance" in message and f"{at_or_above_l:.1f} L" in message and "stopped" in message


def test_near_the_limit_both_feeds_shrink_in_proportion_to_the_room_left(batch):
    filtered = _filter(batch, Setpoints(8.0, 2.0, 36.5), [1990.0, 1980.0], dt_h=1.0)
    feed, glucose = filtered.setpoints.feed_rate_lph, filtered.setpoints.glucose_rate_lph
    assert feed + glucose == pytest.approx(5.0, abs=1e-9)  # 5 L of room in one hour
    assert feed / glucose == pytest.approx(4.0)
    assert "volume reading 1 of 2" in filtered.adjustments[0]


def test_a_non_finite_reading_is_no_evidence_either_way(batch):
    filtered = _filter(batch, Setpoints(2.0, 0.1, 36.5), [math.nan, math.inf, 1500.0])
    assert filtered.setpoints == Setpoints(2.0, 0.1, 36.5) and filtered.adjustments == ()


def test_one_period_at_the_filtered_rates_never_passes_the_limit(batch):
    """Mass balance over one period: max(reading) + (feed + glucose) × dt ≤ limit, for any readings and requests."""
    rng = np.random.default_rng(11)
    limit = volume_limit_l(batch)
    for _ in range(5000):
        readings = list(rng.uniform(limit - 40.0, limit + 5.0, size=rng.integers(1, 4)))
        requested = Setpoints(float(rng.uniform(-1.0, 15.0)), float(rng.uniform(-1.0, 3.0)), 36.5)
        dt_h = float(rng.choice([0.25, 1.0, 2.0]))
        filtered = _filter(batch, requested, readings, dt_h=dt_h).setpoints
        inflow = filtered.feed_rate_lph + filtered.glucose_rate_lph
        assert filtered.feed_rate_lph >= 0.0 and filtered.glucose_rate_lph >= 0.0
        assert max(readings) + inflow * dt_h <= limit or inflow == 0.0
        clamped = min(max(requested.feed_rate_lph, 0.0), 10.0) + min(max(requested.glucose_rate_lph, 0.0), 2.0)
        if max(readings) + clamped * dt_h <= limit:
            assert inflow == pytest.approx(clamped)  # room enough: nothing taken away


def test_issue_11_a_volume_tag_scaled_by_0_1_cannot_overfill_the_reactor(batch):
    """The defect: PV.Volume read a tenth of the truth and the plan fed at maximum. The balance's volume stops the feeds at the limit."""
    from simulator.config import load_simulation

    plc, _ = build_simulated_plc(load_simulation(CONFIGS / "simulate" / "platform.yaml"))
    quality, plausibility = DataQualityChecker(), PlausibilityChecker(batch)
    limit = volume_limit_l(batch)
    highest_true_l, fed_until_full_l = 0.0, math.nan
    volume_index, base_index = plc.plant.model.state_index("volume"), plc.plant.model.state_index("base_added")
    while plc.phase == PHASE_RUNNING and plc.process_time_h < 120.0:
        scan = dict(plc.snapshot())
        volume = scan["PV.Volume"]
        scan["PV.Volume"] = TagReading(volume.value * 0.1, volume.good, volume.scanned_at_h)  # type: ignore[operator]
        observation = quality.check(scan).observation()
        assert plausibility.check(observation)  # the contradiction is seen at every cycle
        readings = {"PV.Volume": observation.online["volume_l"], "volume balance": plausibility.expected_volume_l(observation)}
        filtered = _filter(batch, Setpoints(10.0, 2.0, 36.5), readings).setpoints  # a plan that feeds at maximum
        plc.write_heartbeat(plc.heartbeat + 1)
        plc.write_setpoints(filtered)
        base_before_l = float(plc.plant.state[base_index])
        plc.advance_to(plc.next_cycle_boundary_h())
        true_l = float(plc.plant.state[volume_index])
        highest_true_l = max(highest_true_l, true_l)
        if filtered.feed_rate_lph + filtered.glucose_rate_lph > 0.0:
            # What was fed ends at the limit at most; the base the pH loop adds meanwhile is not the filter's to hold back,
            # and the balance knows the base total only to the reading's noise (0.01 L).
            assert true_l - (float(plc.plant.state[base_index]) - base_before_l) <= limit + 0.05
        elif math.isnan(fed_until_full_l):
            fed_until_full_l = plc.plant.feed_total_l + plc.plant.glucose_feed_total_l
    assert highest_true_l > limit - 1.0  # it did fill up to the limit
    assert plc.plant.feed_total_l + plc.plant.glucose_feed_total_l == fed_until_full_l  # and never fed again once the balance said full
