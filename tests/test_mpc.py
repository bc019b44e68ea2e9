"""The economic NMPC: grid, solve on a real batch state, honest failure reports; the codegen cache."""

from __future__ import annotations

import casadi as ca
import numpy as np
import pytest

from controller.codegen import compiled_nlpsol
from controller.mpc import EconomicMpc, MpcConfig
from plant_models.cho import STATE_INDEX

SMALL = {"fine_stages": 6, "coarse_stages": 4, "compile": False}


@pytest.fixture(scope="module")
def late_batch(day_twelve):
    """Truth at day 12 of a recipe batch: the state, the true parameters, the recipe's setpoints."""
    plc, applied = day_twelve
    return plc.plant.state.copy(), plc.plant.parameters, np.array([applied.feed_rate_lph, applied.glucose_rate_lph, applied.temperature_degc])


def test_stage_grid_reaches_harvest_and_freezes_after_it(model, batch):
    mpc = EconomicMpc(model, batch, MpcConfig(**SMALL))
    starts, durations = mpc.stage_grid(100.0, 336.0)
    assert np.all(durations[:6] == 1.0) and durations[6:] == pytest.approx((236.0 - 6.0) / 4)
    assert starts[0] == 100.0 and starts[-1] + durations[-1] == pytest.approx(336.0)
    starts, durations = mpc.stage_grid(332.5, 336.0)
    assert durations.tolist() == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_stages_take_only_the_substeps_their_duration_needs(model, batch, late_batch):
    """A stage integrates with the fewest RK4 steps ≤ max_step_h (cold_max_step_h when cold); a zero-length stage is the identity."""
    state, parameters, recipe_inputs = late_batch
    mpc = EconomicMpc(model, batch, MpcConfig(**SMALL, max_step_h=3.0, cold_max_step_h=2.0))
    starts, durations = mpc.stage_grid(300.0, 336.0)
    assert mpc.substeps(durations).tolist() == [1.0] * 6 + [3.0] * 4  # coarse stages of 7.5 h: three steps of 2.5 h
    assert mpc.substeps(durations, cold=True).tolist() == [1.0] * 6 + [4.0] * 4  # a cold solve: four steps of 1.875 h
    inputs = np.tile(recipe_inputs[:, None], (1, mpc.n_stages))
    planned = mpc.rollout(state, parameters, starts, durations, inputs)
    # The same plan integrated step by step with the model's own RK4 at the substep length.
    x = state.copy()
    for k in range(mpc.n_stages):
        stage = model.rk4_step(durations[k], int(mpc.substeps(durations)[k]))
        _, x = stage(starts[k], x, inputs[:, k], parameters)
        x = np.asarray(x).ravel()
        np.testing.assert_allclose(planned[:, k + 1], x, rtol=1e-9, atol=1e-9)
    # After harvest the stages have zero length and leave the state alone.
    starts, durations = mpc.stage_grid(333.0, 336.0)
    frozen = mpc.rollout(state, parameters, starts, durations, inputs)
    assert mpc.substeps(durations).tolist() == [1.0, 1.0, 1.0] + [0.0] * 7
    np.testing.assert_array_equal(frozen[:, 3:], np.repeat(frozen[:, 3:4], 8, axis=1))
    with pytest.raises(ValueError, match="more RK4 substeps"):
        mpc.substeps(np.full(mpc.n_stages, 100.0))


def test_late_batch_plan_is_feasible_and_beats_holding_the_recipe(model, batch, late_batch):
    state, parameters, recipe_inputs = late_batch
    mpc = EconomicMpc(model, batch, MpcConfig(**SMALL))
    solution = mpc.solve(process_time_h=288.0, state=state, parameters=parameters, previous_inputs=recipe_inputs, harvest_time_h=336.0)
    assert solution.success, solution.reason
    lower = np.array([0.0, 0.0, batch.equipment.temperature_min_degc])[:, None]
    upper = np.array([batch.equipment.feed_rate_max_lph, batch.equipment.glucose_rate_max_lph, batch.equipment.temperature_max_degc])[:, None]
    assert np.all(solution.inputs >= lower) and np.all(solution.inputs <= upper)
    assert np.all(np.abs(np.diff(solution.inputs[2, :6])) <= 0.5 + 1e-6)  # rate limit on the 1-h stages
    # The prediction is the model's: re-simulating the plan with a cold solve's steps reproduces it.
    starts, durations = mpc.stage_grid(288.0, 336.0)
    replay = mpc.rollout(state, parameters, starts, durations, solution.inputs, cold=True)
    np.testing.assert_allclose(replay[:, -1], solution.states[:, -1], rtol=2e-6, atol=1e-6)
    # (the solve was cold: the warm solves' longer steps reproduce it less well)
    warm_steps = mpc.rollout(state, parameters, starts, durations, solution.inputs)
    scale = np.maximum(np.abs(solution.states[:, -1]), 1e-6)
    cold_error = np.max(np.abs(replay[:, -1] - solution.states[:, -1]) / scale)
    assert np.max(np.abs(warm_steps[:, -1] - solution.states[:, -1]) / scale) > 2.0 * cold_error
    # Holding the recipe's current setpoints to harvest is feasible; the optimum makes at least as much product.
    held = mpc.rollout(state, parameters, starts, durations, np.tile(recipe_inputs[:, None], (1, mpc.n_stages)))
    held_mass = held[STATE_INDEX["titer"], -1] * held[STATE_INDEX["volume"], -1]
    assert solution.predicted_product_mass_g >= held_mass - 1.0
    assert solution.slack_max < 1e-3
    assert solution.predicted_score_g_per_day == pytest.approx(solution.predicted_product_mass_g / (336.0 / 24.0 + 2.0))


