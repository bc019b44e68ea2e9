"""Time to the first cycle: a new site config on a warm cache, and a machine with an empty one.

1. Warm: the compiled NLP of the runtime's layout (the default stage counts)
   is in the cache. A new site config (another reactor, media and limits, and
   other tuning, written to a file) is loaded, the MPC built and the first,
   cold solve run at inoculation: the time from reading the file to the first
   plan, and the number of compiles it took (0 expected).
2. Cold (``--cold``, several minutes): an empty cache (a temporary
   ``BIOREACTOR_MPC_CACHE``). Once as the runtime does it (the compile waits,
   then the first solve) and once with the compile in the background (the
   first solves run interpreted; the figures say when the compiled solver
   took over and how long interpreted and compiled solves took).

Usage: python benchmarks/first_cycle.py [--cold]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import casadi as ca
import numpy as np
import yaml

from controller import codegen
from controller.config import BatchConfig
from controller.mpc import EconomicMpc, MpcConfig
from plant_models.cho import CultureModel
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation

REPO = Path(__file__).resolve().parent.parent
HARVEST_H = 336.0


def another_site(directory: Path) -> Path:
    """The platform batch as another site would write it: another reactor, media and limits."""
    data = yaml.safe_load((REPO / "configs" / "batch" / "platform.yaml").read_text(encoding="utf-8"))
    data["equipment"].update(max_working_volume_l=2100.0, feed_rate_max_lph=12.0, glucose_rate_max_lph=2.5, temperature_max_degc=37.5)
    data["media"].update(glucose_feed_g_per_l=450.0, nutrient_feed_glucose_g_per_l=45.0)
    data["limits"].update(osmolality_max_mosm_per_kg=470.0, latest_harvest_h=340.0)
    path = directory / "site-b.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class Plant:
    """The simulated plant's true state and parameters, a cycle at a time, to plan from."""

    def __init__(self) -> None:
        self.plc, _ = build_simulated_plc(load_simulation(REPO / "configs" / "simulate" / "platform.yaml"))
        self.plc.set_operator_remote(False)

    def at(self, hour: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.plc.advance_to(hour)
        snap = self.plc.snapshot()
        applied = np.array([snap["SP.FeedRate"].value, snap["SP.GlucoseRate"].value, snap["SP.Temperature"].value])
        return self.plc.plant.state.copy(), np.asarray(self.plc.plant.parameters), applied


def first_plan(mpc: EconomicMpc, plant: Plant, hour: float = 0.0, warm: dict | None = None):
    state, parameters, applied = plant.at(hour)
    return mpc.solve(process_time_h=hour, state=state, parameters=parameters, previous_inputs=applied, harvest_time_h=HARVEST_H, warm=warm)


@contextlib.contextmanager
def counted_compiles() -> Iterator[list[Path]]:
    """The libraries compiled inside the block."""
    compiles: list[Path] = []
    compile_once = codegen._compile

    def counted(solver: ca.Function, compiler: str, library: Path) -> None:
        compiles.append(library)
        compile_once(solver, compiler, library)

    codegen._compile = counted
    try:
        yield compiles
    finally:
        codegen._compile = compile_once


@contextlib.contextmanager
def empty_cache() -> Iterator[None]:
    """An empty ``BIOREACTOR_MPC_CACHE`` inside the block."""
    saved = os.environ.get("BIOREACTOR_MPC_CACHE")
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["BIOREACTOR_MPC_CACHE"] = scratch
        try:
            yield
        finally:
            if saved is None:
                del os.environ["BIOREACTOR_MPC_CACHE"]
            else:
                os.environ["BIOREACTOR_MPC_CACHE"] = saved


def warm(plant: Plant) -> None:
    EconomicMpc(CultureModel(), BatchConfig.from_yaml(REPO / "configs" / "batch" / "platform.yaml"), MpcConfig())  # the structure's library, compiled if missing
    with counted_compiles() as compiles, tempfile.TemporaryDirectory() as scratch:
        path = another_site(Path(scratch))
        started = time.perf_counter()
        batch = BatchConfig.from_yaml(path)
        mpc = EconomicMpc(CultureModel(), batch, MpcConfig(osmolality_backoff_mosm_per_kg=5.0, temperature_rate_max_degc_per_h=0.4))
        built = time.perf_counter()
        solution = first_plan(mpc, plant)
        done = time.perf_counter()
    print(
        f"warm cache, new site config: first plan {done - started:.1f} s after loading it (build {built - started:.1f} s, first cold solve {done - built:.1f} s, "
        f"{solution.iterations} iterations, success {solution.success}); compiles: {len(compiles)}; library {mpc.library.name}"
    )


def cold(plant: Plant) -> None:
    batch = BatchConfig.from_yaml(REPO / "configs" / "batch" / "platform.yaml")
    with empty_cache():
        started = time.perf_counter()
        mpc = EconomicMpc(CultureModel(), batch, MpcConfig())
        built = time.perf_counter()
        solution = first_plan(mpc, plant)
        print(f"empty cache, compile first: first plan {time.perf_counter() - started:.0f} s (compile and build {built - started:.0f} s), success {solution.success}")
    with empty_cache():
        started = time.perf_counter()
        mpc = EconomicMpc(CultureModel(), batch, MpcConfig(deadline_s=600.0), background_compile=True)
        built = time.perf_counter()
        solution = first_plan(mpc, plant)
        print(
            f"empty cache, compile in the background: first plan {time.perf_counter() - started:.1f} s (interpreted; build {built - started:.1f} s, "
            f"{solution.iterations} iterations, {solution.solve_time_s:.1f} s solve, success {solution.success})"
        )
        interpreted: list[float] = []
        compiled: list[float] = []
        hour, switched_at = 1.0, None
        while hour < HARVEST_H - 24.0:
            was_compiled = mpc.compiled
            solution = first_plan(mpc, plant, hour, solution.warm if solution.success else None)
            if mpc.compiled and switched_at is None:
                switched_at = time.perf_counter() - started
            (compiled if was_compiled or mpc.compiled else interpreted).append(solution.solve_time_s)
            if len(compiled) >= 10:
                break
            hour += 1.0
        print(
            f"  {len(interpreted)} warm cycles interpreted (median {statistics.median(interpreted) if interpreted else float('nan'):.2f} s), "
            f"switched to compiled {switched_at or float('nan'):.0f} s after start; compiled warm cycles median {statistics.median(compiled) if compiled else float('nan'):.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="also time an empty cache (several minutes of compiling)")
    args = parser.parse_args()
    plant = Plant()
    warm(plant)
    if args.cold:
        cold(Plant())


if __name__ == "__main__":
    main()
