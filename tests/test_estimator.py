"""The extended Kalman filter against the simulated PLC's truth.

The simulator is run once per scenario and recorded cycle by cycle (what the
runtime would see: delivered inputs from the totalisers, good online values,
new lab results when ``Sample.Seq`` moves, plus the truth for checking); the
estimators under test are then fed from the recording, so two estimators can
see exactly the same data.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from structlog.testing import capture_logs

from controller.estimator import (
    CAPACITANCE_PER_CELL,
    INFLATED_BY,
    MEASUREMENT_NAMES,
    ConsistencyConfig,
    EkfFunctions,
    EstimatorConfig,
    EstimatorDivergedError,
    EstimatorInputError,
    ExtendedKalmanEstimator,
    StateEstimate,
    chi_square_quantile,
    delivered_inputs,
)
from controller.nmpc import CycleObservation
from controller.quality import ONLINE_SIGNALS, SAMPLE_SIGNALS
from controller.types import LAB_FIELDS, LabResult, Setpoints
from plant_models.cho import STATE_INDEX, STATES, CultureModel
from plant_models.parameters import PARAMETER_NAMES
from simulator.batch import build_simulated_plc
from simulator.config import LoadedSimulation

pytestmark = pytest.mark.usefixtures("uncached_logging")

MU = "culture.growth.mu_max_per_h"
QP = "culture.product.q_product_pg_per_cell_day"


@pytest.fixture(scope="module")
def functions() -> EkfFunctions:
    return EkfFunctions(CultureModel(), [p.name for p in EstimatorConfig().parameters])


@dataclass
class Cycle:
    """One control cycle as the runtime sees it, and the truth at its end."""

    time_h: float
    inputs: np.ndarray
    online: dict[str, float]
    labs: list[LabResult]
    truth: np.ndarray
    feed_total_l: float = 0.0
    glucose_feed_total_l: float = 0.0
    setpoints: Setpoints = Setpoints(0.0, 0.0, 36.5)  # noqa: RUF009 - a frozen dataclass, shared safely


@dataclass
class Recording:
    cycles: list[Cycle]
    published: list[LabResult] = field(default_factory=list)
    true_parameters: np.ndarray = field(default_factory=lambda: np.zeros(0))


def record(loaded: LoadedSimulation, hours: float, *, keep_nan: bool = False) -> Recording:
    """Run the recipe batch hour by hour and record what the runtime would be given.

    Online values with a Bad status are dropped (the runtime's data-quality
    check); with ``keep_nan`` a Good-but-NaN value is passed on, to test that
    the estimator itself ignores it.
    """
    plc, _ = build_simulated_plc(loaded)
    plc.set_operator_remote(False)
    previous = plc.snapshot()
    seq = int(previous["Sample.Seq"].value)
    cycles: list[Cycle] = []
    while plc.process_time_h < hours - 1e-9:
        t_start = plc.process_time_h
        plc.advance_to(plc.next_cycle_boundary_h())
        now = plc.snapshot()
        inputs = delivered_inputs(
            previous_feed_total_l=previous["PV.FeedTotal"].value,
            feed_total_l=now["PV.FeedTotal"].value,
            previous_glucose_feed_total_l=previous["PV.GlucoseFeedTotal"].value,
            glucose_feed_total_l=now["PV.GlucoseFeedTotal"].value,
            dt_h=plc.process_time_h - t_start,
            temperature_setpoint_degc=previous["SP.Temperature"].value,
        )
        online = {name: float(now[tag].value) for tag, name in ONLINE_SIGNALS.items() if now[tag].good and (keep_nan or math.isfinite(float(now[tag].value)))}
        labs = []
        if int(now["Sample.Seq"].value) != seq:
            seq = int(now["Sample.Seq"].value)
            values = {name: float(now[tag].value) if now[tag].good else math.nan for tag, name in zip(SAMPLE_SIGNALS, LAB_FIELDS, strict=True)}
            result = LabResult(seq=seq, taken_at_h=float(now["Sample.TakenAt"].value), **values)
            assert result.taken_at_h == plc.published[-1].taken_at_h
            labs.append(result)
        setpoints = Setpoints(*(float(now[tag].value) for tag in ("SP.FeedRate", "SP.GlucoseRate", "SP.Temperature")))
        totals = (float(now["PV.FeedTotal"].value), float(now["PV.GlucoseFeedTotal"].value))
        cycles.append(Cycle(plc.process_time_h, inputs, online, labs, plc.plant.state.copy(), *totals, setpoints))
        previous = now
    return Recording(cycles, list(plc.published), plc.plant.parameters)


def run_filter(estimator: ExtendedKalmanEstimator, cycles: list[Cycle], *, with_labs: bool = True) -> list[StateEstimate]:
    return [estimator.step(c.time_h, c.inputs, c.online, c.labs if with_labs else ()) for c in cycles]


def relative_error(estimate: float, truth: float) -> float:
    return abs(estimate - truth) / abs(truth)


def new_filter(batch, nominal_p, functions, config: EstimatorConfig | None = None) -> ExtendedKalmanEstimator:
    return ExtendedKalmanEstimator.from_batch(CultureModel(), batch, nominal_p, config, functions=functions)


# --------------------------------------------------------------------------- accuracy


def test_nominal_batch_tracks_truth_at_day_five(make_simulation, batch, nominal_p, functions):
    recording = record(make_simulation(), 120.0)
    estimator = new_filter(batch, nominal_p, functions)
    started = time.perf_counter()
    estimates = run_filter(estimator, recording.cycles)
    per_cycle_s = (time.perf_counter() - started) / len(recording.cycles)
    final, truth = estimates[-1], recording.cycles[-1].truth
    assert final.process_time_h == pytest.approx(120.0)
    for name, tolerance in (("viable_cells", 0.05), ("glucose", 0.10), ("titer", 0.15), ("lactate", 0.10), ("volume", 0.005)):
        i = STATE_INDEX[name]
        error = abs(final.state[i] - truth[i])
        assert error <= 3.0 * final.state_sd[i], (name, final.state[i], truth[i], final.state_sd[i])
        assert error <= tolerance * truth[i], (name, final.state[i], truth[i])
    # The truth is nominal: the multipliers stay near 1 within their reported uncertainty.
    for name, multiplier in final.multipliers.items():
        assert abs(math.log(multiplier)) <= max(3.0 * final.multiplier_log_sd[name], 0.05), (name, multiplier)
    assert final.rejected_online == 0 and final.rejected_lab == 0
    assert per_cycle_s < 0.02  # measured ≈ 1 ms on 2 cores; generous for loaded CI machines


def test_faster_growth_and_lower_productivity_are_learned(make_simulation, batch, nominal, nominal_p, functions, model):
    loaded = make_simulation(true_parameter_factors={"growth.mu_max_per_h": 1.25, "product.q_product_pg_per_cell_day": 0.8})
    recording = record(loaded, 120.0)
    estimator = new_filter(batch, nominal_p, functions)
    estimates = run_filter(estimator, recording.cycles)

    mu = np.array([e.multipliers[MU] for e in estimates])
    converged = np.flatnonzero(np.abs(mu - 1.25) > 0.05)
    converged_h = recording.cycles[converged[-1] + 1].time_h if converged.size else recording.cycles[0].time_h
    assert converged_h <= 24.0, f"mu_max multiplier within ±0.05 of 1.25 only from {converged_h} h"
    final = estimates[-1]
    assert abs(final.multipliers[MU] - 1.25) < 0.05
    assert final.multipliers[QP] < 0.92  # moved from 1 towards the true 0.8
    assert final.parameters[PARAMETER_NAMES.index(MU)] == pytest.approx(final.multipliers[MU] * nominal.growth.mu_max_per_h)
    np.testing.assert_array_equal(estimator.parameter_vector(), final.parameters)

    # Open loop: the nominal model fed with the same delivered inputs.
    step = model.rk4_step(1.0, 6)
    x = batch.inoculation.initial_state()
    for cycle in recording.cycles:
        x = np.asarray(step(cycle.time_h - 1.0, x, cycle.inputs, nominal_p)[1]).ravel()
    truth = recording.cycles[-1].truth
    for name in ("viable_cells", "glucose", "lactate"):
        i = STATE_INDEX[name]
        estimated_error, open_loop_error = relative_error(final.state[i], truth[i]), relative_error(x[i], truth[i])
        assert estimated_error < 0.5 * open_loop_error, (name, estimated_error, open_loop_error)
    # Titer: faster growth and lower productivity nearly cancel in the open loop, so compare with
    # the reported uncertainty instead.
    for name in ("viable_cells", "glucose", "lactate", "titer"):
        i = STATE_INDEX[name]
        assert relative_error(final.state[i], truth[i]) < 0.10, name
        assert abs(final.state[i] - truth[i]) < 3.0 * final.state_sd[i], name


# --------------------------------------------------------------------------- out-of-sequence lab results


def _in_order(estimator: ExtendedKalmanEstimator, cycles: list[Cycle], published: list[LabResult]) -> StateEstimate:
    """Feed every lab result exactly at its draw time: stop the filter there, apply it, go on.

    A result drawn exactly at a cycle time is applied after that cycle's
    online values, as the late path does.
    """
    by_draw = sorted(published, key=lambda r: r.taken_at_h)
    estimate = estimator.estimate
    for cycle in cycles:
        while by_draw and by_draw[0].taken_at_h < cycle.time_h:
            result = by_draw.pop(0)
            if result.taken_at_h > estimator.process_time_h:
                estimator.step(result.taken_at_h, cycle.inputs)
            estimator.apply_lab_result(result)
        estimate = estimator.step(cycle.time_h, cycle.inputs, cycle.online)
        while by_draw and by_draw[0].taken_at_h == cycle.time_h:
            estimate = estimator.apply_lab_result(by_draw.pop(0))
    return estimate


def test_late_results_are_applied_at_their_draw_time(make_simulation, batch, nominal_p, functions):
    recording = record(make_simulation(), 100.0)
    published = [lab for cycle in recording.cycles for lab in cycle.labs]
    assert len(published) >= 4 and all(cycle.time_h - lab.taken_at_h >= 3.0 for cycle in recording.cycles for lab in cycle.labs)

    late = run_filter(new_filter(batch, nominal_p, functions), recording.cycles)[-1]
    in_order = _in_order(new_filter(batch, nominal_p, functions), recording.cycles, published)
    np.testing.assert_allclose(late.state, in_order.state, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(late.covariance, in_order.covariance, rtol=1e-5, atol=1e-10)
    for name in late.multipliers:
        assert late.multipliers[name] == pytest.approx(in_order.multipliers[name], rel=1e-6)

    # Ignoring the lab results instead would leave a visibly different estimate.
    online_only = run_filter(new_filter(batch, nominal_p, functions), recording.cycles, with_labs=False)[-1]
    assert abs(online_only.value("titer") - late.value("titer")) > 10 * abs(late.value("titer") - in_order.value("titer")) + 1e-6


def test_past_result_changes_now_as_a_rerun_would(make_simulation, batch, nominal_p, functions):
    """Unit level: results arriving late and out of order equal a re-run with them at their draw times."""
    cycles = record(make_simulation(), 12.0).cycles

    def lab(seq: int, taken_at_h: float, truth: np.ndarray, bias: float) -> LabResult:
        """A result near the truth (``bias`` is within the assay noise) with titer not measured."""
        s = STATE_INDEX
        return LabResult(
            seq=seq,
            taken_at_h=taken_at_h,
            vcd_1e6_per_ml=truth[s["viable_cells"]] * (1 + bias),
            viability_pct=100.0 * truth[s["viable_cells"]] / (truth[s["viable_cells"]] + truth[s["dead_cells"]]),
            glucose_g_per_l=truth[s["glucose"]] * (1 - bias),
            lactate_g_per_l=truth[s["lactate"]] * (1 + bias),
            glutamine_mm=truth[s["glutamine"]] * (1 - bias),
            ammonia_mm=truth[s["ammonia"]] * (1 + bias),
            titer_g_per_l=math.nan,
            osmolality_mosm_per_kg=math.nan,
        )

    first = lab(1, 6.5, cycles[5].truth, 0.05)
    second = lab(2, 9.25, cycles[8].truth, -0.04)

    late = new_filter(batch, nominal_p, functions)
    before = run_filter(late, cycles, with_labs=False)[-1]
    late.apply_lab_result(second)
    after = late.apply_lab_result(first)  # older than the one already applied
    assert after.process_time_h == before.process_time_h == 12.0
    assert after.value("glucose") != pytest.approx(before.value("glucose"), rel=1e-4)

    rerun = _in_order(new_filter(batch, nominal_p, functions), cycles, [first, second])
    assert after.rejected_lab == rerun.rejected_lab == 0
    np.testing.assert_allclose(after.state, rerun.state, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(after.covariance, rerun.covariance, rtol=1e-8, atol=1e-14)

    # The same result twice is applied once.
    again = late.apply_lab_result(first)
    np.testing.assert_array_equal(again.state, after.state)


def test_results_outside_the_kept_history_are_rejected(make_simulation, batch, nominal_p, functions):
    cycles = record(make_simulation(), 12.0).cycles
    estimator = new_filter(batch, nominal_p, functions, EstimatorConfig(history_h=4.0))
    before = run_filter(estimator, cycles)[-1]
    old = LabResult(1, 2.0, 0.6, 97.0, 5.9, 0.3, 5.8, 0.6, math.nan, 300.0)
    future = LabResult(2, 13.0, 0.6, 97.0, 5.9, 0.3, 5.8, 0.6, math.nan, 300.0)
    with capture_logs() as logs:
        for result in (old, future):
            after = estimator.apply_lab_result(result)
            np.testing.assert_array_equal(after.state, before.state)
    assert [entry["event"] for entry in logs] == ["lab_result_rejected", "lab_result_rejected"]


# --------------------------------------------------------------------------- robustness


def test_lab_typo_is_rejected_and_missing_field_skipped(make_simulation, batch, nominal_p, functions):
    loaded = make_simulation(
        faults=[
            {"kind": "lab_value", "draw_index": 3, "field": "glucose_g_per_l", "factor": 10.0},
            {"kind": "lab_missing", "draw_index": 2, "field": "titer_g_per_l"},
        ]
    )
    recording = record(loaded, 80.0)
    typo = next(lab for cycle in recording.cycles for lab in cycle.labs if lab.seq == 4)
    estimator = new_filter(batch, nominal_p, functions)
    with capture_logs() as logs:
        estimates = run_filter(estimator, recording.cycles)
    rejected = [entry for entry in logs if entry["event"] == "lab_value_rejected"]
    assert len(rejected) == 1 and rejected[0]["field"] == "glucose_g_per_l"
    assert rejected[0]["value"] == pytest.approx(typo.glucose_g_per_l)
    assert abs(rejected[0]["value"] - rejected[0]["predicted"]) > 4.0 * rejected[0]["sigma"]
    final = estimates[-1]
    assert final.rejected_lab == 1 and final.rejected_online == 0
    assert estimator.inflation["glucose_g_per_l"] == 1.0  # one outlier beyond the gate is left out of the consistency tests

    applied = {entry["seq"]: entry["fields"] for entry in logs if entry["event"] == "lab_result_applied"}
    assert "glucose_g_per_l" not in applied[4] and "titer_g_per_l" in applied[4]  # the rest of the typo's result is used
    assert "titer_g_per_l" not in applied[3] and "glucose_g_per_l" in applied[3]  # a NaN field is skipped, the others used

    # Rejecting the typo is exactly as if the lab had not measured glucose in that sample.
    blanked = [replace(c, labs=[replace(lab, glucose_g_per_l=math.nan) if lab.seq == 4 else lab for lab in c.labs]) for c in recording.cycles]
    reference = run_filter(new_filter(batch, nominal_p, functions), blanked)[-1]
    np.testing.assert_allclose(final.state, reference.state, rtol=1e-12)
    assert reference.rejected_lab == 0
    truth = recording.cycles[-1].truth
    assert relative_error(final.value("glucose"), truth[STATE_INDEX["glucose"]]) < 0.20
    assert abs(final.value("glucose") - truth[STATE_INDEX["glucose"]]) < 3.0 * final.sd("glucose")


def test_bad_and_nan_probes_do_not_corrupt_the_estimate(make_simulation, batch, nominal_p, functions):
    faults = [
        {"kind": "probe", "tag": "PV.Capacitance", "mode": "bad", "start_h": 30.0, "end_h": 70.0},
        {"kind": "probe", "tag": "PV.OUR", "mode": "nan", "start_h": 40.0, "end_h": 60.0},
    ]
    faulty = record(make_simulation(faults=faults), 96.0, keep_nan=True)
    clean = record(make_simulation(), 96.0)
    assert any(math.isnan(c.online.get("our_mmol_per_l_h", 0.0)) for c in faulty.cycles)
    assert all("capacitance_pf_per_cm" not in c.online for c in faulty.cycles if 30.0 < c.time_h < 70.0)

    estimates = run_filter(new_filter(batch, nominal_p, functions), faulty.cycles)
    reference = run_filter(new_filter(batch, nominal_p, functions), clean.cycles)[-1]
    assert all(np.all(np.isfinite(e.state)) and np.all(np.isfinite(e.covariance)) for e in estimates)
    final, truth = estimates[-1], faulty.cycles[-1].truth
    for name in ("viable_cells", "glucose", "titer"):
        i = STATE_INDEX[name]
        assert relative_error(final.state[i], truth[i]) < 0.10, name
        assert relative_error(final.state[i], reference.state[i]) < 0.05, name
    assert final.rejected_online == 0
    # While the capacitance was missing the VCD uncertainty grew, and shrank again after.
    during = next(e for e in estimates if e.process_time_h == 69.0)
    before = next(e for e in estimates if e.process_time_h == 29.0)
    assert during.sd("viable_cells") / during.value("viable_cells") > before.sd("viable_cells") / before.value("viable_cells")


def test_non_finite_online_values_are_skipped(batch, nominal_p, functions):
    estimator = new_filter(batch, nominal_p, functions)
    saved = estimator.to_dict()
    u = np.array([0.0, 0.0, 36.5])
    with_nan = estimator.step(1.0, u, {"volume_l": 1400.5, "our_mmol_per_l_h": math.nan, "capacitance_pf_per_cm": math.inf})
    without = ExtendedKalmanEstimator.from_dict(saved, CultureModel(), functions=functions).step(1.0, u, {"volume_l": 1400.5})
    np.testing.assert_array_equal(with_nan.state, without.state)
    np.testing.assert_array_equal(with_nan.covariance, without.covariance)
    with pytest.raises(KeyError):
        estimator.step(2.0, u, {"PV.OUR": 1.0})
    with pytest.raises(EstimatorInputError):
        estimator.step(0.5, u)  # time runs backwards
    with pytest.raises(EstimatorInputError):
        estimator.step(2.0, np.array([math.nan, 0.0, 36.5]))


def test_online_outlier_is_gated_then_believed_when_it_persists(batch, nominal_p, functions):
    estimator = new_filter(batch, nominal_p, functions, EstimatorConfig(online_gate_release_count=2))
    u = np.array([0.0, 0.0, 36.5])
    with capture_logs() as logs:
        for hour in (1.0, 2.0, 3.0):
            estimate = estimator.step(hour, u, {"volume_l": 1300.0})  # 100 L off, ~70 sigma
    events = [entry["event"] for entry in logs]
    assert events.count("online_value_rejected") == 2 and events.count("gate_released") == 1
    assert estimate.rejected_online == 2
    assert estimate.value("volume") < 1399.0


def test_divergence_keeps_the_previous_estimate(batch, nominal_p, functions):
    estimator = new_filter(batch, nominal_p, functions)
    good = estimator.step(1.0, np.array([0.0, 0.0, 36.5]))
    with pytest.raises(EstimatorDivergedError):
        estimator.step(2.0, np.array([1e308, 0.0, 36.5]))
    assert estimator.process_time_h == 1.0
    np.testing.assert_array_equal(estimator.estimate.state, good.state)


# --------------------------------------------------------------------------- uncertainty and restart


def test_lab_update_shrinks_reported_uncertainty(make_simulation, batch, nominal_p, functions):
    recording = record(make_simulation(), 80.0)
    estimator = new_filter(batch, nominal_p, functions)
    run_filter(estimator, recording.cycles, with_labs=False)
    result = next(lab for c in recording.cycles for lab in c.labs if lab.taken_at_h > 60.0)
    before = estimator.estimate
    after = estimator.apply_lab_result(result)
    for name in ("glucose", "lactate", "glutamine", "ammonia", "titer", "viable_cells", "dead_cells"):
        assert after.sd(name) < before.sd(name), name
    for name in ("glucose", "lactate", "titer"):
        assert after.sd(name) < 0.8 * before.sd(name), name


def test_serialise_restore_round_trip(make_simulation, batch, nominal_p, functions):
    recording = record(make_simulation(), 40.0)
    original = new_filter(batch, nominal_p, functions)
    run_filter(original, recording.cycles[:30])
    saved = json.loads(json.dumps(original.to_dict()))  # survives plain JSON
    restored = ExtendedKalmanEstimator.from_dict(saved, CultureModel())
    for cycle in recording.cycles[30:]:
        a = original.step(cycle.time_h, cycle.inputs, cycle.online, cycle.labs)
        b = restored.step(cycle.time_h, cycle.inputs, cycle.online, cycle.labs)
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.covariance, b.covariance)
        assert a.multipliers == b.multipliers


def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="not a model parameter"):
        EstimatorConfig(parameters=({"name": "culture.growth.mu_max", "prior_log_sd": 0.2, "random_walk_log_sd_per_sqrt_h": 0.0},))
    with pytest.raises(ValueError, match="unknown state names"):
        EstimatorConfig(states={"glucoze": {"initial_relative_sd": 0.1, "initial_floor_sd": 0.1, "process_relative_sd_per_sqrt_h": 0.0, "process_floor_sd_per_sqrt_h": 0.1}})
    with pytest.raises(ValueError):
        EstimatorConfig(gate_sigma=4.0, unknown_field=1)
    partial = EstimatorConfig(states={"glucose": {"initial_relative_sd": 0.2, "initial_floor_sd": 0.1, "process_relative_sd_per_sqrt_h": 0.0, "process_floor_sd_per_sqrt_h": 0.1}})
    assert partial.states["glucose"].initial_relative_sd == 0.2 and "titer" in partial.states


def test_state_source_adapter_matches_explicit_steps(make_simulation, batch, nominal_p, functions):
    """``observe`` (the NMPC's StateSource) derives the delivered inputs from the totalisers itself."""
    cycles = record(make_simulation(), 84.0).cycles
    explicit = new_filter(batch, nominal_p, functions)
    adapter = new_filter(batch, nominal_p, functions)
    adapter.observe(CycleObservation(0.0, {}, 0.0, 0.0, Setpoints(0.0, 0.0, batch.recipe.temperature_initial_degc)))
    for cycle in cycles:
        expected = explicit.step(cycle.time_h, cycle.inputs, cycle.online, cycle.labs)
        lab = cycle.labs[0] if cycle.labs else None
        state, parameters = adapter.observe(CycleObservation(cycle.time_h, cycle.online, cycle.feed_total_l, cycle.glucose_feed_total_l, cycle.setpoints, lab))
        np.testing.assert_allclose(state, expected.state, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(parameters, expected.parameters, rtol=1e-9)
        if cycle.time_h == 80.0:  # a restart: saved, restored, and the next observation comes 3 h later (feeding)
            restored = ExtendedKalmanEstimator.from_dict(json.loads(json.dumps(adapter.to_dict())), CultureModel(), functions=functions)
    after_gap = next(c for c in cycles if c.time_h == 83.0)
    resumed, _ = restored.observe(CycleObservation(83.0, after_gap.online, after_gap.feed_total_l, after_gap.glucose_feed_total_l, after_gap.setpoints))
    direct = new_filter(batch, nominal_p, functions)
    run_filter(direct, [c for c in cycles if c.time_h <= 80.0])
    gap_inputs = np.mean([c.inputs for c in cycles if 80.0 < c.time_h <= 83.0], axis=0)
    expected = direct.step(83.0, gap_inputs, after_gap.online)
    assert gap_inputs[0] > 0.0
    np.testing.assert_allclose(resumed, expected.state, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- a model that is wrong


def _inside_band(estimates: list[StateEstimate], cycles: list[Cycle], state: str) -> float:
    """Fraction of cycles whose 95 % band holds the true state."""
    i = STATE_INDEX[state]
    return float(np.mean([abs(c.truth[i] - e.state[i]) <= 1.96 * e.state_sd[i] for e, c in zip(estimates, cycles, strict=True)]))


def test_capacitance_factor_is_pinned_by_the_lab_not_taken_from_the_probe(make_simulation, batch, nominal_p, functions):
    """A probe reading 1.6x the nominal capacitance per cell (another probe, larger cells) with slower growth and productivity (issue 12)."""
    factors = {"growth.mu_max_per_h": 0.7, "measurement.capacitance_pf_per_cm_per_1e6_cells_ml": 1.6, "product.q_product_pg_per_cell_day": 0.7}
    recording = record(make_simulation(true_parameter_factors=factors), 120.0)
    estimator = new_filter(batch, nominal_p, functions)
    with capture_logs() as logs:
        estimates = run_filter(estimator, recording.cycles)
    final, truth = estimates[-1], recording.cycles[-1].truth
    factor_sd = final.multiplier_log_sd[CAPACITANCE_PER_CELL]
    assert abs(math.log(final.multipliers[CAPACITANCE_PER_CELL] / 1.6)) < 3.0 * factor_sd
    assert factor_sd < 0.2  # prior 0.5: the lab VCD pins it (its random walk keeps it from settling further)
    i = STATE_INDEX["viable_cells"]
    assert relative_error(final.state[i], truth[i]) < 0.10
    assert _inside_band(estimates, recording.cycles, "viable_cells") >= 0.9
    assert _inside_band(estimates, recording.cycles, "titer") >= 0.9
    # The capacitance is used, not locked out: the first day's values pass the gate.
    first_day = [e for e in logs if e["event"] == "online_value_rejected" and e["field"] == "capacitance_pf_per_cm" and e["process_time_h"] <= 24.0]
    assert len(first_day) <= 2

    # A filter that trusts the nominal capacitance per cell reads the probe as 1.6x the cells.
    trusting = EstimatorConfig(parameters=tuple(p for p in EstimatorConfig().parameters if p.name != CAPACITANCE_PER_CELL))
    trusted = run_filter(ExtendedKalmanEstimator.from_batch(CultureModel(), batch, nominal_p, trusting), recording.cycles)
    assert relative_error(trusted[-1].state[i], truth[i]) > 0.25
    assert _inside_band(trusted, recording.cycles, "viable_cells") < 0.5


def _volume_run(estimator: ExtendedKalmanEstimator, hours: range, volume_l: float) -> list[StateEstimate]:
    u = np.array([0.0, 0.0, 36.5])
    return [estimator.step(float(hour), u, {"volume_l": volume_l}) for hour in hours]


def test_persistent_disagreement_inflates_the_model_instead_of_locking_the_signal_out(batch, nominal_p, functions):
    """A load cell 100 L (~70 sd) below a model that sees nothing leave: the monitor widens the model until the readings pass, then relaxes."""
    config = EstimatorConfig(online_gate_release_count=1000)  # no gate release: the monitor alone must let the readings in
    estimator = new_filter(batch, nominal_p, functions, config)
    with capture_logs() as logs:
        estimates = _volume_run(estimator, range(1, 41), 1300.0)
    inflated = [e for e in logs if e["event"] == "model_uncertainty_inflated"]
    assert inflated and {e["signal"] for e in inflated} == {"volume_l"}
    assert all(e["inflation"] <= config.consistency.max_inflation for e in inflated)
    assert inflated[0]["process_time_h"] <= 3.0  # the rejected values fill the window: found within a few cycles
    rejected = [e for e in logs if e["event"] == "online_value_rejected"]
    assert rejected and max(e["process_time_h"] for e in rejected) < 30.0  # then the readings pass the gate again
    assert estimates[-1].value("volume") == pytest.approx(1300.0, abs=3.0 * estimates[-1].sd("volume"))
    assert estimator.inflation["volume_l"] > 1.0 and not any(e["event"] == "gate_released" for e in logs)
    # Only what the load cell observes was widened.
    assert all(v == 1.0 for name, v in estimator.inflation.items() if name != "volume_l")
    scale = estimator.process_noise_scale()
    assert scale[STATE_INDEX["volume"]] == estimator.inflation["volume_l"] and np.count_nonzero(scale != 1.0) == 1
    with pytest.raises(TypeError):
        estimator.inflation["volume_l"] = 1.0  # type: ignore[index]

    # Readings that agree with the model again: the factor decays back to 1.
    level = estimates[-1].value("volume")
    with capture_logs() as logs:
        _volume_run(estimator, range(41, 240), level)
    assert estimator.inflation["volume_l"] == 1.0
    assert [e["event"] for e in logs if e["event"].startswith("model_uncertainty")][-1] == "model_uncertainty_restored"


def test_monitor_off_keeps_the_old_filter(batch, nominal_p, functions):
    estimator = new_filter(batch, nominal_p, functions, EstimatorConfig(online_gate_release_count=1000, consistency=ConsistencyConfig(max_inflation=1.0)))
    estimates = _volume_run(estimator, range(1, 41), 1300.0)
    assert estimates[-1].rejected_online == 40  # locked out: what the gate release and the monitor exist to prevent
    assert all(v == 1.0 for v in estimator.inflation.values())


def test_inflation_survives_a_restart_and_version_one_is_read(batch, nominal_p, functions):
    estimator = new_filter(batch, nominal_p, functions)
    _volume_run(estimator, range(1, 8), 1300.0)
    assert estimator.inflation["volume_l"] > 1.0
    saved = json.loads(json.dumps(estimator.to_dict()))
    assert saved["version"] == 2
    restored = ExtendedKalmanEstimator.from_dict(saved, CultureModel(), functions=functions)
    assert restored.inflation == estimator.inflation
    for a, b in zip(_volume_run(estimator, range(8, 20), 1300.0), _volume_run(restored, range(8, 20), 1300.0), strict=True):
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.covariance, b.covariance)
    assert restored.inflation == estimator.inflation

    # A version-1 dict (written before the monitor existed) resumes with the monitor at rest.
    old = new_filter(batch, nominal_p, functions)
    _volume_run(old, range(1, 4), 1400.0)
    version_one = json.loads(json.dumps(old.to_dict()))
    version_one["version"] = 1
    del version_one["consistency"]
    for entry in version_one["entries"]:
        del entry["noise_scale"]
    resumed = ExtendedKalmanEstimator.from_dict(version_one, CultureModel(), functions=functions)
    np.testing.assert_array_equal(resumed.estimate.state, old.estimate.state)
    assert all(v == 1.0 for v in resumed.inflation.values())
    version_one["version"] = 3
    with pytest.raises(EstimatorInputError, match="format version"):
        ExtendedKalmanEstimator.from_dict(version_one, CultureModel(), functions=functions)


def test_rollback_restores_the_monitor(batch, nominal_p, functions):
    estimator = new_filter(batch, nominal_p, functions)
    _volume_run(estimator, range(1, 3), 1400.0)
    token = estimator.checkpoint()
    _volume_run(estimator, range(3, 10), 1300.0)
    assert estimator.inflation["volume_l"] > 1.0
    estimator.rollback(token)
    assert estimator.inflation["volume_l"] == 1.0 and estimator.process_time_h == 2.0


def test_chi_square_quantiles_match_closed_forms():
    """χ²(1) is a squared normal; χ²(2) is exponential with mean 2; χ²(5) at 0.99 from the tables."""
    from statistics import NormalDist

    for p in (0.9, 0.95, 0.99):
        assert chi_square_quantile(p, 1) == pytest.approx(NormalDist().inv_cdf(0.5 + p / 2) ** 2, rel=1e-9)
        assert chi_square_quantile(p, 2) == pytest.approx(-2.0 * math.log(1.0 - p), rel=1e-9)
    assert chi_square_quantile(0.99, 5) == pytest.approx(15.0863, abs=1e-4)
    with pytest.raises(ValueError):
        chi_square_quantile(1.0, 3)


def test_consistency_config_is_validated():
    with pytest.raises(ValueError, match="online_window"):
        EstimatorConfig.model_validate({"consistency": {"online_window": 1}})
    with pytest.raises(ValueError, match="lab_level"):
        EstimatorConfig.model_validate({"consistency": {"lab_level": 1.0}})
    with pytest.raises(ValueError, match="max_inflation"):
        ConsistencyConfig(max_inflation=0.5)
    with pytest.raises(ValueError):
        ConsistencyConfig.model_validate({"level": 0.9})  # not a field: the levels are per kind of signal
    assert EstimatorConfig.model_validate({"consistency": {"lab_window": 5}}).consistency.online_window == ConsistencyConfig().online_window


def test_every_signal_inflates_something_the_filter_has():
    """The monitor's map names real states or parameters, and every measured signal widens at least one state."""
    names = {s.name for s in STATES} | set(PARAMETER_NAMES)
    assert set(INFLATED_BY) == set(MEASUREMENT_NAMES)
    for signal, inflated in INFLATED_BY.items():
        assert set(inflated) <= names, signal
        assert any(n in STATE_INDEX for n in inflated), signal
