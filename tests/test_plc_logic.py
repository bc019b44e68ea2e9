"""The simulated PLC's own logic, as reference-plc.md describes it."""

from __future__ import annotations

import pytest

from controller.types import Setpoints
from plant_models.errors import RemoteDisabledError, SetpointOutOfRangeError
from simulator.batch import build_simulated_plc
from simulator.plc import PHASE_HARVESTED


@pytest.fixture
def plc(make_simulation):
    plc, _ = build_simulated_plc(make_simulation())
    return plc


def _beat(plc, hours: float, *, follow_recipe: bool = True) -> None:
    """Play a healthy runtime up to ``hours`` later: at every cycle boundary write the
    recipe's feeds (so the culture is fed as usual) and move the heartbeat."""
    end = plc.process_time_h + hours
    while plc.process_time_h < end - 1e-9 and plc.phase != PHASE_HARVESTED:
        if follow_recipe and plc.remote_enabled:
            planned = plc.recipe.setpoints(plc.process_time_h)
            plc.write_setpoint("SP.FeedRate", planned.feed_rate_lph)
            plc.write_setpoint("SP.GlucoseRate", planned.glucose_rate_lph)
        plc.write_heartbeat(plc.heartbeat + 1)
        plc.advance_to(plc.next_cycle_boundary_h())


def test_out_of_range_setpoint_is_rejected_and_old_value_kept(plc):
    plc.write_heartbeat(1)
    plc.write_setpoint("SP.Temperature", 35.0)
    for bad in (45.0, 12.0, float("nan"), float("inf")):
        with pytest.raises(SetpointOutOfRangeError) as caught:
            plc.write_setpoint("SP.Temperature", bad)
        assert caught.value.tag == "SP.Temperature" and caught.value.reason == "out_of_range"
    with pytest.raises(SetpointOutOfRangeError):
        plc.write_setpoint("SP.FeedRate", -0.1)
    assert plc.snapshot()["SP.Temperature"].value == 35.0


def test_setpoint_in_range_is_applied_to_the_plant(plc):
    plc.write_setpoint("SP.Temperature", 34.0)
    _beat(plc, 10.0)
    assert plc.plant.state[10] == pytest.approx(34.0, abs=0.05)  # culture temperature follows within a few lags


def test_writes_refused_while_remote_disabled_before_range_check(plc):
    plc.set_operator_remote(False)
    assert not plc.snapshot()["Status.RemoteEnabled"].value
    with pytest.raises(RemoteDisabledError):
        plc.write_setpoint("SP.Temperature", 99.0)  # out of range too, but remote is checked first
    with pytest.raises(RemoteDisabledError):
        plc.request_harvest(True)
    plc.set_operator_remote(True)
    plc.write_setpoint("SP.Temperature", 35.0)


def test_watchdog_trips_after_two_cycles_without_heartbeat_and_recipe_takes_over(plc):
    _beat(plc, 125.0)  # past the recipe's temperature shift at 120 h
    plc.write_heartbeat(plc.heartbeat + 1)  # the last heartbeat, at 125 h
    plc.write_setpoint("SP.Temperature", 36.0)
    plc.advance_to(plc.process_time_h + 1.0)
    assert plc.snapshot()["Status.RemoteEnabled"].value and not plc.watchdog_tripped
    assert plc.snapshot()["SP.Temperature"].value == 36.0
    plc.advance_to(plc.process_time_h + 1.0)  # two cycles since the last heartbeat
    snap = plc.snapshot()
    assert snap["Status.WatchdogTripped"].value and not snap["Status.RemoteEnabled"].value
    assert snap["SP.Temperature"].value == 33.0  # the local recipe runs: shifted temperature
    assert snap["SP.FeedRate"].value == pytest.approx(0.03 * 1400.0 / 24.0)
    with pytest.raises(RemoteDisabledError):
        plc.write_setpoint("SP.Temperature", 36.0)
    plc.write_heartbeat(plc.heartbeat + 1)
    assert plc.snapshot()["Status.RemoteEnabled"].value and not plc.watchdog_tripped
    assert plc.snapshot()["SP.Temperature"].value == 33.0  # bumpless: the recipe's value stays until written


