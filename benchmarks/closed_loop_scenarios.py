"""The closed-loop campaign: recipe, NMPC and perfect-knowledge oracle on a set of seeded batches.

The NMPC runs with the nominal kinetics (no calibration: its trust region is
the band around the recipe, widened as lab results confirm the model) and
with the kinetics calibrated on the plant's process-development batches (its
trust region is their envelope plus a margin: simulator.scenarios).

Prints per scenario and in aggregate: score, titer, harvest time, hours of
constraint violation, and the gap closed = (NMPC − recipe) / (oracle − recipe).
Targets: never below the recipe and zero violation hours (both), mean gap
closed ≥ 0.9 with the calibrated model, a whole closed-loop batch in ≤ 30 s.

Usage: python benchmarks/closed_loop_scenarios.py [--quick] [--truth-arm] [--engine local|dask] [--address tcp://host:8786] [--jobs 2] [--csv PATH]
(docs/campaigns.md: the batches on a Dask cluster, the CSV table's columns)
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import time

from bioreactor_mpc.logging import configure_logging
from simulator.campaign import Engine, add_campaign_options, run_campaign, write_table
from simulator.scenarios import development_calibration, run_scenario, scenarios


def _quiet() -> None:
    """Warnings and errors only, on stderr: the figures go to stdout."""
    configure_logging(level=logging.WARNING)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="three scenarios only")
    parser.add_argument(
        "--truth-arm",
        action="store_true",
        help="also the NMPC given the plant's true kinetics (trust region and monitor as deployed): what the caution costs when the model is right",
    )
    add_campaign_options(parser)
    args = parser.parse_args()
    _quiet()
    cases = scenarios()
    if args.quick:
        cases = [cases[0], cases[4], cases[-1]]
    where = f"{args.jobs} processes" if args.engine is Engine.LOCAL else f"Dask at {args.address}" if args.address else f"a local Dask cluster of {args.jobs} workers"
    print(f"closed-loop campaign: {len(cases)} scenarios, {where}", flush=True)
    started = time.perf_counter()
    calibration = development_calibration()
    print(
        f"calibrated on {len(calibration.parameters.provenance.batches) if calibration.parameters.provenance else 0} development batches in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    rows = run_campaign(
        functools.partial(run_scenario, calibrated=calibration.parameters, truth_arm=args.truth_arm),
        cases,
        engine=args.engine,
        jobs=args.jobs,
        address=args.address,
        initializer=_quiet,
        label="scenarios",
    )
    truth_header = f" | {'truth':>8s} {'gap':>6s} {'viol h':>7s}" if args.truth_arm else ""
    print(
        f"{'scenario':28s} {'recipe':>8s} {'NMPC':>8s} {'oracle':>8s} {'gap':>6s} {'titer':>6s} {'harvest':>8s} {'viol h':>7s} {'fails':>5s} {'retry':>5s} {'wall s':>7s} | {'calib.':>8s} {'gap':>6s} {'viol h':>7s}"
        + truth_header
    )
    if args.csv:
        write_table(rows, args.csv)
    for r in rows:
        print(
            f"{r.name:28s} {r.recipe_score:8.1f} {r.nmpc_score:8.1f} {r.oracle_score:8.1f} {r.gap_closed:6.2f} "
            f"{r.nmpc_titer:6.2f} {r.nmpc_harvest_h:8.1f} {r.nmpc_violation_h:7.2f} {r.nmpc_failures:5d} {r.nmpc_cold_retries:5d} {r.nmpc_wall_s:7.1f} | "
            f"{r.calibrated_score:8.1f} {r.calibrated_gap_closed:6.2f} {r.calibrated_violation_h:7.2f}"
            + (f" | {r.truth_score:8.1f} {r.truth_gap_closed:6.2f} {r.truth_violation_h:7.2f}" if args.truth_arm else "")
        )
    gaps = [r.gap_closed for r in rows]
    print()
    recipe, nmpc, oracle = (statistics.mean(getattr(r, f"{who}_score") for r in rows) for who in ("recipe", "nmpc", "oracle"))
    print(f"mean score [g/day]     recipe {recipe:.1f}, NMPC {nmpc:.1f} ({100 * (nmpc / recipe - 1):+.1f} %), oracle {oracle:.1f}")
    calibrated_gaps = [r.calibrated_gap_closed for r in rows]
    calibrated = statistics.mean(r.calibrated_score for r in rows)
    print(f"calibrated model       NMPC {calibrated:.1f} ({100 * (calibrated / recipe - 1):+.1f} %)")
    print(
        f"mean gap closed        nominal {statistics.mean(gaps):.3f} (the recipe band's caution), calibrated {statistics.mean(calibrated_gaps):.3f}   (target >= 0.9 calibrated: {'met' if statistics.mean(calibrated_gaps) >= 0.9 else 'MISSED'})"
    )
    truth_gaps = [r.truth_gap_closed for r in rows] if args.truth_arm else []
    print(
        f"minimum gap closed     nominal {min(gaps):.3f}, calibrated {min(calibrated_gaps):.3f}   (never below the recipe: {'met' if min(gaps + calibrated_gaps + truth_gaps) >= 0.0 else 'MISSED'})"
    )
    if truth_gaps:
        print(
            f"true kinetics          mean gap {statistics.mean(truth_gaps):.3f} (min {min(truth_gaps):.3f}): the trust region's and the monitor's caution when the model is right"
        )
    violation = sum(r.nmpc_violation_h + r.calibrated_violation_h + (r.truth_violation_h if args.truth_arm else 0.0) for r in rows)
    print(f"violation hours, all   {violation:.2f}   (target 0: {'met' if violation == 0 else 'MISSED'})")
    walls = [r.nmpc_wall_s for r in rows]
    at_a_time = args.jobs if args.address is None else "as many as the cluster has workers"
    within = sum(wall <= 30.0 for wall in walls)
    print(
        f"NMPC batch wall time   median {statistics.median(walls):.1f} s, max {max(walls):.1f} s, {within} of {len(walls)} within 30 s, "
        f"{at_a_time} at a time   (target <= 30 s for every batch: {'met' if max(walls) <= 30 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
