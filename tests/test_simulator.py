"""The plant simulator: sample-delay semantics, mass balance with removals, determinism, faults, non-physical states."""

from __future__ import annotations

import math

import numpy as np
import pytest

from plant_models.cho import OUTPUT_INDEX, STATE_INDEX, CultureModel
from plant_models.errors import NonPhysicalStateError
from plant_models.parameters import PARAMETER_NAMES
from simulator.batch import BatchResult, build_simulated_plc, run_recipe_batch
from simulator.plant import Plant
from simulator.plants.cho import ChoPlant

NO_LAB_NOISE = {
    "lab": {
        "vcd_relative": 0.0,
        "viability_pct": 0.0,
        "glucose_relative": 0.0,
        "lactate_relative": 0.0,
        "glutamine_relative": 0.0,
        "ammonia_relative": 0.0,
        "titer_relative": 0.0,
        "osmolality_relative": 0.0,
    }
}


def _watch_samples(plc, until_h: float):
    """Step the PLC minute by minute like a fast scanner; record each Seq change with the time seen."""
    seen = []
    last_seq = plc.snapshot()["Sample.Seq"].value
    minute = plc.minute
    while plc.process_time_h < until_h:
        minute += 1
        plc.advance_to(minute / 60.0)
        snap = plc.snapshot()
        if snap["Sample.Seq"].value != last_seq:
            last_seq = snap["Sample.Seq"].value
            seen.append((plc.process_time_h, snap))
    return seen


def test_results_publish_hours_after_the_draw_with_the_draw_time(make_simulation):
    loaded = make_simulation(noise=NO_LAB_NOISE, sampling={"draw_jitter_h": 0.0, "result_delay_min_h": 3.0, "result_delay_max_h": 5.0})
    plc, _ = build_simulated_plc(loaded)
    plc.set_operator_remote(False)
    assert plc.snapshot()["Sample.Seq"].value == 0
    assert math.isnan(plc.snapshot()["Sample.Glucose"].value) and not plc.snapshot()["Sample.Glucose"].good
    seen = _watch_samples(plc, 78.0)
    assert [snap["Sample.Seq"].value for _, snap in seen] == [1, 2, 3, 4]
    trajectory = plc.plant.trajectory()
    for k, (published_h, snap) in enumerate(seen):
        taken_h = snap["Sample.TakenAt"].value
        assert taken_h == pytest.approx(24.0 * k)
        assert 3.0 - 1e-9 <= published_h - taken_h <= 5.0 + 1e-9
        row = int(round(taken_h * 60))
        # The result describes the culture at the draw, not at publication.
        assert snap["Sample.Glucose"].value == pytest.approx(trajectory.states[row, STATE_INDEX["glucose"]], rel=1e-9)
        assert snap["Sample.VCD"].value == pytest.approx(trajectory.states[row, STATE_INDEX["viable_cells"]], rel=1e-9)
        assert snap["Sample.Osmolality"].value == pytest.approx(trajectory.observable("osmolality")[row], rel=1e-9)


def test_sample_registers_hold_the_last_result_between_publications(make_simulation):
    plc, _ = build_simulated_plc(make_simulation())
    plc.set_operator_remote(False)
    plc.advance_to(30.0)
    first = plc.snapshot()
    plc.advance_to(47.0)
    later = plc.snapshot()
    assert first["Sample.Seq"].value == later["Sample.Seq"].value == 2
    assert first["Sample.Glucose"].value == later["Sample.Glucose"].value


def result_parameters(result: BatchResult) -> np.ndarray:
    """The CHO plant's true parameter vector in the model's order (its names lack the ``culture.`` prefix)."""
    return np.array([result.true_parameters[name.removeprefix("culture.")] for name in PARAMETER_NAMES])


def test_glucose_balance_holds_through_the_simulator_with_samples_removed(make_simulation):
    """Glucose fed = consumed + accumulated + removed with samples, over a whole recipe batch."""
    result = run_recipe_batch(make_simulation(sampling={"sample_volume_l": 5.0}))
    trajectory = result.trajectory
    media_glucose_feed = 400.0
    media_feed_glucose = 40.0
    hours = np.diff(trajectory.time_h)
    inputs = trajectory.inputs[1:]  # input applied over the step that ends at each row
    fed = float(np.sum(hours * (inputs[:, 0] * media_feed_glucose + inputs[:, 1] * media_glucose_feed)))
    model = CultureModel()
    parameters = np.tile(result_parameters(result)[:, None], (1, trajectory.time_h.size))
    outputs = np.asarray(model.outputs.map(trajectory.time_h.size)(trajectory.time_h[None, :], trajectory.states.T, trajectory.inputs.T, parameters)).T
    uptake = outputs[:, OUTPUT_INDEX["glucose_uptake"]] * trajectory.state("volume")
    consumed = float(np.sum(hours * 0.5 * (uptake[1:] + uptake[:-1])))
    removed = sum(r.volume_l * r.state[STATE_INDEX["glucose"]] for r in trajectory.removals)
    glucose_mass = trajectory.state("glucose") * trajectory.state("volume")
    accumulated = float(glucose_mass[-1] - glucose_mass[0]) - trajectory.removals[0].volume_l * trajectory.removals[0].state[STATE_INDEX["glucose"]]
    assert len(trajectory.removals) >= len(result.lab_results) >= 14  # the last draw may not be published before harvest
    assert removed > 100.0  # samples of 5 L make the removed term visible
    # Trapezoidal consumption on a 1-minute grid: well within 0.2 % of the feed.
    assert fed == pytest.approx(consumed + accumulated + removed, rel=2e-3)