def test_warm_start_converges_in_fewer_iterations(model, batch, late_batch):
    state, parameters, recipe_inputs = late_batch
    mpc = EconomicMpc(model, batch, MpcConfig(**SMALL))
    cold = mpc.solve(process_time_h=288.0, state=state, parameters=parameters, previous_inputs=recipe_inputs, harvest_time_h=336.0)
    next_state = cold.states[:, 1]
    warm = mpc.solve(process_time_h=289.0, state=next_state, parameters=parameters, previous_inputs=cold.first_inputs, harvest_time_h=336.0, warm=cold.warm)
    assert cold.success and warm.success
    assert warm.iterations < cold.iterations


def test_warm_start_multipliers_move_with_the_plan(model, batch, late_batch):
    """The previous cycle's multipliers are shifted one stage, like its inputs; the terminal ones stay."""
    state, parameters, recipe_inputs = late_batch
    mpc = EconomicMpc(model, batch, MpcConfig(**SMALL))
    solution = mpc.solve(process_time_h=288.0, state=state, parameters=parameters, previous_inputs=recipe_inputs, harvest_time_h=336.0)
    lam_g, lam_x = solution.warm["lam_g"], solution.warm["lam_x"]
    shifted_g, shifted_x = mpc._shift_multipliers(lam_g, lam_x)
    nx, n = model.n_states, mpc.n_stages
    dynamics = lam_g[nx : nx + nx * n].reshape((nx, n), order="F")
    np.testing.assert_array_equal(shifted_g[nx : nx + nx * n].reshape((nx, n), order="F")[:, :5], dynamics[:, 1:6])
    np.testing.assert_array_equal(shifted_g[:nx], lam_g[:nx])
    np.testing.assert_array_equal(shifted_g[-2:], lam_g[-2:])
    inputs_x = lam_x[nx * (n + 1) : nx * (n + 1) + 3 * n].reshape((3, n), order="F")
    np.testing.assert_array_equal(shifted_x[nx * (n + 1) : nx * (n + 1) + 3 * n].reshape((3, n), order="F")[:, :5], inputs_x[:, 1:6])
    assert shifted_g.shape == lam_g.shape and shifted_x.shape == lam_x.shape


def test_failed_solve_is_reported_not_hidden(model, batch, late_batch):
    state, parameters, recipe_inputs = late_batch
    mpc = EconomicMpc(model, batch, MpcConfig(**SMALL, max_iter=2))
    solution = mpc.solve(process_time_h=288.0, state=state, parameters=parameters, previous_inputs=recipe_inputs, harvest_time_h=336.0)
    assert not solution.success
    assert "Maximum_Iterations_Exceeded" in solution.reason


def test_compiled_nlp_is_cached_and_solves_like_the_interpreted_one(tmp_path):
    x, p = ca.SX.sym("x", 2), ca.SX.sym("p")
    nlp = {"x": x, "p": p, "f": (x[0] - p) ** 2 + (x[1] - 2 * p) ** 2 + x[0] * x[1], "g": x[0] + x[1]}
    options = {"print_time": False, "ipopt": {"print_level": 0, "sb": "yes"}}
    reference = compiled_nlpsol("tiny", "ipopt", nlp, options, compile_code=False)(x0=[0, 0], p=1.5, lbg=-1, ubg=2)
    compiled = compiled_nlpsol("tiny", "ipopt", nlp, options, cache_dir=tmp_path)(x0=[0, 0], p=1.5, lbg=-1, ubg=2)
    libraries = list(tmp_path.glob("tiny-ipopt-*.so"))
    assert len(libraries) == 1
    stamp = libraries[0].stat().st_mtime_ns
    again = compiled_nlpsol("tiny", "ipopt", nlp, options, cache_dir=tmp_path)(x0=[0, 0], p=1.5, lbg=-1, ubg=2)
    assert libraries[0].stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt
    np.testing.assert_allclose(np.asarray(compiled["x"]), np.asarray(reference["x"]), atol=1e-8)
    np.testing.assert_allclose(np.asarray(again["x"]), np.asarray(reference["x"]), atol=1e-8)
    # The cache key is the NLP itself: another objective is another library, never the old one.
    changed = {**nlp, "f": (x[0] - p) ** 2 + (x[1] - 3 * p) ** 2 + x[0] * x[1]}
    other = compiled_nlpsol("tiny", "ipopt", changed, options, cache_dir=tmp_path)(x0=[0, 0], p=1.5, lbg=-1, ubg=2)
    assert len(list(tmp_path.glob("tiny-ipopt-*.so"))) == 2
    expected = compiled_nlpsol("tiny", "ipopt", changed, options, compile_code=False)(x0=[0, 0], p=1.5, lbg=-1, ubg=2)
    np.testing.assert_allclose(np.asarray(other["x"]), np.asarray(expected["x"]), atol=1e-8)
