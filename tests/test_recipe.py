"""The platform recipe's arithmetic."""

from __future__ import annotations

import json
import math

import pytest

from controller.recipe import PlatformRecipe
from controller.types import LabResult
from plant_models.cho import STATE_INDEX
from simulator.batch import build_simulated_plc


def _lab(seq: int, taken_at_h: float, glucose: float, viability: float = 95.0) -> LabResult:
    return LabResult(seq, taken_at_h, 5.0, viability, glucose, 1.0, 2.0, 3.0, 1.0, 320.0)


def _recipe(batch) -> PlatformRecipe:
    return PlatformRecipe(batch.recipe, batch.media, batch.equipment, batch.inoculation.volume_l)


@pytest.fixture
def recipe(batch) -> PlatformRecipe:
    return _recipe(batch)


def test_time_based_schedule(recipe):
    assert recipe.setpoints(71.9).feed_rate_lph == 0.0
    assert recipe.setpoints(72.0).feed_rate_lph == pytest.approx(0.03 * 1400.0 / 24.0)
    assert recipe.setpoints(119.9).temperature_degc == 36.5
    assert recipe.setpoints(120.0).temperature_degc == 33.0
    assert not recipe.setpoints(335.9).harvest and recipe.setpoints(336.0).harvest


def test_glucose_rate_replaces_consumption_and_closes_the_deficit_over_a_day(recipe):
    recipe.on_lab_result(_lab(1, 24.0, 5.0), volume_l=1400.0, glucose_delivered_g=0.0)
    # No consumption estimate yet: only the deficit (4 - 5 < 0) counts, so no glucose feed.
    assert recipe.glucose_rate_lph == 0.0
    recipe.on_lab_result(_lab(2, 48.0, 3.0), volume_l=1400.0, glucose_delivered_g=0.0)
    consumption_g_per_h = (5.0 - 3.0) * 1400.0 / 24.0
    deficit_g_per_h = (4.0 - 3.0) * 1400.0 / 24.0
    assert recipe.glucose_rate_lph == pytest.approx((consumption_g_per_h + deficit_g_per_h) / 400.0)


def test_glucose_from_the_nutrient_feed_is_counted(recipe):
    recipe.on_lab_result(_lab(1, 72.0, 4.0), volume_l=1400.0, glucose_delivered_g=0.0)
    recipe.on_lab_result(_lab(2, 96.0, 4.0), volume_l=1442.0, glucose_delivered_g=42.0 * 40.0 + 1000.0)
    consumed_g_per_h = (4.0 * 1400.0 + 42.0 * 40.0 + 1000.0 - 4.0 * 1442.0) / 24.0
    fed_by_feed_g_per_h = 1.75 * 40.0
    assert consumed_g_per_h > fed_by_feed_g_per_h
    assert recipe.glucose_rate_lph == pytest.approx((consumed_g_per_h - fed_by_feed_g_per_h) / 400.0)


def test_unmeasured_glucose_keeps_the_rate(recipe):
    recipe.on_lab_result(_lab(1, 24.0, 5.0), volume_l=1400.0, glucose_delivered_g=0.0)
    recipe.on_lab_result(_lab(2, 48.0, 2.0), volume_l=1400.0, glucose_delivered_g=0.0)
    rate = recipe.glucose_rate_lph
    recipe.on_lab_result(_lab(3, 72.0, math.nan), volume_l=1400.0, glucose_delivered_g=0.0)
    assert recipe.glucose_rate_lph == rate


def test_rate_is_capped_at_the_pump_range(recipe, batch):
    recipe.on_lab_result(_lab(1, 24.0, 12.0), volume_l=1400.0, glucose_delivered_g=0.0)
    recipe.on_lab_result(_lab(2, 48.0, 0.0), volume_l=1400.0, glucose_delivered_g=0.0)
    assert recipe.glucose_rate_lph == batch.equipment.glucose_rate_max_lph


def test_low_viability_triggers_harvest(recipe):
    recipe.on_lab_result(_lab(1, 200.0, 4.0, viability=69.0), volume_l=1800.0, glucose_delivered_g=0.0)
    assert recipe.setpoints(205.0).harvest


