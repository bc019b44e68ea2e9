"""Whole recipe batches: plausible CHO behaviour, and the simulate command end to end."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulator.batch import run_recipe_batch
from simulator.config import load_simulation

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recipe_batch_is_plausible_cho_behaviour(seed):
    result = run_recipe_batch(load_simulation(PLATFORM, seed=seed))
    trajectory, kpis = result.trajectory, result.kpis
    time_h = trajectory.time_h
    viability = trajectory.observable("viability")
    lactate = trajectory.state("lactate")
    assert 10.0 <= kpis.peak_vcd_1e6_per_ml <= 25.0
    assert kpis.harvest_time_h == pytest.approx(336.0)
    assert 2.0 <= kpis.titer_g_per_l <= 5.0
    last_days = time_h >= 288.0
    assert np.all(np.diff(viability[last_days]) < 0.0)  # viability declines over the last two days
    peak = int(np.argmax(lactate))
    assert 48.0 < time_h[peak] < 240.0 and lactate[-1] < 0.6 * lactate[peak]  # lactate rises, then is consumed
    assert kpis.violation_h == 0.0
    assert 0.4 < kpis.galactosylated_fraction < 0.8


def test_simulate_command_writes_kpis_trajectories_and_plot(tmp_path):
    command = [sys.executable, "-m", "bioreactor_mpc", "simulate", "--seed", "5", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "score (product per occupied day)" in result.stdout and "titer at harvest" in result.stdout
    stem = "BR01-DEMO-001-seed5-recipe"
    with (tmp_path / f"{stem}-trajectories.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[-1]["process_time_h"]) == pytest.approx(336.0)
    assert float(rows[1]["process_time_h"]) == pytest.approx(0.25)
    assert {"viable_cells_1e6_per_ml", "glucose_g_per_L", "osmolality_mOsm_per_kg"} <= set(rows[0])
    png = (tmp_path / f"{stem}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 50_000
    assert (tmp_path / f"{stem}-lab.csv").read_text().count("\n") >= 14
