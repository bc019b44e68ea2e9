"""Learning from batch to batch: successive batches on each structurally different plant, starting from the nominal model.

Batch 1 runs the deployed cycle (simulator.closed_loop through
controller.cycle, estimator and all) with the nominal kinetics: its trust
region is the band around the recipe. After each batch, its record (scanned
as a historian scans the PLC) joins the plant's history, ``calibrate``
(controller.calibration, what ``bioreactor-mpc calibrate`` runs on the
runtime's history files) refits on the whole history so far, and the next
batch runs with the new model and the envelope of its data, on the recipe the
model proposes against the platform recipe (controller.recipe_proposal;
``bioreactor-mpc calibrate --propose-recipe``) where its ranking check
passes, else on the platform recipe. At a site an
engineer approves each model before use (``bioreactor-mpc model approve``,
docs/calibration.md); here every model is taken as approved.

Each batch has its own seed (the plant's batch-to-batch variation, sampling
times and noise). Printed per plant and batch: the recipe's and the oracle's
score on that batch (the platform recipe's, whatever recipe the batch ran),
the controller's score and gap closed, violation hours, the trust region
(source, width at harvest, cycles stood down), the calibration's time, and
the recipe proposal for the next batch. Then the mean gap closed per batch number over the plants.

Usage: python benchmarks/batch_to_batch.py [--quick] [--batches 5] [--plants amino_acid,cell_cycle,biovolume] [--settings PATH] [--engine local|dask] [--jobs 2] [--csv PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass

from bioreactor_mpc.logging import configure_logging
from controller.calibration import CalibrationSettings, calibrate
from controller.config import RecipeConfig
from controller.recipe_proposal import misranking, propose_recipe, recipe_changes, with_reach_earned
from controller.records import BatchRecord
from plant_models.parameters import CultureParameters
from simulator.batch import run_recipe_batch
from simulator.campaign import Engine, add_campaign_options, add_settings_option, load_settings, run_campaign, write_table
from simulator.evaluation import gap_closed, run_with_coverage
from simulator.oracle import run_oracle_batch
from simulator.records import development_batches
from simulator.scenarios import DEVELOPMENT_SEED, load_scenario

PLANTS = ("amino_acid", "cell_cycle", "biovolume")
FIRST_SEED = 700


@dataclass(frozen=True)
class BatchRow:
    plant: str
    batch: int
    seed: int
    model: str
    """nominal, or the batches the model was calibrated on (e.g. "calibrated on 1-3")."""
    recipe: float
    oracle: float
    score: float
    violation_h: float
    region: str
    width_at_harvest: float
    stood_down_cycles: int
    calibration_s: float
    """Time of the calibration that made this batch's model (0 for the nominal model)."""
    recipe_changes: str
    """How the batch's recipe differs from the platform's (empty: it is the platform's)."""
    proposal: str
    """What the calibration after this batch proposed for the next one (empty after the last)."""

    @property
    def gap(self) -> float:
        return gap_closed(self.score, self.recipe, self.oracle)


def quiet() -> None:
    configure_logging(level=logging.ERROR)


