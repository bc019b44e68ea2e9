"""simulator.campaign: the same table from local processes and from a Dask cluster started here, in submission order; a failing job named.

The jobs are real recipe batches (about half a second each); the cluster's
two worker processes listen on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from distributed import LocalCluster

from bioreactor_mpc.logging import configure_logging
from controller.calibration import WITH_CORRECTIONS, CalibrationSettings
from plant_models.errors import BioreactorMPCError
from simulator.batch import run_recipe_batch
from simulator.campaign import CampaignJobError, Engine, add_settings_option, load_settings, run_campaign, write_table
from simulator.scenarios import load_scenario

pytestmark = pytest.mark.timeout(60)

BATCHES = [("cho", 1), ("amino_acid", 2), ("cho", 2)]
"""Seeds and plants whose recipe scores all differ, so a row in the wrong place shows."""


@dataclass(frozen=True)
class RecipeRow:
    plant: str
    seed: int
    score_g_per_day: float
    titer_g_per_l: float
    violation_h: float


def recipe_row(batch: tuple[str, int]) -> RecipeRow:
    plant, seed = batch
    kpis = run_recipe_batch(load_scenario({"plant": plant, "seed": seed})).kpis
    return RecipeRow(plant, seed, kpis.score_g_per_day, kpis.titer_g_per_l, kpis.violation_h)


def quiet() -> None:
    """Spawned and remote workers start with structlog's defaults, not this process's set-up."""
    configure_logging(level=logging.ERROR)


@dataclass(frozen=True)
class Finished:
    slept_s: float
    monotonic_s: float
    """When the job ended, on the machine's monotonic clock (one clock for all its processes)."""


def sleep(seconds: float) -> Finished:
    time.sleep(seconds)
    return Finished(seconds, time.monotonic())


def set_environment(name: str) -> None:
    os.environ[name] = "set"