def test_same_seed_same_batch_and_different_seed_different_batch(make_simulation):
    spec = {"true_parameter_relative_sd": {"growth.mu_max_per_h": 0.1}}
    first = run_recipe_batch(make_simulation(seed=11, **spec))
    again = run_recipe_batch(make_simulation(seed=11, **spec))
    other = run_recipe_batch(make_simulation(seed=12, **spec))
    np.testing.assert_array_equal(first.trajectory.states, again.trajectory.states)
    assert first.lab_results == again.lab_results
    assert first.true_parameters == again.true_parameters
    assert first.true_parameters["growth.mu_max_per_h"] != other.true_parameters["growth.mu_max_per_h"]
    assert not np.array_equal(first.trajectory.states[-1], other.trajectory.states[-1])


def test_lab_typo_and_missing_field_are_served_as_such(make_simulation):
    loaded = make_simulation(
        noise=NO_LAB_NOISE,
        faults=[
            {"kind": "lab_value", "draw_index": 2, "field": "glucose_g_per_l", "factor": 10.0},
            {"kind": "lab_missing", "draw_index": 3, "field": "titer_g_per_l"},
        ],
    )
    result = run_recipe_batch(loaded)
    by_seq = {r.seq: r for r in result.lab_results}
    row = int(round(by_seq[3].taken_at_h * 60))
    assert by_seq[3].glucose_g_per_l == pytest.approx(10.0 * result.trajectory.states[row, STATE_INDEX["glucose"]], rel=1e-9)
    assert math.isnan(by_seq[4].titer_g_per_l)
    assert math.isfinite(by_seq[4].glucose_g_per_l)


def test_missing_lab_field_reads_nan_with_bad_status(make_simulation):
    plc, _ = build_simulated_plc(make_simulation(faults=[{"kind": "lab_missing", "draw_index": 0, "field": "ammonia_mm"}]))
    plc.advance_to(6.0)
    snap = plc.snapshot()
    assert snap["Sample.Seq"].value == 1
    assert math.isnan(snap["Sample.Ammonia"].value) and not snap["Sample.Ammonia"].good
    assert snap["Sample.Glucose"].good


@pytest.mark.parametrize("mode", ["bad", "nan", "frozen", "stale"])
def test_probe_faults(make_simulation, mode):
    plc, _ = build_simulated_plc(make_simulation(faults=[{"kind": "probe", "tag": "PV.OUR", "mode": mode, "start_h": 30.0, "end_h": 40.0}]))
    plc.advance_to(29.0)
    before = plc.snapshot()["PV.OUR"]
    plc.advance_to(30.0)
    at_start = plc.snapshot()["PV.OUR"]
    plc.advance_to(35.0)
    during = plc.snapshot()["PV.OUR"]
    plc.advance_to(41.0)
    after = plc.snapshot()["PV.OUR"]
    assert before.good and after.good and math.isfinite(after.value) and after.scanned_at_h == 41.0
    if mode == "bad":
        assert not during.good
    elif mode == "nan":
        assert during.good and math.isnan(during.value)
    elif mode == "frozen":
        assert during.good and during.value == at_start.value and during.scanned_at_h == 35.0
    else:
        assert during == at_start and during.scanned_at_h == 30.0


def test_weaker_feed_lot_delivers_less_glucose(make_simulation):
    nominal = run_recipe_batch(make_simulation())
    weak = run_recipe_batch(make_simulation(faults=[{"kind": "feed_lot", "start_h": 72.0, "strength": 0.85}]))
    row = 100 * 60
    assert np.array_equal(nominal.trajectory.states[: 72 * 60], weak.trajectory.states[: 72 * 60])
    assert weak.trajectory.states[row, STATE_INDEX["glutamine"]] < nominal.trajectory.states[row, STATE_INDEX["glutamine"]]
    assert weak.kpis.product_mass_g < nominal.kpis.product_mass_g


def test_non_physical_state_stops_with_time_and_state(model, nominal, nominal_p, batch):
    plant = Plant(ChoPlant(nominal, model), batch.inoculation.initial_state(), nominal_p)
    plant.integrate(60, np.array([0.0, 0.0, 36.5]))
    with pytest.raises(NonPhysicalStateError) as caught:
        plant.integrate(600, np.array([0.0, -200.0, 36.5]))  # a "pump" draining the 1400 L reactor
    error = caught.value
    assert error.state in {s.name for s in model.states}
    assert 7.0 < error.process_time_h < 9.0  # the reactor runs dry after 7 h
    assert "non-physical" in str(error) and error.state in str(error) and "h" in str(error)


def test_a_fifteen_day_batch_runs_on_the_virtual_clock(make_simulation):
    result = run_recipe_batch(make_simulation())
    assert result.trajectory.time_h[-1] == pytest.approx(336.0)
    assert np.all(np.diff(result.trajectory.time_h) == pytest.approx(1.0 / 60.0))