def run_plant(job: tuple[str, int, CalibrationSettings, int]) -> list[BatchRow]:
    """``batches`` successive batches on one plant, each with the model calibrated (with ``settings``) on all the batches before it
    (and on ``development`` process-development records of the plant, if any, run before the first)."""
    plant, batches, settings, development = job
    nominal = load_scenario({"plant": plant}).nominal
    platform_batch = load_scenario({"plant": plant}).batch
    kinetics: CultureParameters = nominal
    history: list[BatchRecord] = []
    rows: list[BatchRow] = []
    calibration_s = 0.0
    in_use: RecipeConfig | None = None
    """The recipe the last calibration proposed (None: the platform's)."""

    def learn() -> tuple[CultureParameters, RecipeConfig | None, str, float]:
        """Calibrate on the history; propose against the platform recipe, always: a proposal is judged on what the plant would otherwise
        run, and one the next model cannot back (its ranking check fails) is dropped for the platform's again."""
        started = time.perf_counter()
        calibration = calibrate(history, nominal, settings=settings, cross_validate=False, based_on=f"nominal kinetics of {plant}")
        seconds = time.perf_counter() - started
        proposal = propose_recipe(history, calibration, platform_batch)
        recipe = proposal.recipe
        said = f"proposed (rank correlation {proposal.ranking.correlation:+.2f}): {_changes(platform_batch.recipe, recipe)}" if recipe is not None else f"none: {proposal.reason}"
        return with_reach_earned(calibration.parameters, misranking(history, calibration, [platform_batch])), recipe, said, seconds  # as `calibrate` writes it

    if development:
        history.extend(development_batches(load_scenario({"plant": plant, "seed": DEVELOPMENT_SEED}), development, DEVELOPMENT_SEED, id_prefix=f"{plant[:6].upper()}"))
        kinetics, in_use, _, calibration_s = learn()  # the first row shows what batch 1 ran
    for k in range(1, batches + 1):
        seed = FIRST_SEED + k
        loaded = load_scenario({"plant": plant, "seed": seed})
        loaded = loaded.model_copy(update={"batch": loaded.batch.model_copy(update={"batch_id": f"B2B-{plant[:4].upper()}-{k:02d}"})})
        recipe = run_recipe_batch(loaded).kpis.score_g_per_day
        oracle = run_oracle_batch(loaded).kpis.score_g_per_day
        platform = loaded.batch.recipe
        run_on = loaded if in_use is None else loaded.model_copy(update={"batch": loaded.batch.model_copy(update={"recipe": in_use})})
        evaluated = run_with_coverage(run_on, kinetics, record=True)
        result = evaluated.result
        kpis = result.batch.kpis
        last = result.trust[-1][1] if result.trust else {}
        before = f"{development} dev" + (f" + 1-{k - 1}" if k > 1 else "") if development else f"1-{k - 1}"
        rows.append(
            BatchRow(
                plant=plant,
                batch=k,
                seed=seed,
                model="nominal" if not history else f"calibrated on {before}",
                recipe=recipe,
                oracle=oracle,
                score=kpis.score_g_per_day,
                violation_h=kpis.violation_h,
                region=str(last.get("source", "")),
                width_at_harvest=float(last.get("width", math.nan)),
                stood_down_cycles=result.decisions_by_source.get("stood_down", 0),
                calibration_s=calibration_s,
                recipe_changes=_changes(platform, in_use),
                proposal="",
            )
        )
        if k == batches:
            break
        assert result.record is not None
        history.append(result.record)
        kinetics, in_use, note, calibration_s = learn()
        rows[-1] = dataclasses.replace(rows[-1], proposal=note)
    return rows


def _changes(platform: RecipeConfig, recipe: RecipeConfig | None) -> str:
    if recipe is None:
        return ""
    return ", ".join(f"{name} {new:g}" for name, (_, new) in recipe_changes(platform, recipe).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two batches on one plant (cell_cycle)")
    parser.add_argument("--batches", type=int, default=5, help="successive batches per plant")
    parser.add_argument("--plants", default=",".join(PLANTS), help="comma-separated plant names")
    parser.add_argument(
        "--development-records",
        type=int,
        default=0,
        metavar="N",
        help="start from N process-development records of each plant (mismatch_campaign's), calibrated on before the first batch; default 0: the nominal model",
    )
    add_settings_option(parser)
    add_campaign_options(parser)
    args = parser.parse_args()
    quiet()
    settings = load_settings(parser, args.settings)
    plants = ["cell_cycle"] if args.quick else [name.strip() for name in args.plants.split(",") if name.strip()]
    batches = 2 if args.quick else args.batches
    started = time.perf_counter()
    per_plant = run_campaign(
        run_plant,
        [(plant, batches, settings, args.development_records) for plant in plants],
        engine=Engine(args.engine),
        jobs=args.jobs,
        address=args.address,
        initializer=quiet,
        label="plants",
    )
    rows = [row for plant_rows in per_plant for row in plant_rows]
    if args.csv:
        write_table(rows, args.csv)
    header = f"{'plant':11s} {'batch':>5s} {'model':26s} {'recipe':>7s} {'oracle':>7s} {'score':>7s} {'gap':>6s} {'viol h':>6s} {'region':>21s} {'width':>5s} {'stood down':>10s} {'calib. s':>8s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.plant:11s} {r.batch:5d} {r.model:26s} {r.recipe:7.1f} {r.oracle:7.1f} {r.score:7.1f} {r.gap:6.2f} {r.violation_h:6.1f} "
            f"{r.region:>21s} {r.width_at_harvest:5.2f} {r.stood_down_cycles:10d} {r.calibration_s:8.1f}"
        )
        if r.recipe_changes:
            print(f"{'':18s}ran on the proposed recipe: {r.recipe_changes}")
        if r.proposal:
            print(f"{'':18s}next recipe: {r.proposal}")
    print()
    for k in range(1, batches + 1):
        mine = [r for r in rows if r.batch == k]
        gaps = [r.gap for r in mine]
        below = sum(r.score < r.recipe for r in mine)
        print(
            f"batch {k}: mean gap closed {statistics.fmean(gaps):+.2f} (min {min(gaps):+.2f}), below the recipe on {below}/{len(mine)} plants, "
            f"violation {sum(r.violation_h for r in mine):.1f} h"
        )
    print(f"\n{len(rows)} batches on {len(plants)} plants in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
