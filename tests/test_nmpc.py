"""The NMPC controller's decisions: fallbacks on solver failure, harvest, and the safety filter."""

from __future__ import annotations

import math

import numpy as np
import pytest

from controller.mpc import EconomicMpc, MpcConfig
from controller.nmpc import CycleObservation, NmpcConfig, NmpcController
from controller.safety import filter_setpoints
from controller.trust import TrustRegionConfig
from controller.types import Setpoints

SMALL = MpcConfig(fine_stages=6, coarse_stages=4, compile=False)
NO_TRUST_REGION = TrustRegionConfig(enabled=False)
"""Perfect knowledge (FrozenTruth) needs no trust region, and these tests are about the solver and the harvest mechanics."""


class FrozenTruth:
    """A state source holding one true state of a recipe batch (what the oracle would see then)."""

    def __init__(self, state: np.ndarray, parameters: np.ndarray) -> None:
        self.state, self.parameters = state, parameters

    def observe(self, observation: CycleObservation) -> tuple[np.ndarray, np.ndarray]:
        return self.state, self.parameters


def _observation(t: float, applied: Setpoints) -> CycleObservation:
    return CycleObservation(process_time_h=t, online={"volume_l": 1800.0}, feed_total_l=0.0, glucose_feed_total_l=0.0, applied=applied)


def test_solver_failure_falls_back_to_shifted_plan_then_recipe(model, batch, day_twelve):
    plc, applied = day_twelve
    source = FrozenTruth(plc.plant.state.copy(), plc.plant.parameters)
    controller = NmpcController(model, batch, source, NmpcConfig(mpc=SMALL, max_shifted_cycles=2))
    first = controller.cycle(_observation(288.0, applied))
    assert first.source == "mpc" and first.solution is not None and first.solution.success
    controller.mpc = EconomicMpc(model, batch, SMALL.model_copy(update={"max_iter": 1, "warm_max_iter": 1}))
    decisions = [controller.cycle(_observation(288.0 + k, first.setpoints)) for k in (1, 2, 3, 4)]
    assert [d.source for d in decisions] == ["shifted_plan", "shifted_plan", "recipe", "recipe"]
    assert decisions[0].solution is first.solution  # the last successful plan, shifted to now
    np.testing.assert_allclose(
        [decisions[1].setpoints.feed_rate_lph, decisions[1].setpoints.glucose_rate_lph, decisions[1].setpoints.temperature_degc],
        first.solution.inputs[:, 2],
    )
    recipe = controller.recipe.setpoints(292.0)
    last = controller.cycle(_observation(293.0, first.setpoints))
    assert last.source == "recipe" and last.setpoints.temperature_degc == recipe.temperature_degc
    assert controller.failures_total == 5


def test_a_failed_warm_solve_is_retried_with_the_cold_solver(model, batch, day_twelve):
    plc, applied = day_twelve
    source = FrozenTruth(plc.plant.state.copy(), plc.plant.parameters)
    controller = NmpcController(model, batch, source, NmpcConfig(mpc=SMALL, trust=NO_TRUST_REGION))  # compared with a solve without bounds
    first = controller.cycle(_observation(288.0, applied))
    reference = controller.mpc.solve(
        process_time_h=289.0,
        state=source.state,
        parameters=source.parameters,
        previous_inputs=first.solution.first_inputs,
        harvest_time_h=controller.harvest_time_h,
        warm=first.solution.warm,
    )
    assert reference.success and reference.retried_after == ""
    controller.mpc = EconomicMpc(model, batch, SMALL.model_copy(update={"warm_max_iter": 1}))
    decision = controller.cycle(_observation(289.0, first.setpoints))
    solution = decision.solution
    assert decision.source == "mpc" and solution is not None and solution.success
    assert solution.retried_after == "Maximum_Iterations_Exceeded" and solution.iterations > 1
    assert solution.predicted_product_mass_g == pytest.approx(reference.predicted_product_mass_g, rel=1e-4)
    assert controller.cold_retries_total == 1 and controller.failures_total == 0
    assert decision.solve_time_s == solution.solve_time_s == controller.solve_times_s[-1]
    # When the cold solver fails too, the answer is a failure that names the cold solver's status.
    failing = EconomicMpc(model, batch, SMALL.model_copy(update={"warm_max_iter": 1, "max_iter": 1}))
    both = failing.solve(
        process_time_h=290.0,
        state=source.state,
        parameters=source.parameters,
        previous_inputs=solution.first_inputs,
        harvest_time_h=controller.harvest_time_h,
        warm=solution.warm,
    )
    assert not both.success and both.retried_after == "Maximum_Iterations_Exceeded"
    assert both.reason == "solver status Maximum_Iterations_Exceeded" and both.iterations == 2


def test_a_cycle_reports_the_time_of_all_its_solves(model, batch, day_twelve):
    """A cycle that also solves a later harvest candidate reports both solves' time, as the runtime records it."""
    plc, applied = day_twelve
    config = NmpcConfig(mpc=SMALL, initial_harvest_h=300.0, later_harvest_every_cycles=1, trust=NO_TRUST_REGION)
    controller = NmpcController(model, batch, FrozenTruth(plc.plant.state.copy(), plc.plant.parameters), config)
    decision = controller.cycle(_observation(288.0, applied))
    assert len(controller.solve_times_s) == 2  # the plan and the candidate 12 h later
    assert decision.solve_time_s == pytest.approx(sum(controller.solve_times_s))


def test_harvest_is_requested_when_the_planned_time_arrives(model, batch, day_twelve):
    plc, applied = day_twelve
    controller = NmpcController(model, batch, FrozenTruth(plc.plant.state.copy(), plc.plant.parameters), NmpcConfig(mpc=SMALL, initial_harvest_h=300.0, trust=NO_TRUST_REGION))
    assert not controller.cycle(_observation(299.0, applied)).setpoints.harvest
    decision = controller.cycle(_observation(299.7, applied))
    assert decision.setpoints.harvest and decision.source == "harvest"
    assert math.isnan(decision.solve_time_s)  # nothing was solved in this cycle


def test_safety_filter_clamps_holds_and_rate_limits(batch):
    last = Setpoints(1.0, 0.5, 36.5)
    wild = filter_setpoints(Setpoints(50.0, math.nan, 30.0), last, batch, temperature_rate_degc_per_h=0.5, dt_h=1.0)
    assert wild.setpoints.feed_rate_lph == batch.equipment.feed_rate_max_lph
    assert wild.setpoints.glucose_rate_lph == 0.5  # non-finite: the last value is held
    assert wild.setpoints.temperature_degc == 36.0  # at most 0.5 °C per hour
    assert len(wild.adjustments) == 3
    calm = filter_setpoints(Setpoints(2.0, 0.1, 36.3), last, batch, temperature_rate_degc_per_h=0.5, dt_h=1.0)
    assert calm.setpoints == Setpoints(2.0, 0.1, 36.3) and calm.adjustments == ()
