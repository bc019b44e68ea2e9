"""Wall time of one 15-day simulated batch (target: at most 2 s on the 2-core reference machine).

Measured side by side in one run:
- the simulator as shipped (each stretch between events integrated in one CasADi call);
- the same plant stepped minute by minute from Python, the obvious alternative,
  to show what the stretch integration buys.

Usage: python benchmarks/simulation_speed.py [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from plant_models.cho import CultureModel
from simulator.batch import build_simulated_plc, run_recipe_batch
from simulator.config import load_simulation

PLATFORM = Path(__file__).resolve().parent.parent / "configs" / "simulate" / "platform.yaml"
TARGET_S = 2.0


def _minute_by_minute(model: CultureModel, loaded) -> float:
    """The recipe's inputs replayed through a per-minute RK4 call from Python."""
    plc, _ = build_simulated_plc(loaded, model)
    step = model.rk4_step(1.0 / 60.0)
    reference = run_recipe_batch(loaded, model=model).trajectory
    start = time.perf_counter()
    t, x, p = 0.0, plc.plant.state.copy(), plc.plant.parameters
    for row in range(1, reference.time_h.size):
        t_next, x_next = step(t, x, reference.inputs[row], p)
        t, x = float(t_next), np.asarray(x_next).ravel()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    loaded = load_simulation(PLATFORM)

    start = time.perf_counter()
    model = CultureModel()
    run_recipe_batch(loaded, model=model)
    first_s = time.perf_counter() - start

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = run_recipe_batch(loaded, model=model)
        times.append(time.perf_counter() - start)
    naive_s = _minute_by_minute(model, loaded)
    median_s = statistics.median(times)
    minutes = result.trajectory.time_h.size - 1

    print("simulation speed: one recipe batch, 1-minute plant resolution")
    print(f"  batch length                 {result.kpis.harvest_time_h:.0f} h ({minutes} plant steps)")
    print(f"  first batch (builds model)   {first_s:.3f} s")
    print(f"  batch, median of {args.repeats:<2d}         {median_s:.3f} s   (min {min(times):.3f}, max {max(times):.3f})")
    print(f"  minute-by-minute from Python {naive_s:.3f} s   (integration only, no PLC logic)")
    print(f"  ratio naive / shipped        {naive_s / median_s:.1f}x")
    print(f"  target <= {TARGET_S:.1f} s                {'met' if median_s <= TARGET_S else 'MISSED'}")


if __name__ == "__main__":
    main()
