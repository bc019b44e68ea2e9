"""The robust multi-stage NMPC: one scenario is the economic NMPC, several share their first inputs and each keeps its own constraints; the scenario builder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import structlog

from controller import codegen
from controller.estimator import ExtendedKalmanEstimator
from controller.mpc import STATE_SCALE, EconomicMpc, MpcConfig
from controller.robust import (
    DEFAULT_K_SIGMA,
    RobustMpc,
    RobustMpcSolution,
    ScenarioError,
    ScenarioSource,
    parameter_scenarios,
    scenarios_from_calibration,
    scenarios_from_estimate,
    three_point_weights,
)
from plant_models.cho import PARAMETER_INDEX, STATE_INDEX
from plant_models.parameters import ModelProvenance, ParameterEstimate
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

SMALL = {"fine_stages": 6, "coarse_stages": 4, "compile": False, "deadline_s": 600.0}  # uncompiled on a loaded machine: the deadline is not what these tests are about
GLUCOSE_MAINTENANCE = "culture.metabolism.glucose_maintenance_g_per_1e9_cells_h"
DEATH = "culture.death.kd_min_per_h"
Q_PRODUCT = "culture.product.q_product_pg_per_cell_day"


def recipe_state(at_h: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth of a platform recipe batch at ``at_h``: the state, the true parameters, the recipe's setpoints then."""
    plc, _ = build_simulated_plc(load_simulation(CONFIGS / "simulate" / "platform.yaml"))
    plc.set_operator_remote(False)
    plc.advance_to(at_h)
    snapshot = plc.snapshot()
    setpoints = np.array([snapshot["SP.FeedRate"].value, snapshot["SP.GlucoseRate"].value, snapshot["SP.Temperature"].value])
    return plc.plant.state.copy(), np.asarray(plc.plant.parameters, dtype=float), setpoints


@pytest.fixture(scope="module")
def day_four() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Day 4 (96 h): cells growing fast, glucose 2.1 g/L, so a faster glucose uptake threatens the window's lower edge."""
    return recipe_state(96.0)


@pytest.fixture(scope="module")
def day_twelve_truth(day_twelve) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    plc, applied = day_twelve
    return plc.plant.state.copy(), np.asarray(plc.plant.parameters, dtype=float), np.array([applied.feed_rate_lph, applied.glucose_rate_lph, applied.temperature_degc])


def with_factor(parameters: np.ndarray, name: str, factor: float) -> np.ndarray:
    changed = parameters.copy()
    changed[PARAMETER_INDEX[name]] *= factor
    return changed


# --------------------------------------------------------------------------- one scenario


def test_one_scenario_is_the_economic_mpc(model, batch, day_twelve_truth):
    """With one scenario the NLP is EconomicMpc's: a cold solve and the next cycle's warm one find EconomicMpc's optimum and plan."""
    state, parameters, recipe_inputs = day_twelve_truth
    economic = EconomicMpc(model, batch, MpcConfig(**SMALL))
    robust = RobustMpc(model, batch, MpcConfig(**SMALL), n_scenarios=1)
    arguments = {"process_time_h": 288.0, "state": state, "parameters": parameters, "previous_inputs": recipe_inputs, "harvest_time_h": 336.0}
    expected = economic.solve(**arguments)
    found = robust.solve(**arguments, scenarios=parameters[:, None])
    assert expected.success and found.success, (expected.reason, found.reason)
    assert found.nominal_presolve_status == "Solve_Succeeded"
    assert found.objective == pytest.approx(expected.objective, rel=2e-6)  # both converged to IPOPT's tol 1e-6
    # The objective is flat in the feed near its optimum: the plans agree to 0.1 % of each input's range.
    input_range = np.array([batch.equipment.feed_rate_max_lph, batch.equipment.glucose_rate_max_lph, batch.equipment.temperature_max_degc])
    assert np.all(np.abs(found.first_inputs - expected.first_inputs) <= 1e-3 * input_range)
    assert found.predicted_product_mass_g == pytest.approx(expected.predicted_product_mass_g, rel=1e-6)
    # The next cycle, each warm-started from its own plan: the same again.
    following = {**arguments, "process_time_h": 289.0, "state": expected.states[:, 1], "previous_inputs": expected.first_inputs}
    expected_warm = economic.solve(**following, warm=expected.warm)
    found_warm = robust.solve(**following, warm=found.warm, scenarios=parameters[:, None])
    assert expected_warm.success and found_warm.success, (expected_warm.reason, found_warm.reason)
    assert found_warm.retried_after == "" and found_warm.nominal_presolve_status == ""
    assert found_warm.objective == pytest.approx(expected_warm.objective, rel=2e-6)
    assert np.all(np.abs(found_warm.first_inputs - expected_warm.first_inputs) <= 1e-3 * input_range)


