"""The replay memory: the model run again from an earlier estimate with the setpoints the plant actually ran (the trust region's long-lead evidence)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.replay import ReplayMemory
from plant_models.cho import STATE_INDEX


def _setpoints(hour: int) -> np.ndarray:
    """Setpoints that change every hour: feed on and off, glucose in pulses, a temperature shift at 40 h."""
    return np.array([2.0 if hour % 3 else 0.0, 0.5 * (hour % 2), 36.5 if hour < 40 else 33.0])


def _run(model, batch, nominal_p, hours: int, fine_h: float = 0.05) -> list[np.ndarray]:
    """The model on a fine grid (an independent reference for the memory's 1-h steps), the state at every whole hour; hour k's setpoints run from k − 1 to k."""
    step = model.rk4_step(fine_h)
    x = batch.inoculation.initial_state()
    states = [x]
    for hour in range(1, hours + 1):
        for i in range(round(1.0 / fine_h)):
            x = np.asarray(step(hour - 1 + i * fine_h, x, _setpoints(hour), nominal_p)[1]).ravel()
        states.append(x)
    return states


def test_a_replay_runs_the_model_from_the_estimate_then_with_the_setpoints_run_since(model, batch, nominal_p):
    states = _run(model, batch, nominal_p, 80)
    memory = ReplayMemory(model, keep_h=120.0, max_gap_h=2.0)
    for hour in range(0, 81):
        memory.record(float(hour), _setpoints(hour), states[hour], nominal_p)
    ran = memory.replay(8.5, 80.0)  # from the estimate at 8 h, the latest at or before 8.5 h
    assert ran is not None and ran[0] == 8.0
    for name in ("viable_cells", "titer", "glucose", "volume"):
        i = STATE_INDEX[name]
        assert ran[1][i] == pytest.approx(states[80][i], rel=1e-4), name
    # A draw between two cycles: the setpoints of the cycle after it ran up to the draw.
    between = memory.replay(8.0, 79.5)
    assert between is not None and states[79][STATE_INDEX["volume"]] < between[1][STATE_INDEX["volume"]] < states[80][STATE_INDEX["volume"]]
    # Wrong parameters run to another state: the replay is the model's, not a copy of the later estimates.
    wrong = ReplayMemory(model, keep_h=120.0, max_gap_h=2.0)
    for hour in range(0, 81):
        wrong.record(float(hour), _setpoints(hour), states[hour], nominal_p * 1.2)
    other = wrong.replay(8.0, 80.0)
    assert other is not None and not math.isclose(other[1][STATE_INDEX["viable_cells"]], states[80][STATE_INDEX["viable_cells"]], rel_tol=0.02)


def test_no_replay_without_an_estimate_early_enough_or_the_setpoints_up_to_the_draw(model, batch, nominal_p):
    states = _run(model, batch, nominal_p, 30)
    memory = ReplayMemory(model, keep_h=24.0, max_gap_h=2.0)
    for hour in range(0, 31):
        memory.record(float(hour), _setpoints(hour), states[hour], nominal_p)
    assert memory.replay(30.0, 31.0) is None  # the setpoints after 30 h are not known yet
    assert memory.replay(2.0, 30.0) is None  # estimates older than keep_h are gone
    assert memory.replay(6.0, 30.0) is not None


@pytest.mark.parametrize("break_at", ["gap", "nan_setpoint", "nan_estimate"])
def test_a_gap_or_an_unknown_value_starts_the_memory_again(model, batch, nominal_p, break_at):
    """Setpoints not known between two cycles (a restart, a NaN read) cannot be replayed through: nothing before them is used."""
    states = _run(model, batch, nominal_p, 40)
    memory = ReplayMemory(model, keep_h=120.0, max_gap_h=2.0)
    for hour in range(0, 41):
        if break_at == "gap" and 20 <= hour < 25:
            continue
        applied = _setpoints(hour)
        state = states[hour]
        if hour == 20 and break_at == "nan_setpoint":
            applied = np.array([math.nan, 0.0, 36.5])
        if hour == 20 and break_at == "nan_estimate":
            state = np.full_like(state, math.nan)
        memory.record(float(hour), applied, state, nominal_p)
    assert memory.replay(10.0, 40.0) is None
    assert memory.replay(26.0, 40.0) is not None


def test_bad_settings_are_refused(model):
    with pytest.raises(ValueError, match="keep_h"):
        ReplayMemory(model, keep_h=0.0, max_gap_h=2.0)


def test_a_gap_the_caller_vouches_for_is_bridged(model, batch, nominal_p):
    """A lost connection of 4 h: the flow totals give the feed across it, so the caller lets the memory bridge it; a gap longer than that starts again."""

    def held(hour: int) -> np.ndarray:
        return np.array([1.5, 0.25, 36.5])  # what the PLC ran through the gap, as the totals average it

    fine = model.rk4_step(0.05)
    x = batch.inoculation.initial_state()
    states = [x]
    for hour in range(1, 41):
        for i in range(20):
            x = np.asarray(fine(hour - 1 + i * 0.05, x, held(hour), nominal_p)[1]).ravel()
        states.append(x)
    for bridge_h, bridged in ((6.0, True), (4.5, False)):
        memory = ReplayMemory(model, keep_h=120.0, max_gap_h=2.0)
        for hour in range(0, 41):
            if 20 < hour < 25:
                continue  # no cycle: the connection was lost from 20 h to 25 h
            memory.record(float(hour), held(hour), states[hour], nominal_p, bridge_h=bridge_h if hour == 25 else None)
        ran = memory.replay(10.0, 40.0)
        assert (ran is not None) is bridged
        if ran is not None:
            assert ran[1][STATE_INDEX["viable_cells"]] == pytest.approx(states[40][STATE_INDEX["viable_cells"]], rel=1e-4)