def test_near_the_maximum_the_nutrient_feed_stops_first_and_the_high_level_stops_both(recipe, batch):
    recipe.on_lab_result(_lab(1, 24.0, 5.0), volume_l=1400.0, glucose_delivered_g=0.0)
    recipe.on_lab_result(_lab(2, 48.0, 2.0), volume_l=1400.0, glucose_delivered_g=0.0)
    assert recipe.glucose_rate_lph > 0.0
    room_l = recipe.glucose_room_l(200.0)  # kept for the glucose feed to the harvest at 336 h
    assert room_l == pytest.approx(batch.recipe.glucose_room_per_day * 1400.0 * (batch.recipe.harvest_h - 200.0) / 24.0) and room_l > 40.0
    below = recipe.setpoints(200.0, volume_l=1994.9 - room_l)
    assert below.feed_rate_lph > 0.0 and below.glucose_rate_lph > 0.0
    glucose_only = recipe.setpoints(200.0, volume_l=1995.0 - room_l)  # the room left is the glucose feed's
    assert glucose_only.feed_rate_lph == 0.0 and glucose_only.glucose_rate_lph == below.glucose_rate_lph
    full = recipe.setpoints(200.0, volume_l=1995.0)  # within 5 L of the 2000 L maximum
    assert full.feed_rate_lph == 0.0 and full.glucose_rate_lph == 0.0 and full.temperature_degc == 33.0
    unknown = recipe.setpoints(200.0, volume_l=math.nan)  # a Bad load cell leaves the schedule as it is
    assert unknown.feed_rate_lph == below.feed_rate_lph and unknown.glucose_rate_lph == below.glucose_rate_lph
    assert recipe.glucose_room_l(batch.recipe.harvest_h + 5.0) == 0.0  # nothing to keep after the harvest


def test_local_recipe_does_not_overfill_a_full_reactor(make_simulation):
    """The operator takes local control for the rest of a batch the controller has filled to 1996 L."""
    plc, _ = build_simulated_plc(make_simulation())
    plc.set_operator_remote(False)
    plc.advance_to(150.0)
    plc.plant.state[STATE_INDEX["volume"]] = 1996.0
    plc.advance_to(300.0)
    assert plc.plant.state[STATE_INDEX["volume"]] <= 2000.0


def test_what_the_recipe_learned_from_the_lab_survives_a_restart(batch):
    """The glucose arithmetic (the last result, the rate, whether a consumption was measured) is saved and taken up again: the
    next result after a restart gives the rate it would have given without one."""
    nan = math.nan
    first, second, third = (LabResult(seq, t, 10.0, 95.0, g, nan, nan, nan, 2.0, nan) for seq, t, g in ((1, 24.0, 5.0), (2, 48.0, 4.2), (3, 72.0, 3.6)))
    kept = _recipe(batch)
    for result, delivered in ((first, 0.0), (second, 150.0)):
        kept.on_lab_result(result, volume_l=1500.0, glucose_delivered_g=delivered)
    saved = json.loads(json.dumps(kept.glucose_state()))  # as the history stores it
    restarted = _recipe(batch)
    restarted.restore_glucose_state(saved)
    assert restarted.glucose_rate_lph == kept.glucose_rate_lph > 0.0 and restarted.glucose_consumption_seen
    for recipe in (kept, restarted):
        recipe.on_lab_result(third, volume_l=1520.0, glucose_delivered_g=400.0)
    assert restarted.glucose_rate_lph == pytest.approx(kept.glucose_rate_lph)


@pytest.mark.parametrize("damaged", [{"last_glucose": [24.0, "x", 1500.0, 0.0]}, {"glucose_rate_lph": math.nan}, {"glucose_rate_lph": -1.0}, {"consumption_seen": "yes"}])
def test_a_damaged_saved_recipe_state_is_no_evidence(batch, damaged):
    recipe = _recipe(batch)
    recipe.restore_glucose_state({"last_glucose": [24.0, 5.0, 1500.0, 0.0], "glucose_rate_lph": 0.2, "consumption_seen": True, "low_viability_seen": False, **damaged})
    assert recipe.glucose_rate_lph == 0.0 and not recipe.glucose_consumption_seen