# --------------------------------------------------------------------------- several scenarios


@pytest.fixture(scope="module")
def fast_uptake_plan(model, batch, day_four):
    """Day 4 planned for three scenarios of glucose maintenance uptake: nominal, 1.5 times faster, 1.5 times slower."""
    state, parameters, recipe_inputs = day_four
    scenarios = np.stack([parameters, with_factor(parameters, GLUCOSE_MAINTENANCE, 1.5), with_factor(parameters, GLUCOSE_MAINTENANCE, 1 / 1.5)], axis=1)
    robust = RobustMpc(model, batch, MpcConfig(**SMALL), n_scenarios=3)
    solution = robust.solve(process_time_h=96.0, state=state, parameters=parameters, previous_inputs=recipe_inputs, harvest_time_h=336.0, scenarios=scenarios)
    return robust, scenarios, solution


def test_scenarios_share_their_first_inputs_and_follow_their_own_dynamics(fast_uptake_plan, day_four):
    robust, scenarios, solution = fast_uptake_plan
    state = day_four[0]
    assert solution.success, solution.reason
    assert solution.retried_after == ""
    first = solution.scenario_inputs[:, :, 0]
    np.testing.assert_array_equal(first, np.tile(solution.first_inputs, (3, 1)))
    # Later inputs are each scenario's own: the fast-uptake scenario feeds more glucose than the slow one.
    assert np.sum(solution.scenario_inputs[1, 1]) > np.sum(solution.scenario_inputs[2, 1]) + 0.1
    # Each scenario's states are its own dynamics under its own inputs (a cold solve's RK4 steps: the nominal plan started it).
    starts, durations = robust.stage_grid(96.0, 336.0)
    for s in range(3):
        replay = robust.nominal.rollout(state, scenarios[:, s], starts, durations, solution.scenario_inputs[s], cold=True)
        # (to IPOPT's tolerance on the scaled dynamics)
        assert np.all(np.abs(replay - solution.scenario_states[s]) <= 1e-5 * STATE_SCALE[:, None])
    # The inherited fields describe the nominal scenario; the predictions are the scenarios' mean.
    np.testing.assert_array_equal(solution.states, solution.scenario_states[0])
    np.testing.assert_array_equal(solution.inputs, solution.scenario_inputs[0])
    assert solution.predicted_product_mass_g == pytest.approx(float(np.mean(solution.scenario_product_mass_g)))
    i_p, i_v = STATE_INDEX["titer"], STATE_INDEX["volume"]
    np.testing.assert_allclose(solution.scenario_product_mass_g, solution.scenario_states[:, i_p, -1] * solution.scenario_states[:, i_v, -1])


def test_constraints_hold_in_every_scenario_where_the_nominal_plan_breaks_them(fast_uptake_plan, model, batch, day_four):
    """The nominal plan starves the fast-uptake scenario of glucose; the robust plan keeps it in the window (up to its slack, which is 0)."""
    robust, scenarios, solution = fast_uptake_plan
    state, parameters, recipe_inputs = day_four
    config = robust.config
    i_g = STATE_INDEX["glucose"]
    nominal = robust.nominal.solve(process_time_h=96.0, state=state, parameters=parameters, previous_inputs=recipe_inputs, harvest_time_h=336.0)
    assert nominal.success, nominal.reason
    starts, durations = robust.stage_grid(96.0, 336.0)
    starved = robust.nominal.rollout(state, scenarios[:, 1], starts, durations, nominal.inputs, cold=True)
    assert np.min(starved[i_g, 1:]) < config.glucose_min_g_per_l - 0.5
    for s in range(3):
        glucose = solution.scenario_states[s, i_g, 1:]
        assert np.min(glucose) >= config.glucose_min_g_per_l - solution.scenario_slack_max[s] - 1e-6
        assert np.max(glucose) <= config.glucose_max_g_per_l + solution.scenario_slack_max[s] + 1e-6
        assert solution.scenario_slack_max[s] < 1e-4
        volume = solution.scenario_states[s, STATE_INDEX["volume"], 1:]
        assert np.max(volume) <= batch.equipment.max_working_volume_l - config.volume_backoff_l + 1e-3
    # Hedging costs the nominal scenario little product.
    assert solution.scenario_product_mass_g[0] >= 0.98 * nominal.predicted_product_mass_g


