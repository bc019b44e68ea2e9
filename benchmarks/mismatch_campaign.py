"""The controller on plants its model has never seen: recipe, NMPC with nominal kinetics, NMPC calibrated on the plant's own batch records.

For each structurally different plant (simulator/plants, docs/plants.md):

1. the plant's "history": a recipe batch and process-development batches
   (other temperature shifts, feed rates, glucose targets), recorded as a
   historian scans the PLC (simulator.records);
2. ``calibrate`` on those records (controller.calibration: what
   ``bioreactor-mpc calibrate`` runs);
3. the next batch's recipe the calibrated model proposes
   (controller.recipe_proposal: what ``bioreactor-mpc calibrate
   --propose-recipe`` writes), where its ranking check passes;
4. on batches of other seeds and scenarios: the platform recipe, the NMPC with
   the nominal kinetics, the NMPC with the calibrated kinetics (all three
   through the runtime's own cycle with its estimator), the same on the
   proposed recipe (the same batch as the calibrated one where none is
   proposed), and the plant's perfect-knowledge oracle (simulator.oracle).
   Every gap is against the platform recipe's score on the same batch.

Printed per batch and per plant (the proposed recipe's arm in the summary): score (g/day), gap closed against the
oracle, violation hours, the estimator's 95 % coverage of lab VCD and titer and
of the true VCD and titer, and the error of the titer predicted at harvest.
The calibration's fit, intervals and wall time are printed per plant.

Usage: python benchmarks/mismatch_campaign.py [--quick] [--plants amino_acid,cell_cycle,biovolume]
       [--settings configs/calibration/corrections.yaml] [--engine local|dask] [--address tcp://host:8786] [--jobs 2] [--csv PATH]
(docs/campaigns.md: the batches on a Dask cluster, the CSV table's columns)
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bioreactor_mpc.logging import configure_logging
from controller.calibration import CalibrationSettings, calibrate
from controller.config import RecipeConfig
from controller.recipe_proposal import misranking, propose_recipe, with_reach_earned
from plant_models.parameters import CultureParameters
from simulator.batch import run_recipe_batch
from simulator.campaign import add_campaign_options, add_settings_option, load_settings, run_campaign, write_table
from simulator.evaluation import EvaluatedBatch, gap_closed, run_with_coverage
from simulator.oracle import run_oracle_batch
from simulator.records import development_batches
from simulator.scenarios import load_scenario

PLANTS = ("amino_acid", "cell_cycle", "biovolume")
DEVELOPMENT_BATCHES = 5
"""Records per plant, each of its own recipe (simulator.records.development_recipes)."""
EARLIER_HARVEST_H = 6.0
"""A harvest this much before the recipe's counts as earlier in the summary (the lab's daily viability result moves it by a day)."""


def cases(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """Seeds and scenarios run on every plant."""
    if quick:
        return [("seed 1", {"seed": 1})]
    return [
        ("seed 1", {"seed": 1}),
        ("seed 2", {"seed": 2}),
        ("feed lot 15% weaker", {"seed": 3, "faults": [{"kind": "feed_lot", "start_h": 96.0, "strength": 0.85}]}),
        ("capacitance probe Bad", {"seed": 4, "faults": [{"kind": "probe", "tag": "PV.Capacitance", "mode": "bad", "start_h": 100.0}]}),
    ]


@dataclass(frozen=True)
class Arm:
    score: float
    violation_h: float
    lab_coverage: dict[str, float]
    truth_coverage: dict[str, float]
    harvest_titer_error: float
    harvest_h: float

    @classmethod
    def of(cls, evaluated: EvaluatedBatch) -> Arm:
        kpis = evaluated.result.batch.kpis
        return cls(kpis.score_g_per_day, kpis.violation_h, evaluated.coverage.lab, evaluated.coverage.truth, evaluated.harvest_titer_error, kpis.harvest_time_h)


@dataclass(frozen=True)
class Row:
    plant: str
    case: str
    recipe: float
    recipe_harvest_h: float
    oracle: float
    nominal: Arm
    calibrated: Arm
    proposed: Arm
    """The calibrated NMPC on the proposed recipe; the calibrated arm itself where no recipe was proposed."""
    recipe_proposed: bool
    wall_s: float

    def gap(self, score: float) -> float:
        return gap_closed(score, self.recipe, self.oracle)


@dataclass(frozen=True)
class PlantCalibration:
    plant: str
    parameters: CultureParameters
    wall_s: float
    reduced_chi2_nominal: float
    reduced_chi2: float
    not_identifiable: tuple[str, ...]
    warnings: tuple[str, ...]
    proposed_recipe: RecipeConfig | None
    proposal_note: str
    """The changes proposed, or why none was."""


def calibrate_plant(job: tuple[str, CalibrationSettings]) -> PlantCalibration:
    plant, settings = job
    configure_logging(level=logging.ERROR)
    nominal = load_scenario({"plant": plant}).nominal
    records = development_batches(load_scenario({"plant": plant, "seed": 500}), DEVELOPMENT_BATCHES, 500, id_prefix=f"{plant[:6].upper()}")
    started = time.perf_counter()
    result = calibrate(records, nominal, settings=settings, cross_validate=False, based_on="configs/model/cho_nominal.yaml")
    wall_s = time.perf_counter() - started
    batch = load_scenario({"plant": plant}).batch
    proposal = propose_recipe(records, result, batch)
    misranked = misranking(records, result, [batch])
    parameters = with_reach_earned(result.parameters, misranked)  # as `calibrate` writes it
    changes = ", ".join(f"{name} {old:g} -> {new:g}" for name, (old, new) in proposal.changes(batch.recipe).items())
    note = (
        f"recipe proposed (rank correlation {proposal.ranking.correlation:+.2f}, {100 * proposal.predicted_gain_fraction:+.1f} % in the model's forecast): {changes}"
        if proposal.recipe is not None
        else f"no recipe proposed: {proposal.reason}"
    )
    if misranked is not None:
        note += "; no operating envelope: the NMPC plans in the recipe band (docs/calibration.md §7, item 4)"
    statistics_ = result.fit_statistics
    return PlantCalibration(
        plant,
        parameters,
        wall_s,
        statistics_["reduced_chi2_nominal"],
        statistics_["reduced_chi2"],
        result.not_identifiable,
        result.warnings,
        proposal.recipe,
        note,
    )


def run_case(job: tuple[str, tuple[str, dict[str, Any]], CultureParameters, RecipeConfig | None]) -> Row:
    configure_logging(level=logging.ERROR)
    plant, (name, overrides), calibrated, proposed_recipe = job
    started = time.perf_counter()
    loaded = load_scenario({"plant": plant, **overrides})
    recipe_kpis = run_recipe_batch(loaded).kpis
    oracle = run_oracle_batch(loaded).kpis.score_g_per_day
    nominal = Arm.of(run_with_coverage(loaded, loaded.nominal))
    tuned = Arm.of(run_with_coverage(loaded, calibrated))
    proposed = tuned
    if proposed_recipe is not None:
        # The only change: the batch file's recipe. The plant, its seed and faults are the same batch; the gap is still against the platform recipe.
        on_proposal = loaded.model_copy(update={"batch": loaded.batch.model_copy(update={"recipe": proposed_recipe})})
        proposed = Arm.of(run_with_coverage(on_proposal, calibrated))
    return Row(plant, name, recipe_kpis.score_g_per_day, recipe_kpis.harvest_time_h, oracle, nominal, tuned, proposed, proposed_recipe is not None, time.perf_counter() - started)


def _coverage(arm: Arm) -> str:
    return f"lab {arm.lab_coverage['viable_cells']:.0%}/{arm.lab_coverage['titer']:.0%} true {arm.truth_coverage['viable_cells']:.0%}/{arm.truth_coverage['titer']:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed per plant")
    parser.add_argument("--plants", default=",".join(PLANTS), help="comma-separated plant names")
    add_settings_option(parser)
    add_campaign_options(parser)
    args = parser.parse_args()
    configure_logging(level=logging.ERROR)
    plants = [name.strip() for name in args.plants.split(",") if name.strip()]
    settings = load_settings(parser, args.settings)
    started = time.perf_counter()
    jobs = [(plant, settings) for plant in plants]
    calibrations = {c.plant: c for c in run_campaign(calibrate_plant, jobs, engine=args.engine, jobs=args.jobs, address=args.address, label="calibrations")}
    for c in calibrations.values():
        print(
            f"{c.plant}: calibrated on {DEVELOPMENT_BATCHES} batches in {c.wall_s:.1f} s; reduced chi2 {c.reduced_chi2_nominal:.1f} nominal -> {c.reduced_chi2:.2f}; "
            f"not identifiable: {', '.join(n.removeprefix('culture.') for n in c.not_identifiable) or 'none'}",
            flush=True,
        )
        for warning in c.warnings:
            print(f"  review: {warning}")
        print(f"  {c.proposal_note}")
    batches = [(plant, case, calibrations[plant].parameters, calibrations[plant].proposed_recipe) for plant in plants for case in cases(args.quick)]
    rows = run_campaign(run_case, batches, engine=args.engine, jobs=args.jobs, address=args.address, label="batches")
    if args.csv:
        write_table(rows, args.csv)
    print()
    header = (
        f"{'plant':11s} {'batch':24s} {'recipe':>7s} {'oracle':>7s} | {'nominal':>7s} {'gap':>6s} {'viol h':>6s} {'coverage VCD/titer':>30s} {'titer@h':>7s} | "
        f"{'calib.':>7s} {'gap':>6s} {'viol h':>6s} {'coverage VCD/titer':>30s} {'titer@h':>7s} | {'on prop.':>8s} {'gap':>6s} {'viol h':>6s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.plant:11s} {r.case:24s} {r.recipe:7.1f} {r.oracle:7.1f} | "
            f"{r.nominal.score:7.1f} {r.gap(r.nominal.score):6.2f} {r.nominal.violation_h:6.1f} {_coverage(r.nominal):>30s} {_titer_error(r.nominal.harvest_titer_error):>7s} | "
            f"{r.calibrated.score:7.1f} {r.gap(r.calibrated.score):6.2f} {r.calibrated.violation_h:6.1f} {_coverage(r.calibrated):>30s} {_titer_error(r.calibrated.harvest_titer_error):>7s} | "
            + (f"{r.proposed.score:8.1f} {r.gap(r.proposed.score):6.2f} {r.proposed.violation_h:6.1f}" if r.recipe_proposed else f"{'(none)':>8s} {'':6s} {'':6s}")
        )
    print()
    for plant in plants:
        mine = [r for r in rows if r.plant == plant]
        for label, pick in ARMS:
            arms = [pick(r) for r in mine]
            gaps = [r.gap(pick(r).score) for r in mine]
            worse = sum(pick(r).score < r.recipe for r in mine)
            # A harvest rule on a threshold (the recipe's lab viability) turns a small difference in the culture into a day's harvest.
            earlier = sum(pick(r).score < r.recipe and pick(r).harvest_h < r.recipe_harvest_h - EARLIER_HARVEST_H for r in mine)
            lab_vcd = statistics.fmean(a.lab_coverage["viable_cells"] for a in arms)
            lab_titer = statistics.fmean(a.lab_coverage["titer"] for a in arms)
            true_vcd = statistics.fmean(a.truth_coverage["viable_cells"] for a in arms)
            true_titer = statistics.fmean(a.truth_coverage["titer"] for a in arms)
            titer_errors = [abs(a.harvest_titer_error) for a in arms if math.isfinite(a.harvest_titer_error)]
            print(
                f"{plant:11s} {label:10s}: mean gap {statistics.fmean(gaps):+.2f} (min {min(gaps):+.2f}), below recipe in {worse}/{len(mine)}"
                f"{f' ({earlier} harvested earlier than the recipe)' if earlier else ''}, "
                f"violation {sum(a.violation_h for a in arms):.1f} h, coverage lab VCD {lab_vcd:.0%} titer {lab_titer:.0%}, true VCD {true_vcd:.0%} titer {true_titer:.0%}, "
                f"|harvest titer error| median {f'{np.median(titer_errors):.1%}' if titer_errors else NO_HARVEST_PREDICTION}"
            )
    for label, pick in ARMS:
        means = [statistics.fmean(r.gap(pick(r).score) for r in rows if r.plant == plant) for plant in plants]
        print(f"mean gap closed over the plants, {label}: {statistics.fmean(means):+.2f}")
    print(f"\n{len(rows)} batches x 4-5 controllers on {len(plants)} plants in {time.perf_counter() - started:.0f} s")


ARMS: tuple[tuple[str, Callable[[Row], Arm]], ...] = (("nominal", lambda r: r.nominal), ("calibrated", lambda r: r.calibrated), ("+ proposal", lambda r: r.proposed))
"""The summary's arms: "+ proposal" is the calibrated NMPC on the proposed recipe (the calibrated arm where none was proposed)."""

NO_HARVEST_PREDICTION = "n/a (no plan predicted the harvest it made in its last 72 h: stood down for the recipe)"


def _titer_error(error: float) -> str:
    """The relative error of the titer a plan predicted for the harvest it made; n/a where no plan did (the NMPC had stood down)."""
    return f"{error:+.1%}" if math.isfinite(error) else "n/a"


if __name__ == "__main__":
    main()