def test_rewriting_the_same_heartbeat_is_not_a_heartbeat(plc):
    plc.write_heartbeat(7)
    for _ in range(3):
        plc.advance_to(plc.next_cycle_boundary_h())
        plc.write_heartbeat(7)
    assert plc.watchdog_tripped


def test_watchdog_timeout_is_configurable(make_simulation):
    plc, _ = build_simulated_plc(make_simulation(plc={"watchdog_timeout_h": 5.0}))
    plc.advance_to(4.5)
    assert not plc.watchdog_tripped
    plc.advance_to(5.0)
    assert plc.watchdog_tripped


def test_operator_local_window_disables_remote_then_restores(make_simulation):
    plc, _ = build_simulated_plc(make_simulation(faults=[{"kind": "operator_local", "start_h": 3.0, "end_h": 6.0}]))
    _beat(plc, 3.0)
    assert not plc.remote_enabled
    _beat(plc, 3.0)
    assert plc.remote_enabled


def test_harvest_request_ends_the_batch_and_disables_remote(plc):
    _beat(plc, 200.0)
    plc.write_setpoints(Setpoints(1.0, 0.2, 33.0, harvest=True))
    snap = plc.snapshot()
    assert snap["Status.Phase"].value == PHASE_HARVESTED and not snap["Status.RemoteEnabled"].value
    minute = plc.minute
    plc.advance_to(plc.process_time_h + 10.0)
    assert plc.minute == minute  # a harvested plant does not run on
    with pytest.raises(RemoteDisabledError):
        plc.write_setpoint("SP.FeedRate", 1.0)


def test_local_recipe_harvests_on_day_14(plc):
    plc.set_operator_remote(False)
    plc.advance_to(400.0)
    assert plc.phase == PHASE_HARVESTED and plc.process_time_h == pytest.approx(336.0)
    assert plc.harvest_reason == "local recipe"


def test_remote_batch_ends_at_the_latest_allowed_harvest(plc):
    _beat(plc, 400.0)
    assert plc.phase == PHASE_HARVESTED and plc.process_time_h == pytest.approx(360.0)
    assert plc.harvest_reason == "latest allowed harvest time reached"


def test_heartbeat_and_mode_ranges(plc):
    with pytest.raises(SetpointOutOfRangeError):
        plc.write_heartbeat(2**32)
    with pytest.raises(SetpointOutOfRangeError):
        plc.write_mode(3)
    plc.write_mode(1)
    plc.write("MPC.Rec.Temperature", 33.5)
    snap = plc.snapshot()
    assert snap["MPC.Mode"].value == 1 and snap["MPC.Rec.Temperature"].value == 33.5


def test_snapshot_serves_every_reference_tag(plc):
    expected = {
        "PV.Temperature", "PV.pH", "PV.DO", "PV.Volume", "PV.FeedTotal", "PV.GlucoseFeedTotal", "PV.BaseTotal", "PV.OUR",
        "PV.CER", "PV.Capacitance", "PV.AgitationSpeed", "Sample.Seq", "Sample.TakenAt", "Sample.VCD", "Sample.Viability",
        "Sample.Glucose", "Sample.Lactate", "Sample.Glutamine", "Sample.Ammonia", "Sample.Titer", "Sample.Osmolality",
        "SP.FeedRate", "SP.GlucoseRate", "SP.Temperature", "SP.HarvestRequest", "Status.ProcessTime", "Status.BatchId",
        "Status.Phase", "Status.RemoteEnabled", "Status.WatchdogTripped", "MPC.Heartbeat", "MPC.Mode", "MPC.Rec.FeedRate",
        "MPC.Rec.GlucoseRate", "MPC.Rec.Temperature", "MPC.Rec.HarvestTime", "MPC.Pred.HarvestTiter", "Sim.Lockstep",
    }  # fmt: skip
    assert set(plc.snapshot()) == expected