def test_warm_start_from_the_previous_robust_or_economic_plan(fast_uptake_plan, day_four, model, batch):
    """The previous cycle's plan and multipliers, shifted and made non-anticipative again, start the next solve without a cold retry; an EconomicMpc's plan starts every scenario of a cold solve."""
    robust, scenarios, solution = fast_uptake_plan
    state, parameters, _ = day_four
    next_cycle = {"process_time_h": 97.0, "state": solution.states[:, 1], "parameters": parameters, "previous_inputs": solution.first_inputs, "harvest_time_h": 336.0}
    warm = robust.solve(**next_cycle, warm=solution.warm, scenarios=scenarios)
    assert warm.success and warm.retried_after == "", (warm.reason, warm.retried_after)
    assert warm.iterations <= 6 < solution.iterations
    economic = robust.nominal.solve(process_time_h=96.0, state=state, parameters=parameters, previous_inputs=solution.first_inputs, harvest_time_h=336.0)
    lifted = robust.solve(**next_cycle, warm=economic.warm, scenarios=scenarios)
    assert lifted.success, lifted.reason
    assert lifted.nominal_presolve_status == ""  # the EconomicMpc's plan was the nominal plan
    assert lifted.objective == pytest.approx(warm.objective, rel=1e-3)  # a cold solve's shorter RK4 steps
    assert np.max(lifted.scenario_slack_max) < 1e-4


def test_bad_scenarios_are_refused(fast_uptake_plan, day_four, model, batch):
    robust, scenarios, _ = fast_uptake_plan
    state, parameters, recipe_inputs = day_four
    arguments = {"process_time_h": 96.0, "state": state, "parameters": parameters, "previous_inputs": recipe_inputs, "harvest_time_h": 336.0}
    with pytest.raises(ScenarioError, match="3 finite"):
        robust.solve(**arguments, scenarios=scenarios[:, :2])
    with pytest.raises(ScenarioError, match="first scenario"):
        robust.solve(**arguments, scenarios=scenarios[:, ::-1])
    with pytest.raises(ScenarioError, match="weights"):
        robust.solve(**arguments, scenarios=scenarios, weights=np.array([1.0, -1.0, 1.0]))
    with pytest.raises(ScenarioError, match="IPOPT"):
        RobustMpc(model, batch, MpcConfig(**SMALL, solver="fatrop"))


# --------------------------------------------------------------------------- scenario builder


def test_nine_scenarios_centred_on_the_nominal(nominal_p):
    log_sd = {DEATH: 0.5, Q_PRODUCT: 0.3, GLUCOSE_MAINTENANCE: 0.2, "culture.measurement.capacitance_pf_per_cm_per_1e6_cells_ml": 0.9, "media.nutrient_feed_strength": 0.8}
    built = parameter_scenarios(nominal_p, log_sd)
    # The two most uncertain *kinetic* parameters: a measurement relation or a feed lot moves no kinetics.
    assert built.names == (DEATH, Q_PRODUCT)
    assert built.parameters.shape == (nominal_p.size, 9)
    assert len({tuple(column) for column in built.parameters.T}) == 9
    np.testing.assert_array_equal(built.parameters[:, 0], nominal_p)
    others = [i for i in range(nominal_p.size) if i not in (PARAMETER_INDEX[DEATH], PARAMETER_INDEX[Q_PRODUCT])]
    np.testing.assert_array_equal(built.parameters[others], np.tile(nominal_p[others, None], (1, 9)))
    for row, name in enumerate(built.names):
        logs = np.log(built.parameters[PARAMETER_INDEX[name]] / nominal_p[PARAMETER_INDEX[name]])
        sd = log_sd[name]
        # Centred: each parameter at 0 and ±kσ of its ln, three times each; the weighted mean is the centre, the weighted variance σ².
        np.testing.assert_allclose(np.sort(logs), np.repeat([-DEFAULT_K_SIGMA * sd, 0.0, DEFAULT_K_SIGMA * sd], 3), atol=1e-12)
        assert float(built.weights @ logs) == pytest.approx(0.0, abs=1e-12)
        assert float(built.weights @ logs**2) == pytest.approx(sd**2, rel=1e-9)
        np.testing.assert_allclose(built.log_offsets[row], logs, atol=1e-12)
    assert built.weights.sum() == pytest.approx(1.0)
    assert np.argmax(built.weights) == 0


