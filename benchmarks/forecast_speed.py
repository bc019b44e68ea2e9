"""Wall time of a 360 h forecast from inoculation (target: well under 50 ms), coarse vs the filter's integration.

Printed, median of N runs each:
- the forecast as shipped: one RK4 substep per hour, kernel built once;
- the same with the kernel built in the call (no ``kernel=`` argument);
- the forecast on the filter's own integration (6 substeps of 1/6 h per hour);
- the platform recipe's forecast (a schedule that reacts to the forecast);
- for reference, the filter itself stepped 360 times with no measurements
  (its predict plus its bookkeeping per cycle).

The schedule is the recipe's nutrient feed and temperature shift with a
constant glucose feed that lets glucose run down on day 4, the least smooth
stretch for the coarse substep; the accuracy line compares the two
integrations there.

Usage: python benchmarks/forecast_speed.py [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from controller.config import BatchConfig
from controller.estimator import DEFAULT_ESTIMATED_PARAMETERS, EkfFunctions, ExtendedKalmanEstimator
from controller.forecast import ForecastKernel, forecast, recipe_schedule
from controller.recipe import PlatformRecipe
from plant_models.cho import STATES, CultureModel
from plant_models.parameters import CultureParameters, parameter_vector

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
HORIZON_H = 360.0
TARGET_MS = 50.0


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm caches
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    model = CultureModel()
    batch = BatchConfig.from_yaml(CONFIGS / "batch" / "platform.yaml")
    nominal = parameter_vector(CultureParameters.from_yaml(CONFIGS / "model" / "cho_nominal.yaml"), batch.media)
    functions = EkfFunctions(model, [p.name for p in DEFAULT_ESTIMATED_PARAMETERS])
    estimator = ExtendedKalmanEstimator.from_batch(model, batch, nominal, functions=functions)
    feed_lph = batch.recipe.feed_fraction_of_initial_volume_per_day * batch.inoculation.volume_l / 24.0

    def schedule(t_h: float) -> np.ndarray:
        return np.array([feed_lph if t_h >= batch.recipe.feed_start_h else 0.0, 0.05, 36.5 if t_h < batch.recipe.temperature_shift_h else 33.0])

    build_coarse_ms = _median_ms(lambda: ForecastKernel(estimator), args.repeats)
    build_fine_ms = _median_ms(lambda: ForecastKernel.like_filter(estimator), max(3, args.repeats // 4))
    coarse, fine = ForecastKernel(estimator), ForecastKernel.like_filter(estimator)
    recipe = PlatformRecipe(batch.recipe, batch.media, batch.equipment, batch.inoculation.volume_l)
    recipe_forecast = recipe_schedule(recipe, media=batch.media, glucose_delivered_g=0.0)

    def filter_steps() -> None:
        copy = ExtendedKalmanEstimator.from_batch(model, batch, nominal, functions=functions)
        for k in range(1, int(HORIZON_H) + 1):
            copy.step(float(k), schedule(k - 1.0))

    rows = [
        ("forecast, coarse (1 h RK4 substeps), kernel built once", _median_ms(lambda: forecast(estimator, schedule, until_h=HORIZON_H, kernel=coarse), args.repeats)),
        ("forecast, coarse, kernel built in the call", _median_ms(lambda: forecast(estimator, schedule, until_h=HORIZON_H), args.repeats)),
        ("forecast, fine (the filter's 1/6 h substeps)", _median_ms(lambda: forecast(estimator, schedule, until_h=HORIZON_H, kernel=fine), args.repeats)),
        ("forecast, coarse, platform recipe schedule", _median_ms(lambda: forecast(estimator, recipe_forecast, until_h=HORIZON_H, kernel=coarse), args.repeats)),
        ("reference: filter step x 360, no measurements", _median_ms(filter_steps, max(3, args.repeats // 4))),
    ]
    coarse_result = forecast(estimator, schedule, until_h=HORIZON_H, kernel=coarse)
    fine_result = forecast(estimator, schedule, until_h=HORIZON_H, kernel=fine)
    mean_error = np.abs(coarse_result.state_mean[:, -1] - fine_result.state_mean[:, -1]) / np.abs(fine_result.state_mean[:, -1])
    sd_error = np.abs(coarse_result.state_sd[:, -1] - fine_result.state_sd[:, -1]) / fine_result.state_sd[:, -1]
    titer = [s.name for s in STATES].index("titer")

    print(f"360 h forecast from inoculation, median of {args.repeats} (target < {TARGET_MS:.0f} ms)")
    print(f"  kernel build: coarse {build_coarse_ms:6.1f} ms, fine {build_fine_ms:6.1f} ms")
    for label, ms in rows:
        print(f"  {label:<55s} {ms:7.1f} ms")
    worst_mean, worst_sd = int(np.argmax(mean_error)), int(np.argmax(sd_error))
    print(
        f"  coarse vs fine at 360 h, relative: mean {mean_error[worst_mean]:.1e} ({STATES[worst_mean].name}), "
        f"sd {sd_error[worst_sd]:.1e} ({STATES[worst_sd].name}); titer {mean_error[titer]:.1e} / {sd_error[titer]:.1e}"
    )


if __name__ == "__main__":
    main()
