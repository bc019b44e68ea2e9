"""Whole batches with the estimator and the NMPC in the loop (in-process, no network): the product's reason to exist.

Each batch is 360 control cycles with the default, compiled NLP (compiled once
per machine and cached; about a minute the first time).
"""

from __future__ import annotations

import csv
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from simulator.batch import run_recipe_batch
from simulator.closed_loop import estimator_source, run_controlled_batch
from simulator.config import load_simulation

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
FAULTS = REPO / "configs" / "simulate" / "faults.yaml"


def test_nmpc_survives_the_fault_batch_and_beats_the_recipe():
    """Weak feed lot, glucose typo ×10, a missing titer, a Bad capacitance probe and 12 h of local control."""
    loaded = load_simulation(FAULTS)
    recipe = run_recipe_batch(loaded)
    with structlog.testing.capture_logs() as logs:
        controlled = run_controlled_batch(loaded, make_source=estimator_source)
    kpis = controlled.batch.kpis
    assert kpis.violation_h == 0.0
    assert kpis.score_g_per_day > 1.2 * recipe.kpis.score_g_per_day
    assert kpis.viability_at_harvest_pct >= 60.0 and kpis.galactosylated_fraction >= 0.5
    assert controlled.solver_failures == 0 and set(controlled.decisions_by_source) == {"mpc"}
    events = [entry["event"] for entry in logs]
    rejected = [entry for entry in logs if entry["event"] == "lab_value_rejected"]
    assert any(entry.get("field") == "glucose_g_per_l" for entry in rejected), "the glucose typo must be rejected, and say so"
    # While the operator had local control the runtime's cycle held (recommending, writing no setpoints) and took over again after.
    assert controlled.states.get("held", 0) >= 12 and controlled.states["closed_loop"] >= 300, controlled.states
    assert "write_refused" not in events, "nothing was sent for the PLC to refuse"
    # The harvest titer predicted on day 4, eleven days before harvest, is within 10 % of what the batch made.
    day_four = [error for t, error in controlled.harvest_titer_errors() if t >= 96.0]
    assert abs(day_four[0]) < 0.10 * kpis.titer_g_per_l


def test_simulate_command_with_nmpc_reports_against_the_recipe(tmp_path):
    command = [sys.executable, "-m", "bioreactor_mpc", "simulate", "--controller", "nmpc", "--seed", "2", "--output-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recipe, same batch" in result.stdout and "score (product per occupied day)" in result.stdout
    assert "harvest titer predicted on day  7" in result.stdout and "failures 0" in result.stdout
    assert "trust region: a band around the platform recipe; width 30 % at the first cycle" in result.stdout, "the nominal kinetics: the recipe band"
    assert "lab result 2 (drawn 24 h) confirmed the model run from 0 h with the inputs applied since" in result.stdout
    stem = "BR01-DEMO-001-seed2-nmpc"
    for suffix in ("-trajectories.csv", "-lab.csv", ".png", "-predictions.png", "-trust.csv", "-trust.png"):
        assert (tmp_path / f"{stem}{suffix}").stat().st_size > 1000
    with (tmp_path / f"{stem}-trust.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    times = [float(row["process_time_h"]) for row in rows]
    assert times[0] == 0.0 and all(b - a == 1.0 for a, b in itertools.pairwise(times)), "one row per hourly cycle"
    late = [row for row in rows if float(row["process_time_h"]) >= 336.0]  # from the recipe's harvest on
    assert late and all(float(row["harvest_earliest_h"]) == float(row["process_time_h"]) for row in late), "the window never opens before now: each row at its cycle's time"
    assert len([row for row in rows if row["lab_check"]]) >= 10, "a lab check a day from day 1"