def test_three_point_weights_match_a_normal_variable():
    weights = three_point_weights(2.0)
    points = np.array([0.0, -2.0, 2.0])
    assert weights.sum() == pytest.approx(1.0) and float(weights @ points**2) == pytest.approx(1.0)
    with pytest.raises(ScenarioError):
        three_point_weights(0.9)


def test_scenarios_from_the_estimator_and_from_a_calibration(model, batch, nominal_p):
    estimate = ExtendedKalmanEstimator.from_batch(model, batch, nominal_p).estimate
    from_filter = scenarios_from_estimate(estimate, k_sigma=2.0)
    assert from_filter.source is ScenarioSource.ESTIMATOR
    kinetic = {name: sd for name, sd in estimate.multiplier_log_sd.items() if name.startswith("culture.") and not name.startswith("culture.measurement.")}
    assert sorted(from_filter.log_sd, reverse=True) == sorted(kinetic.values(), reverse=True)[:2]
    np.testing.assert_array_equal(from_filter.parameters[:, 0], estimate.parameters)
    np.testing.assert_allclose(np.max(from_filter.log_offsets, axis=1), 2.0 * np.array(from_filter.log_sd))

    base = nominal_p[PARAMETER_INDEX[GLUCOSE_MAINTENANCE]]
    estimates = {
        GLUCOSE_MAINTENANCE: ParameterEstimate(nominal=base, value=base * 1.2, ci95_low=base * 1.2 / 1.5, ci95_high=base * 1.2 * 1.5, identifiable=True),
        DEATH: ParameterEstimate(nominal=1.0, value=1.1, ci95_low=1.0, ci95_high=1.21, identifiable=True),
        "culture.growth.mu_max_per_h": ParameterEstimate(nominal=0.04, value=0.04, ci95_low=None, ci95_high=None, identifiable=False),
        # A correction's interval is of an amount added (here all positive, as a multiplier's would be): the grid does not vary it.
        "culture.correction.death_temperature_per_degc": ParameterEstimate(nominal=0.0, value=0.2, ci95_low=0.1, ci95_high=0.4, identifiable=True),
    }
    provenance = ModelProvenance(
        created_utc="2026-01-01T00:00:00Z",
        tool="test",
        based_on="nominal",
        inputs=(),
        batches=(),
        parameters=estimates,
        not_identifiable=("culture.growth.mu_max_per_h",),
        fit_statistics={},
    )
    centre = with_factor(nominal_p, GLUCOSE_MAINTENANCE, 1.2)
    from_fit = scenarios_from_calibration(provenance, centre)
    assert from_fit.source is ScenarioSource.CALIBRATION
    assert from_fit.names == (GLUCOSE_MAINTENANCE, DEATH)
    assert from_fit.log_sd[0] == pytest.approx(math.log(1.5) / 1.959964, rel=1e-5)  # a 95 % interval of ×/÷ 1.5
    multipliers = from_fit.parameters[PARAMETER_INDEX[GLUCOSE_MAINTENANCE]] / centre[PARAMETER_INDEX[GLUCOSE_MAINTENANCE]]
    assert max(multipliers) == pytest.approx(1.5 ** (DEFAULT_K_SIGMA / 1.959964), rel=1e-5)
    assert "culture.correction.death_temperature_per_degc" not in from_fit.names
    with pytest.raises(ScenarioError, match="no spread is known for \\['culture.correction.death_temperature_per_degc'\\]"):
        scenarios_from_calibration(provenance, centre, names=(DEATH, "culture.correction.death_temperature_per_degc"))
    with pytest.raises(ScenarioError, match="two distinct"):
        parameter_scenarios(nominal_p, {DEATH: 0.5})
    with pytest.raises(ScenarioError, match="unknown"):
        parameter_scenarios(nominal_p, {"culture.growth.no_such": 0.5, DEATH: 0.5})


