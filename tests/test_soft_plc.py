"""The soft PLC and plant-sim's core, coupled in one process through the I/O map's scaling: the split against the all-in-one simulated PLC."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import structlog.testing

from controller.types import LAB_FIELDS, PHASE_HARVESTED, PHASE_RUNNING
from simulator.batch import kpis_of, run_recipe_batch
from simulator.config import load_simulation
from simulator.io_faults import IoFault, WireBreak
from simulator.io_map import IoMap, load_io_map
from simulator.plant import MINUTES_PER_HOUR
from simulator.plant_io import ActuatorCommand, PlantSimulator
from simulator.soft_plc import SoftPlc

REPO = Path(__file__).resolve().parent.parent
IO_MAP = load_io_map(REPO / "configs" / "io" / "soft-plc-opcua.yaml")
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"


def _command(io_map: IoMap, outputs: dict[str, float | bool]) -> ActuatorCommand:
    """The PLC's outputs as plant-sim reads them: through the output channels' scaling (4–20 mA counts) and back."""
    channels = io_map.outputs
    values = [
        spec.to_engineering(spec.to_raw(float(outputs[name])))[0]
        for name, spec in (
            ("feed_pump_lph", channels.feed_pump_lph),
            ("glucose_pump_lph", channels.glucose_pump_lph),
            ("temperature_setpoint_degc", channels.temperature_setpoint_degc),
        )
    ]
    return ActuatorCommand(values[0], values[1], values[2], bool(outputs["harvest_valve"]))


def _lims_tags(simulator: PlantSimulator) -> dict[str, float]:
    if not simulator.released:
        return {"seq": 0.0, "taken_at_h": math.nan, **dict.fromkeys(LAB_FIELDS, math.nan)}
    result = simulator.released[-1]
    return {"seq": float(result.seq), "taken_at_h": result.taken_at_h, **{name: getattr(result, name) for name in LAB_FIELDS}}


def _local_batch(faults: tuple[IoFault, ...] = ()) -> tuple[SoftPlc, PlantSimulator]:
    """A recipe batch (the operator's switch in local) stepped as soft-plc and plant-sim step it in virtual time, without the network."""
    loaded = load_simulation(PLATFORM)
    plc = SoftPlc(batch=loaded.batch, simulation=loaded.simulation, io_map=IO_MAP)
    plc.set_operator_remote(False)
    simulator = PlantSimulator(loaded, IO_MAP, faults)

    def scan(minute: int) -> None:
        simulator.advance_to(minute, _command(IO_MAP, plc.outputs()))
        plc.scan(minute, simulator.raw_inputs(), _lims_tags(simulator))

    scan(0)
    for _ in range(100_000):
        if plc.phase != PHASE_RUNNING:
            break
        scan(plc.next_event_minute())
    simulator.advance_to(plc.minute, _command(IO_MAP, plc.outputs()))
    return plc, simulator


def test_the_split_plc_and_plant_run_the_recipe_batch_of_the_all_in_one_plc():
    plc, simulator = _local_batch()
    all_in_one = run_recipe_batch(load_simulation(PLATFORM))
    assert simulator.harvested and plc.phase == PHASE_HARVESTED and plc.harvest_reason == all_in_one.harvest_reason == "local recipe"
    assert plc.process_time_h == all_in_one.kpis.harvest_time_h
    # One lab, one seed: the same draws, released at the same times, reach the PLC.
    assert [r.taken_at_h for r in plc.published] == [r.taken_at_h for r in all_in_one.lab_results]
    # The PLC's recipe sees the load cell (1 L noise, 0.09 L a count) where the all-in-one PLC sees the true volume: the glucose rates differ by that much.
    score = kpis_of(simulator.plant.trajectory(), load_simulation(PLATFORM).batch).score_g_per_day
    assert score == pytest.approx(all_in_one.kpis.score_g_per_day, rel=0.005)
    # The PLC's totalisers integrate the flow meters; the flows are constant between scans, so they are exact up to the meters' counts.
    resolution_l = plc.process_time_h * 20.0 / 27648
    assert plc.feed_total_l == pytest.approx(simulator.plant.feed_total_l, abs=resolution_l)
    assert plc.glucose_feed_total_l == pytest.approx(simulator.plant.glucose_feed_total_l, abs=resolution_l)


def test_a_recipe_batch_with_a_broken_load_cell_runs_to_its_harvest():
    plc, simulator = _local_batch((WireBreak(kind="wire_break", channel="volume_l", current_ma=0.0, start_h=100.0, end_h=130.0),))
    assert plc.phase == PHASE_HARVESTED and plc.harvest_reason == "local recipe" and simulator.harvested


def test_a_wire_break_reads_bad_and_the_recipe_keeps_the_last_good_volume():
    fresh = SoftPlc(batch=load_simulation(PLATFORM).batch, simulation=load_simulation(PLATFORM).simulation, io_map=IO_MAP)
    fresh.scan(0, {"volume_l": IO_MAP.inputs.volume_l.counts_of_current(0.0), "temperature_degc": IO_MAP.inputs.temperature_degc.counts_of_current(3.6)})
    scan = fresh.snapshot()
    assert not scan["PV.Volume"].good and not scan["PV.Temperature"].good
    assert fresh.recipe_volume_l() == load_simulation(PLATFORM).batch.inoculation.volume_l, "no good reading yet: the inoculation volume"
    fresh.scan(60, {"volume_l": IO_MAP.inputs.volume_l.to_raw(1402.0)})
    fresh.scan(120, {"volume_l": IO_MAP.inputs.volume_l.counts_of_current(0.0)})
    assert fresh.recipe_volume_l() == pytest.approx(1402.0, abs=0.1), "a broken load cell: the last good volume"
    assert fresh.minute == 2 * MINUTES_PER_HOUR


@pytest.mark.parametrize("scenario", ["platform", "faults"])
def test_plant_sim_given_the_all_in_one_plc_s_outputs_is_the_all_in_one_plant_exactly(scenario):
    """plant-sim's plant and lab are plc-sim's own: replaying the all-in-one batch's inputs reproduces its plant and lab results.

    To rounding only: each integrates in stretches between its own events, and a stretch restarts the model's clock from its minute.
    """
    loaded = load_simulation(REPO / "configs" / "simulate" / f"{scenario}.yaml")
    all_in_one = run_recipe_batch(loaded)
    inputs = all_in_one.trajectory.inputs
    minutes = np.rint(all_in_one.trajectory.time_h * MINUTES_PER_HOUR).astype(int)
    simulator = PlantSimulator(loaded, IO_MAP)
    # Row i holds the input applied over (minute i-1, minute i]: step to every minute where it changes, with the input before it.
    changes = [i for i in range(2, len(minutes)) if not np.array_equal(inputs[i], inputs[i - 1])] + [len(minutes)]
    start = 1
    for end in changes:
        feed, glucose, temperature = inputs[start]
        simulator.advance_to(int(minutes[end - 1]), ActuatorCommand(float(feed), float(glucose), float(temperature), False))
        start = end
    np.testing.assert_allclose(simulator.plant.trajectory().states, all_in_one.trajectory.states, rtol=1e-10, atol=1e-12)
    # The same draws at the same minutes with the same assay noise, released at the same times (the last may fall after harvest).
    released = list(all_in_one.lab_results)
    assert len(released) - 1 <= len(simulator.released) <= len(released)
    for mine, theirs in zip(simulator.released, released, strict=False):
        assert mine.seq == theirs.seq and mine.taken_at_h == theirs.taken_at_h
        for name in LAB_FIELDS:
            assert getattr(mine, name) == pytest.approx(getattr(theirs, name), rel=1e-9, nan_ok=True)


def test_an_unusable_drive_signal_stops_the_pump_and_the_jacket_holds_its_last_valid_setpoint():
    """A NaN setpoint or 4–20 mA counts at underflow read as NaN: plant-sim stopped with ValueError ("plant inputs must be 3 finite numbers").

    A pump whose drive signal is unusable stops; the jacket's controller keeps
    the last valid setpoint (before any, the inoculation temperature). Each
    episode is counted once and logged at its start and its end.
    """
    loaded = load_simulation(PLATFORM)
    simulator = PlantSimulator(loaded, IO_MAP)
    underflow = IO_MAP.outputs.feed_pump_lph.to_engineering(IO_MAP.outputs.feed_pump_lph.raw_underflow)[0]
    assert math.isnan(underflow), "the map's scaling reads underflow counts as NaN"
    with structlog.testing.capture_logs() as logs:
        simulator.advance_to(60, ActuatorCommand(1.0, 0.1, math.nan, False))
        simulator.advance_to(120, ActuatorCommand(1.0, 0.1, 35.0, False))
        for minute in (180, 240, 300):
            simulator.advance_to(minute, ActuatorCommand(underflow, 0.2, math.inf, False))
        simulator.advance_to(360, ActuatorCommand(2.0, 0.2, 34.0, False))
    inputs = simulator.plant.trajectory().inputs
    np.testing.assert_array_equal(inputs[1:61], np.tile([1.0, 0.1, loaded.batch.inoculation.temperature_degc], (60, 1)))
    np.testing.assert_array_equal(inputs[121:301], np.tile([0.0, 0.2, 35.0], (180, 1)))
    np.testing.assert_array_equal(inputs[301:361], np.tile([2.0, 0.2, 34.0], (60, 1)))
    assert simulator.plant.feed_total_l == pytest.approx(1.0 * 2 + 2.0 * 1), "no feed while the pump's signal was unusable"
    records = {channel: record.as_dict() for channel, record in simulator.unusable_outputs.items()}
    assert records == {
        "feed_pump_lph": {"episodes": 1, "exchanges": 3, "plant_h": 3.0, "unusable_since_h": None},
        "glucose_pump_lph": {"episodes": 0, "exchanges": 0, "plant_h": 0.0, "unusable_since_h": None},
        "temperature_setpoint_degc": {"episodes": 2, "exchanges": 4, "plant_h": 4.0, "unusable_since_h": None},
    }
    events = [(entry["event"], entry["output"], entry["process_time_h"]) for entry in logs if entry["event"].startswith("plant_output_")]
    assert events == [
        ("plant_output_unusable", "temperature_setpoint_degc", 0.0),
        ("plant_output_usable_again", "temperature_setpoint_degc", 1.0),
        ("plant_output_unusable", "feed_pump_lph", 2.0),
        ("plant_output_unusable", "temperature_setpoint_degc", 2.0),
        ("plant_output_usable_again", "feed_pump_lph", 5.0),
        ("plant_output_usable_again", "temperature_setpoint_degc", 5.0),
    ], "one line at each episode's start and end, none per exchange"


def test_a_lims_set_without_a_process_time_for_its_draw_is_refused_not_a_crash():
    """``seq`` moving while ``taken_at_h`` was NaN or infinite crashed the soft PLC's scan (``round()`` of the draw minute).

    The PLC refuses the set whole: Sample.* keep the last published set and
    Sample.Seq does not move; it logs each refusal once and counts it; a set
    sent again with a new seq and a valid draw time is taken.
    """
    loaded = load_simulation(PLATFORM)
    plc = SoftPlc(batch=loaded.batch, simulation=loaded.simulation, io_map=IO_MAP)
    inputs = {"volume_l": IO_MAP.inputs.volume_l.to_raw(1400.0)}
    values = {name: 1.0 for name in LAB_FIELDS}

    def lims(seq: int, taken_at_h: float) -> dict[str, float]:
        return {"seq": float(seq), "taken_at_h": taken_at_h, **values}

    with structlog.testing.capture_logs() as logs:
        plc.scan(0, inputs, lims(0, math.nan))
        for minute, seq, taken_at_h in ((300, 1, math.nan), (360, 1, math.nan), (420, 2, math.inf), (480, 3, -math.inf), (540, 4, -1.0)):
            plc.scan(minute, inputs, lims(seq, taken_at_h))
            snapshot = plc.snapshot()
            assert snapshot["Sample.Seq"].value == 0 and not snapshot["Sample.TakenAt"].good, f"seq {seq}: nothing published"
        plc.scan(600, inputs, lims(5, 0.5))
    assert plc.lab_results_rejected == 4 and [result.taken_at_h for result in plc.published] == [0.5]
    snapshot = plc.snapshot()
    assert snapshot["Sample.Seq"].value == 1 and snapshot["Sample.TakenAt"].value == 0.5 and snapshot["Sample.Glucose"].value == 1.0
    rejected = [entry["seq"] for entry in logs if entry["event"] == "soft_plc_lab_result_rejected"]
    assert rejected == [1, 2, 3, 4], "one line per refused set, not per scan"


def test_a_drive_signal_outside_its_fault_limits_stops_the_pump_and_a_negative_rate_runs_it_at_zero():
    """Found by review: a finite but failed 4–20 mA output (3.6 mA, NAMUR NE 43's failure signal) passed as a negative flow to the plant.

    To the pump it is a failed loop, as it is to the PLC's own input channels: the pump stops and the episode is counted. A rate below
    zero in engineering units (a PLC writing −0.5 L/h) runs the pump at 0: it does not run backwards.
    """
    channel = IO_MAP.outputs.feed_pump_lph
    assert channel.counts, "the reference I/O map drives the feed pump with 4–20 mA counts"
    failed = channel.counts_of_current(3.6)
    assert math.isfinite(channel.to_engineering(failed)[0]) and math.isnan(channel.drive_value(failed)), "a value, but not a usable one"
    simulator = PlantSimulator(load_simulation(PLATFORM), IO_MAP)
    simulator.advance_to(60, ActuatorCommand(channel.drive_value(failed), 0.1, 36.5, False))
    simulator.advance_to(120, ActuatorCommand(1.0, -0.5, 36.5, False))
    inputs = simulator.plant.trajectory().inputs
    np.testing.assert_array_equal(inputs[1:61, :2], np.tile([0.0, 0.1], (60, 1)))
    np.testing.assert_array_equal(inputs[61:121, :2], np.tile([1.0, 0.0], (60, 1)))
    assert simulator.unusable_outputs["feed_pump_lph"].as_dict()["episodes"] == 1
    assert simulator.unusable_outputs["glucose_pump_lph"].as_dict()["episodes"] == 0, "a negative rate is a usable signal, floored at zero"
