"""Run every benchmark in this folder, one after the other, printing their figures."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCHMARKS = ["simulation_speed.py"]


def main() -> None:
    here = Path(__file__).resolve().parent
    for name in BENCHMARKS:
        print(f"=== {name}")
        sys.argv = [name]
        runpy.run_path(str(here / name), run_name="__main__")
        print()


if __name__ == "__main__":
    main()
