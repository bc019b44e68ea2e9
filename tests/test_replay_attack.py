"""The long-lead monitor under a failing plant, a buggy PLC and a tampered resume state: what it must survive and never trust."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.mpc import MpcConfig
from controller.nmpc import CycleObservation, DecisionSource, NmpcConfig, NmpcController
from controller.recipe import PlatformRecipe
from controller.replay import ReplayMemory
from controller.trust import MONITORED, Replay, TrustRegion, TrustRegionConfig
from controller.types import LabResult, Setpoints
from plant_models.cho import STATE_INDEX


def _region(batch, **config) -> TrustRegion:
    recipe = PlatformRecipe(batch.recipe, batch.media, batch.equipment, batch.inoculation.volume_l)
    return TrustRegion(batch, recipe, (), TrustRegionConfig(**config))


def _lab(seq: int, taken_at_h: float, *, vcd: float = 10.0, titer: float = 1.0, glucose: float = 4.0) -> LabResult:
    nan = math.nan
    return LabResult(seq, taken_at_h, vcd, 95.0, glucose, nan, nan, nan, titer, nan)


def _flat_plan(region: TrustRegion, made_at_h: float) -> None:
    """A plan flat at VCD 10, titer 1 and glucose 4 for three days."""
    times = made_at_h + np.array([0.0, 24.0, 48.0, 72.0])
    states = np.zeros((len(STATE_INDEX), times.size))
    states[STATE_INDEX["viable_cells"]], states[STATE_INDEX["titer"]], states[STATE_INDEX["glucose"]] = 10.0, 1.0, 4.0
    region.remember(made_at_h, times, states)


def _replay(taken_at_h: float, *, titer: float = 1.0) -> Replay:
    return Replay(taken_at_h - 72.0, taken_at_h, {"vcd_1e6_per_ml": 10.0, "titer_g_per_l": titer, "glucose_g_per_l": 4.0})


# ----------------------------------------------------------------- resume state


@pytest.mark.parametrize("key", ["reach_scale", "width"])
@pytest.mark.parametrize("garbage", [math.nan, "nan", math.inf, "abc", None, [2.0]])
def test_a_garbage_number_in_the_resumed_trust_region_neither_widens_it_nor_harvests_at_once(batch, key, garbage):
    """A NaN width or reach scale made the harvest window [now, now] (every comparison with NaN is false): the batch harvested at the
    first cycle after the restart. A value that is no number at all stopped the runtime from starting. Neither is evidence of anything:
    the reach resumes as a fresh one's, the width on the safe side, at a re-enable's (a batch its results had narrowed does not come back
    at the band's whole reach)."""
    fresh = _region(batch)
    region = _region(batch)
    region.restore({"width": 0.5, "reach_scale": 2.0} | {key: garbage})
    assert 0.0 <= region.width <= 1.0 and 1.0 <= region.reach_scale <= region.config.max_reach_scale
    assert region.reach_scale == (1.0 if key == "reach_scale" else 2.0)
    assert region.width == (region.config.reenable_width if key == "width" else 0.5) and fresh.width == pytest.approx(fresh.config.initial_width)
    earliest, latest = region.harvest_window_h(100.0)
    assert earliest > 300.0 and latest > earliest


@pytest.mark.parametrize(("saved", "restored"), [(-4.0, 1.0), (0.5, 1.0), (2.5, 2.5), (1e9, 3.0), ("2.5", 2.5)])
def test_a_resumed_reach_scale_stays_within_its_bounds(batch, saved, restored):
    region = _region(batch, max_reach_scale=3.0)
    region.restore({"reach_scale": saved})
    assert region.reach_scale == pytest.approx(restored)


def test_a_resumed_controller_with_a_nan_reach_scale_plans_rather_than_harvests(model, batch, day_twelve):
    plc, applied = day_twelve
    config = NmpcConfig(mpc=MpcConfig(fine_stages=6, coarse_stages=4, compile=False))
    controller = NmpcController(model, batch, _Frozen(plc.plant.state.copy(), plc.plant.parameters), config)
    controller.trust.restore({"width": 0.5, "reach_scale": math.nan, "misses": 0, "stood_down": False})
    decision = controller.cycle(CycleObservation(process_time_h=288.0, online={"volume_l": 1800.0}, feed_total_l=0.0, glucose_feed_total_l=0.0, applied=applied))
    assert decision.source is DecisionSource.MPC and not decision.setpoints.harvest
    assert controller.replay(287.0) is None  # a restart empties the memory: no replay yet


class _Frozen:
    def __init__(self, state: np.ndarray, parameters: np.ndarray) -> None:
        self.state, self.parameters = state, parameters

    def observe(self, observation: CycleObservation) -> tuple[np.ndarray, np.ndarray]:
        return self.state, self.parameters


# ----------------------------------------------------------------- lab results


def test_a_lab_result_delivered_again_is_not_counted_again(batch):
    """A cycle that failed after the check, or one abandoned because the history was down, hands the same result to the next cycle:
    one result earned reach (and width) twice, and one miss counted as two stood the NMPC down."""
    region = _region(batch, initial_width=0.5, widen_step=0.1, reach_step=0.25, misses_to_recipe=2)
    _flat_plan(region, 0.0)
    first = region.check(_lab(1, 30.0), replay=_replay(30.0))
    assert first is not None and first.long_confirmed and region.reach_scale == pytest.approx(1.25) and region.width == pytest.approx(0.6)
    assert region.check(_lab(1, 30.0), replay=_replay(30.0)) is None
    assert region.reach_scale == pytest.approx(1.25) and region.width == pytest.approx(0.6) and len(region.checks) == 1
    missed = _lab(2, 31.0, titer=2.0)
    assert region.check(missed) is not None and region.misses == 1
    assert region.check(missed) is None and region.check(missed) is None
    assert region.misses == 1 and not region.stood_down


def test_a_result_set_aside_by_the_estimators_gate_can_still_be_checked_when_delivered_again(batch):
    """A result that was not checked (nothing accepted, no plan) changed nothing: delivered again, it is checked."""
    region = _region(batch)
    _flat_plan(region, 0.0)
    assert region.check(_lab(1, 30.0), accepted=frozenset()) is None
    assert region.check(_lab(1, 30.0)) is not None


# ----------------------------------------------------------------- the memory


def _memory(model, batch, nominal_p, hours: range, applied=lambda hour: np.array([1.0, 0.2, 36.5])) -> ReplayMemory:
    memory = ReplayMemory(model, keep_h=120.0, max_gap_h=2.0)
    state = batch.inoculation.initial_state()
    for hour in hours:
        memory.record(float(hour), applied(hour), state, nominal_p)
    return memory


@pytest.mark.parametrize("applied", [[1e308, 0.0, 36.5], [0.0, 1e200, 36.5], [0.0, 0.0, 1e6]])
def test_a_replay_that_diverges_is_no_replay(model, batch, nominal_p, applied):
    """Absurd (finite) readbacks of the setpoints from a buggy PLC: the model overflows, and the replay says so rather than raising or predicting inf."""
    memory = _memory(model, batch, nominal_p, range(30), applied=lambda hour: np.array(applied))
    assert memory.replay(2.0, 29.0) is None


@pytest.mark.parametrize("taken_at_h", [math.nan, math.inf, -5.0, 40.0])
def test_no_replay_to_a_draw_that_is_not_in_the_memory(model, batch, nominal_p, taken_at_h):
    """A draw time that is NaN, infinite, before inoculation or after the last cycle (a PLC clock ahead of the batch's)."""
    memory = _memory(model, batch, nominal_p, range(30))
    assert memory.replay(taken_at_h - 24.0, taken_at_h) is None


def test_a_process_time_that_runs_backwards_is_not_replayed_through(model, batch, nominal_p):
    memory = _memory(model, batch, nominal_p, range(30))
    memory.record(20.0, np.array([1.0, 0.2, 36.5]), batch.inoculation.initial_state(), nominal_p)  # a PLC reset its batch clock
    for hour in range(21, 30):
        memory.record(float(hour), np.array([1.0, 0.2, 36.5]), batch.inoculation.initial_state(), nominal_p)
    assert memory.replay(10.0, 29.0) is None
    assert memory.replay(22.0, 29.0) is not None


def _replayed_against_fine_run(model, batch, nominal_p, delivered_fraction: float):
    """The controller fed hour k's readback from k − 1 to k, the flow totals showing ``delivered_fraction`` of the feeds delivered; its replay, and the model run on a fine grid with what was delivered."""
    controller = NmpcController(model, batch, _Frozen(batch.inoculation.initial_state(), nominal_p), NmpcConfig(mpc=MpcConfig(compile=False)))
    controller.trust.restore({"stood_down": True})  # the recipe runs: cycles without solves, and the memory is kept all the same
    readback = {hour: Setpoints(2.0 if hour % 3 else 0.0, 0.5 * (hour % 2), 36.5 if hour < 110 else 33.0) for hour in range(100, 131)}
    feed_total = glucose_total = 10.0
    for hour, applied in readback.items():
        if hour > 100:
            feed_total += delivered_fraction * applied.feed_rate_lph
            glucose_total += delivered_fraction * applied.glucose_rate_lph
        observation = CycleObservation(process_time_h=float(hour), online={"volume_l": 1500.0}, feed_total_l=feed_total, glucose_feed_total_l=glucose_total, applied=applied)
        controller.cycle(observation)
    controller.reenable()
    step, fine_h = model.rk4_step(0.05), 0.05
    x = batch.inoculation.initial_state()
    for hour in range(104, 131):
        u = readback[hour]
        given = np.array([delivered_fraction * u.feed_rate_lph, delivered_fraction * u.glucose_rate_lph, u.temperature_degc])
        for i in range(round(1.0 / fine_h)):
            x = np.asarray(step(hour - 1 + i * fine_h, x, given, nominal_p)[1]).ravel()
    return controller.replay(130.0, lead_h=27.0), x


@pytest.mark.parametrize("delivered_fraction", [1.0, 0.0, 0.5])
def test_the_controller_replays_each_interval_with_what_the_plant_was_given(model, batch, nominal_p, delivered_fraction):
    """The setpoints read back at a cycle are those the plant ran since the cycle before, and the flow totals say what went in: the
    controller's replay matches the model run on a fine grid (an independent reference) with hour k's temperature readback and the feeds
    the totals show from k − 1 to k, and it reads each lab field from its own state. With the pumps stopped (the PLC's high-level stop,
    the totals flat while the setpoints still ask for feed) the replay feeds nothing."""
    ran, x = _replayed_against_fine_run(model, batch, nominal_p, delivered_fraction)
    assert ran is not None and ran.from_h == 103.0
    for name, state in MONITORED:
        assert ran.predicted[name] == pytest.approx(float(x[STATE_INDEX[state]]), rel=1e-4), name


def test_a_cycle_run_again_at_the_same_process_time_keeps_the_memory(model, batch, nominal_p):
    """A cycle abandoned before its writes (the history was down) runs again on the next scan, which may carry the same process time: no
    time passed and nothing was written, so nothing is unknown, and five days of evidence must not go (the day-ahead check would fall back
    to the plan's own prediction, whose replanned glucose misses a correct model)."""
    memory = _memory(model, batch, nominal_p, range(21))
    state = batch.inoculation.initial_state()
    memory.record(20.0, np.array([1.0, 0.2, 36.5]), state, nominal_p)
    for hour in range(21, 30):
        memory.record(float(hour), np.array([1.0, 0.2, 36.5]), state, nominal_p)
    reference = _memory(model, batch, nominal_p, range(30))
    ran, expected = memory.replay(10.0, 29.0), reference.replay(10.0, 29.0)
    assert ran is not None and expected is not None
    np.testing.assert_allclose(ran[1], expected[1])