def environment(name: str) -> str | None:
    return os.environ.get(name)


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """An existing cluster, as a site would have one: a scheduler and two single-threaded worker processes."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


@pytest.fixture(params=[Engine.LOCAL, Engine.DASK])
def engine(request: pytest.FixtureRequest, scheduler: str) -> dict[str, Any]:
    """The keyword arguments that put a campaign on each engine."""
    if request.param is Engine.LOCAL:
        return {"engine": Engine.LOCAL, "jobs": 2}
    return {"engine": Engine.DASK, "address": scheduler}


def test_dask_cluster_gives_the_table_of_local_processes_and_of_one_process(scheduler: str, tmp_path: Path) -> None:
    in_process = [recipe_row(batch) for batch in BATCHES]
    local = run_campaign(recipe_row, BATCHES, jobs=2, initializer=quiet, progress=False)
    on_dask = run_campaign(recipe_row, BATCHES, engine=Engine.DASK, address=scheduler, initializer=quiet, progress=False)
    assert local == in_process
    assert on_dask == in_process
    assert len({row.score_g_per_day for row in in_process}) == len(BATCHES)

    write_table(local, tmp_path / "local.csv")
    write_table(on_dask, tmp_path / "dask.csv")
    assert (tmp_path / "local.csv").read_bytes() == (tmp_path / "dask.csv").read_bytes()
    with (tmp_path / "dask.csv").open(newline="", encoding="utf-8") as file:
        table = list(csv.DictReader(file))
    assert [(r["plant"], int(r["seed"]), float(r["score_g_per_day"])) for r in table] == [(r.plant, r.seed, r.score_g_per_day) for r in in_process]


def test_a_cluster_started_for_the_campaign_gives_the_same_table() -> None:
    assert run_campaign(recipe_row, BATCHES[:2], engine=Engine.DASK, jobs=2, initializer=quiet, progress=False) == [recipe_row(batch) for batch in BATCHES[:2]]


def test_results_keep_submission_order_when_jobs_finish_out_of_order(engine: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    durations_s = [1.5, 0.0, 0.3]
    finished = run_campaign(sleep, durations_s, label="sleeps", **engine)
    assert [f.slept_s for f in finished] == durations_s
    assert finished[1].monotonic_s < finished[0].monotonic_s, "the jobs finished in submission order: the test proves nothing"
    progress = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in progress] == ["sleeps: 1/3 done", "sleeps: 2/3 done", "sleeps: 3/3 done"]


def test_a_failing_job_stops_the_campaign_and_is_named(engine: dict[str, Any]) -> None:
    batches = [("cho", 1), ("no_such_plant", 7), ("cho", 2)]
    if engine["engine"] is Engine.LOCAL:
        engine = {**engine, "jobs": 1}  # one process: the first batch has finished when the second fails
    with pytest.raises(CampaignJobError, match=r"job 1 of 3 batches, recipe_row\(\('no_such_plant', 7\)\), failed: KeyError: .*unknown plant") as raised:
        run_campaign(recipe_row, batches, initializer=quiet, progress=False, **engine)
    error = raised.value
    assert isinstance(error, RuntimeError) and isinstance(error, BioreactorMPCError)
    assert isinstance(error.__cause__, KeyError)
    assert error.index == 1
    assert error.argument == "('no_such_plant', 7)"
    assert 1 not in error.completed
    if engine["engine"] is Engine.LOCAL:
        assert 0 in error.completed
    assert error.completed == {index: recipe_row(batches[index]) for index in error.completed}


def test_the_initializer_runs_in_the_worker_before_each_job(engine: dict[str, Any]) -> None:
    name = f"CAMPAIGN_TEST_{uuid.uuid4().hex}"
    assert run_campaign(environment, [name] * 3, initializer=functools.partial(set_environment, name), progress=False, **engine) == ["set"] * 3
    assert name not in os.environ


def test_misuse_is_refused_before_anything_runs() -> None:
    assert run_campaign(recipe_row, [], engine=Engine.DASK) == []
    with pytest.raises(ValueError, match="needs engine 'dask'"):
        run_campaign(recipe_row, BATCHES, address="tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match="at least 1"):
        run_campaign(recipe_row, BATCHES, jobs=0)


@dataclass(frozen=True)
class Arm:
    score: float
    coverage: dict[str, float]


@dataclass(frozen=True)
class Comparison:
    case: str
    engine: Engine
    nominal: Arm
    note: str | None


def test_table_flattens_nested_rows_into_dotted_columns_at_full_precision(tmp_path: Path) -> None:
    rows = [
        Comparison("seed 1", Engine.DASK, Arm(0.1 + 0.2, {"vcd": 0.95, "titer": 1 / 3}), None),
        Comparison("seed 2", Engine.LOCAL, Arm(-1e-300, {"titer": 0.5, "vcd": 1.0}), "x"),
    ]
    write_table(rows, tmp_path / "table.csv")
    with (tmp_path / "table.csv").open(newline="", encoding="utf-8") as file:
        header, *cells = list(csv.reader(file))
    assert header == ["case", "engine", "nominal.score", "nominal.coverage.titer", "nominal.coverage.vcd", "note"]
    assert cells[0][:2] == ["seed 1", "dask"] and cells[0][5] == ""
    assert [float(text) for text in cells[0][2:5]] == [0.1 + 0.2, 1 / 3, 0.95]
    assert [float(text) for text in cells[1][2:5]] == [-1e-300, 0.5, 1.0]


def test_table_refuses_rows_of_different_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="same fields"):
        write_table([Arm(1.0, {"vcd": 1.0}), Arm(1.0, {"titer": 1.0})], tmp_path / "table.csv")
    with pytest.raises(TypeError, match="dataclass"):
        write_table([{"score": 1.0}], tmp_path / "table.csv")


def test_the_calibration_settings_option_reads_a_file_and_names_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="campaign")
    add_settings_option(parser)
    assert load_settings(parser, parser.parse_args([]).settings) == CalibrationSettings()
    shipped = Path(__file__).resolve().parents[1] / "configs" / "calibration" / "corrections.yaml"
    assert load_settings(parser, parser.parse_args(["--settings", str(shipped)]).settings).parameters == WITH_CORRECTIONS
    bad = tmp_path / "settings.yaml"
    bad.write_text("parameters: [culture.growth.nope]\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        load_settings(parser, parser.parse_args(["--settings", str(bad)]).settings)
    error = capsys.readouterr().err
    assert "--settings" in error and str(bad) in error and "culture.growth.nope" in error