def test_the_controller_plans_robustly_over_the_estimators_uncertainty():
    """With ``nmpc.robust.enabled`` the deployed cycle plans for 9 scenarios of the estimator's own parameter uncertainty.

    (Uncompiled, a solve can take long on a loaded machine: the deadline is not what this test is about.)
    """
    from controller.nmpc import NmpcConfig, RobustConfig
    from controller.runtime_config import RuntimeSettings
    from simulator.closed_loop import estimator_source, run_controlled_batch
    from simulator.scenarios import load_scenario

    settings = RuntimeSettings().model_copy(
        update={"nmpc": NmpcConfig(mpc=MpcConfig(fine_stages=4, coarse_stages=3, compile=False, deadline_s=600.0), robust=RobustConfig(enabled=True))}
    )
    captured: list[RobustMpcSolution] = []
    original = RobustMpc.solve

    def spy(self, **arguments):
        solution = original(self, **arguments)
        scenarios = arguments["scenarios"]
        assert scenarios.shape[1] == 9 and np.unique(scenarios, axis=1).shape[1] == 9, "nine distinct scenarios"
        np.testing.assert_allclose(scenarios[:, 0], arguments["parameters"])
        captured.append(solution)
        return solution

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RobustMpc, "solve", spy)
        result = run_controlled_batch(load_scenario({"seed": 1}), make_source=estimator_source, settings=settings, max_cycles=3)
    assert result.decisions_by_source == {"mpc": 3} and len(captured) == 3
    assert all(isinstance(s, RobustMpcSolution) and s.success for s in captured)


# --------------------------------------------------------------------------- compiled in the background


@pytest.mark.compile  # two libraries compiled from scratch (minutes); run with ./dev.sh test -m compile
@pytest.mark.timeout(1800)
def test_background_compile_starts_interpreted_then_switches(model, batch, day_twelve_truth, tmp_path, monkeypatch):
    """A cache miss of both libraries (the nominal NLP's and the robust one's) with a background compile: the first robust solve runs
    interpreted, the first after both compiles end runs compiled, and both find the same plan."""
    monkeypatch.setenv("BIOREACTOR_MPC_CACHE", str(tmp_path))
    state, parameters, recipe_inputs = day_twelve_truth
    scenarios = np.stack([parameters, with_factor(parameters, DEATH, 1.3), with_factor(parameters, DEATH, 1 / 1.3)], axis=1)
    arguments = {"process_time_h": 288.0, "state": state, "parameters": parameters, "previous_inputs": recipe_inputs, "harvest_time_h": 336.0, "scenarios": scenarios}
    with structlog.testing.capture_logs() as events:
        robust = RobustMpc(model, batch, MpcConfig(**{**SMALL, "compile": True}), n_scenarios=3, background_compile=True)
        jobs = [robust.compile_job, robust.nominal.compile_job]
        assert not robust.compiled and robust.library.parent == tmp_path
        first = robust.solve(**arguments)
        assert first.success and not robust.compiled, first.reason
        for job in jobs:
            assert job is not None and job.wait(codegen.COMPILE_TIMEOUT_S), job and job.error
        second = robust.solve(**arguments)
        assert robust.compiled and second.success, second.reason
    switched = sorted(Path(event["library"]).name for event in events if event["event"] == "mpc_switched_to_compiled")
    assert switched == sorted([robust.library.name, robust.nominal.library.name])
    assert second.objective == pytest.approx(first.objective, rel=1e-6)
    np.testing.assert_allclose(second.first_inputs, first.first_inputs, rtol=1e-5, atol=1e-7)
