"""Run every benchmark in this folder, one after the other, printing their figures.

By default the long ones run in their ``--quick`` form (a few minutes each);
``--full`` runs each in full: more than an hour on the 2-core machine (the
own-plant, mismatch and batch-to-batch campaigns alone took 17, 13 and 15
minutes on 6 Dec 2026).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCHMARKS: list[tuple[str, list[str]]] = [
    ("simulation_speed.py", []),
    ("solver_speed.py", ["--quick"]),
    ("first_cycle.py", []),
    ("robust_speed.py", ["--quick"]),
    ("closed_loop_scenarios.py", ["--quick"]),
    ("runtime_speed.py", ["--protocol", "opcua"]),
    ("forecast_speed.py", []),
    ("estimator_coverage.py", ["--quick"]),
    ("calibration_speed.py", []),
    ("mismatch_campaign.py", ["--quick"]),
    ("batch_to_batch.py", ["--quick"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="run every benchmark in full, not in its --quick form")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    for name, quick in BENCHMARKS:
        arguments = [] if args.full else quick
        print(f"=== {name} {' '.join(arguments)}".rstrip(), flush=True)
        sys.argv = [name, *arguments]
        runpy.run_path(str(here / name), run_name="__main__")
        print(flush=True)


if __name__ == "__main__":
    main()
