"""Plants of other structure than the controller's model, served by the simulated PLC over OPC UA and Modbus: the runtime runs them as in-process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from runtime_harness import TEST_SETTINGS, run_runtime_against

from controller.mpc import EconomicMpc
from interfaces.batch_records import read_history
from plant_models.cho import CultureModel
from simulator.closed_loop import estimator_source, run_controlled_batch
from simulator.config import load_simulation

REPO = Path(__file__).resolve().parent.parent
STOP_H = 96.0


@pytest.fixture(scope="module")
def mpc() -> EconomicMpc:
    loaded = load_simulation(REPO / "configs" / "simulate" / "platform.yaml")
    return EconomicMpc(CultureModel(), loaded.batch, TEST_SETTINGS.nmpc.mpc)


@pytest.mark.parametrize(("protocol", "plant"), [("opcua", "amino_acid"), ("modbus", "cell_cycle"), ("opcua", "biovolume")])
def test_a_plant_of_other_structure_runs_over_the_network_as_in_process(protocol, plant, tmp_path, mpc):
    """Four days in closed loop (cycles 0 to 96 h): the same true culture as the in-process loop's, every cycle recorded, nothing refused."""
    loaded = load_simulation(REPO / "configs" / "simulate" / f"plant-{plant.replace('_', '-')}.yaml")
    assert loaded.simulation.plant == plant
    in_process = run_controlled_batch(loaded, make_source=estimator_source, max_cycles=int(STOP_H) + 1).batch.trajectory
    result = asyncio.run(run_runtime_against(loaded, tmp_path / "history.sqlite", protocol=protocol, mpc=mpc, stop_at_h=STOP_H))
    network = result.plc.plant.trajectory()
    assert network.time_h[-1] == pytest.approx(in_process.time_h[-1])
    # Glucose is what the NMPC steers hour by hour: a solve that stops a few iterations apart moves it by a percent or two.
    for name, rtol in (("viable_cells", 0.01), ("titer", 0.01), ("volume", 0.01), ("temperature", 0.01), ("glucose", 0.03)):
        np.testing.assert_allclose(network.observable(name)[-1], in_process.observable(name)[-1], rtol=rtol, err_msg=name)
    cycles = result.rows("cycles")
    assert len(cycles) == int(STOP_H) + 1 and {c["state"] for c in cycles} == {"closed_loop"}
    assert {w["outcome"] for w in result.rows("writes")} == {"ok"}
    assert result.summary.writes_failed == 0
    # The history is a batch record calibration can read without a batch file: the run stored its batch.
    (record,) = read_history(tmp_path / "history.sqlite")
    assert record.batch == loaded.batch and len(record.lab) >= 4
    assert record.online.time_h[-1] == pytest.approx(STOP_H) and np.isfinite(record.online.signal("capacitance_pf_per_cm")).all()
    np.testing.assert_allclose(record.setpoints.at(50.5)[2], network.inputs[int(50.5 * 60), 2], atol=1e-6)
