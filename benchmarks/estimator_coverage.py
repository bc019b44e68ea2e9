"""Does the estimator's stated uncertainty cover the truth? Coverage of its 95 % bands over closed-loop NMPC batches.

For every cycle of each batch (the runtime's own cycle, in-process) the
estimator's belief at that moment (mean and standard deviation) is held
against:

- the **true state** at the same time (the simulator's, on its minute grid):
  the fraction of cycles with |truth − mean| ≤ 1.96 sd;
- each **lab result**, before the estimator has seen it: the belief of the
  last cycle at or before the draw, with the assay's own noise added
  (z = (lab − mean) / √(sd² + lab sd²)): the fraction with |z| ≤ 1.96.

A calibrated 95 % band covers about 95 %; issue 12's target on plants the
model has never seen is at least 90 %. ``mean z²`` near 1 means the stated
uncertainty is the right size; far above 1, overconfident.

The truth is read from the plant's observables (what a cell counter or a
titer assay would report without noise), so the same comparison holds on
plants whose states differ from the model's.

Scenario sets:

- default: the closed-loop campaign's batches on the model's own structure
  (``--quick``: three of them);
- ``--mismatch``: the CHO plant with strong kinetic *and* measurement
  mismatch (growth, productivity, capacitance per cell, oxygen per cell), the
  stand-in for a plant the model has never seen;
- ``--plant NAME`` (repeatable; ``all`` = every plant of other structure the
  simulator serves): that plant on a few seeds.

Usage: python benchmarks/estimator_coverage.py [--quick] [--mismatch] [--plant NAME] [--jobs 2]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from bioreactor_mpc.logging import configure_logging
from simulator.evaluation import LAB_CHECKS as LAB_FIELDS
from simulator.evaluation import TRUTH_STATES, Coverage, run_with_coverage
from simulator.plants import PLANTS
from simulator.scenarios import load_scenario, scenarios

MISMATCH: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "mu-30% cap+60% qP-30%",
        {"seed": 3, "true_parameter_factors": {"growth.mu_max_per_h": 0.7, "measurement.capacitance_pf_per_cm_per_1e6_cells_ml": 1.6, "product.q_product_pg_per_cell_day": 0.7}},
    ),
    (
        "mu+20% cap-35% O2+50%",
        {
            "seed": 5,
            "true_parameter_factors": {
                "growth.mu_max_per_h": 1.2,
                "measurement.capacitance_pf_per_cm_per_1e6_cells_ml": 0.65,
                "measurement.o2_maintenance_mmol_per_1e9_cells_h": 1.5,
            },
        },
    ),
    (
        "qP+30% death+60% O2-30%",
        {
            "seed": 6,
            "true_parameter_factors": {
                "product.q_product_pg_per_cell_day": 1.3,
                "death.kd_min_per_h": 1.6,
                "death.kd_ammonia_max_per_h": 1.6,
                "measurement.o2_maintenance_mmol_per_1e9_cells_h": 0.7,
                "measurement.o2_per_growth_mmol_per_1e9_cells": 0.7,
            },
        },
    ),
    (
        "yield_glc-25% cap+40% maint+50%",
        {
            "seed": 7,
            "true_parameter_factors": {
                "metabolism.yield_cells_per_glucose_1e9_per_g": 0.75,
                "metabolism.glucose_maintenance_g_per_1e9_cells_h": 1.5,
                "measurement.capacitance_pf_per_cm_per_1e6_cells_ml": 1.4,
            },
        },
    ),
)
"""The CHO plant with kinetic and measurement mismatch beyond the campaign's (the own structure; a stand-in until other plants run)."""

PLANT_SEEDS = (1, 2, 3)


def plant_cases(name: str) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{name} seed {seed}", {"plant": name, "seed": seed}) for seed in PLANT_SEEDS]


@dataclass(frozen=True)
class Measured:
    name: str
    coverage: Coverage


def _quiet() -> None:
    configure_logging(level=logging.ERROR)  # the filter logs every rejection and inflation as a warning


def measure(case: tuple[str, dict[str, Any]]) -> Measured:
    """One closed-loop batch through the deployed cycle with the nominal kinetics, and what its estimator believed (simulator.evaluation)."""
    name, overrides = case
    loaded = load_scenario(overrides)
    return Measured(name, run_with_coverage(loaded, loaded.nominal).coverage)


def report(title: str, measured: list[Measured]) -> None:
    """One line per batch, then the worst and mean coverage per quantity against the 90 % target."""
    print(f"--- {title}")
    rows = [m.coverage for m in measured]
    header = "".join(f"{s[:8]:>9s}" for s in TRUTH_STATES)
    print(f"{'scenario':32s} truth:{header} | lab (predictive):{'vcd':>7s}{'titer':>7s} | mean z² truth vcd/titer, lab vcd/titer")
    for name, r in ((m.name, m.coverage) for m in measured):
        truth = "".join(f"{100 * r.truth[s]:8.0f}%" for s in TRUTH_STATES)
        lab = "".join(f"{100 * r.lab[s]:6.0f}%" for s in LAB_FIELDS)
        z2 = f"{r.truth_z2['viable_cells']:6.1f} {r.truth_z2['titer']:6.1f}  {r.lab_z2['viable_cells']:6.1f} {r.lab_z2['titer']:6.1f}"
        print(f"{name:32s}       {truth} |                 {lab} | {z2}")
    print()
    for state in TRUTH_STATES:
        values = [r.truth[state] for r in rows]
        print(
            f"truth {state:13s} mean coverage {100 * statistics.mean(values):5.1f} %, worst {100 * min(values):5.1f} %   (target >= 90 %: {'met' if min(values) >= 0.9 else 'MISSED'})"
        )
    for state in LAB_FIELDS:
        values = [r.lab[state] for r in rows if math.isfinite(r.lab[state])]
        print(
            f"lab   {state:13s} mean coverage {100 * statistics.mean(values):5.1f} %, worst {100 * min(values):5.1f} %   (target >= 90 %: {'met' if min(values) >= 0.9 else 'MISSED'})"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three of the own-model scenarios only")
    parser.add_argument("--mismatch", action="store_true", help="the CHO plant with strong kinetic and measurement mismatch instead of the campaign's scenarios")
    others = sorted(name for name in PLANTS if name != "cho")
    parser.add_argument(
        "--plant",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a plant of other structure, on seeds {', '.join(map(str, PLANT_SEEDS))} (repeatable; 'all': {', '.join(others) or 'none yet'})",
    )
    parser.add_argument("--jobs", type=int, default=2, help="batches run in parallel processes")
    args = parser.parse_args()
    _quiet()
    sets: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = []
    plants = others if "all" in args.plant else args.plant
    for plant in plants:
        if plant not in PLANTS:
            parser.error(f"unknown plant {plant!r}; expected one of {', '.join(sorted(PLANTS))} or 'all'")
        sets.append((f"plant {plant}", plant_cases(plant)))
    if args.mismatch:
        sets.append(("CHO plant, kinetic and measurement mismatch", list(MISMATCH)))
    if not sets:
        cases = scenarios()
        sets.append(("own model (the campaign's scenarios)", [cases[0], cases[7], cases[14]] if args.quick else cases))
    n_batches = sum(len(cases) for _, cases in sets)
    print(f"estimator coverage of its 95 % bands: {n_batches} closed-loop NMPC batches, {args.jobs} processes")
    with ProcessPoolExecutor(max_workers=args.jobs, initializer=_quiet) as pool:
        results = [(title, list(pool.map(measure, cases))) for title, cases in sets]
    for title, rows in results:
        report(title, rows)


if __name__ == "__main__":
    main()
