"""How long does calibration take, and does it recover what it should? Six batch records, the fit alone and with cross-validation.

Two cases:

- the controller's own CHO model with known true factors (growth ×0.8,
  productivity ×1.2, capacitance per cell ×1.3): the recovered factors are
  printed beside the truth with their 95 % intervals;
- a plant of other structure (``--plant``, default cell_cycle): the fit
  statistics and the parameters the data could not determine.

Target (issue 12): six batches calibrate in at most 2 minutes on 2 cores.

With ``--corrections`` both fits also take the model's corrections
(configs/calibration/corrections.yaml, docs/calibration.md §2b).

Usage: python benchmarks/calibration_speed.py [--plant cell_cycle] [--corrections]
"""

from __future__ import annotations

import argparse
import logging
import time

from bioreactor_mpc.logging import configure_logging
from controller.calibration import WITH_CORRECTIONS, CalibrationSettings, calibrate
from plant_models.parameters import is_additive
from simulator.records import development_batches
from simulator.scenarios import load_scenario

TRUE_FACTORS = {"growth.mu_max_per_h": 0.8, "product.q_product_pg_per_cell_day": 1.2, "measurement.capacitance_pf_per_cm_per_1e6_cells_ml": 1.3}
BATCHES = 6


def run(label: str, overrides: dict[str, object], truth: dict[str, float] | None, settings: CalibrationSettings) -> None:
    """``truth``: the true factors of the parameters (1 where not named), or None for a plant of other structure."""
    loaded = load_scenario({"seed": 900, **overrides})
    started = time.perf_counter()
    records = development_batches(loaded, BATCHES, 900)
    recorded_s = time.perf_counter() - started
    fit = calibrate(records, loaded.nominal, settings=settings, cross_validate=False)
    with_cv = calibrate(records, loaded.nominal, settings=settings, cross_validate=True)
    stats = fit.fit_statistics
    print(f"\n{label}: {BATCHES} batches ({recorded_s:.1f} s to simulate and record them)")
    print(f"  fit alone {fit.wall_s:.1f} s ({stats['iterations']:.0f} iterations, {stats['residuals']:.0f} residuals); with cross-validation {with_cv.wall_s:.1f} s")
    print(f"  reduced chi2 {stats['reduced_chi2_nominal']:.2f} nominal -> {stats['reduced_chi2']:.2f}")
    for quantity in ("vcd_1e6_per_ml", "titer_g_per_l", "glucose_g_per_l"):
        cv = with_cv.cross_validation
        print(
            f"  {quantity:16s} relative RMSE fitted {stats[f'rel_rmse_{quantity}_nominal']:.3f} -> {stats[f'rel_rmse_{quantity}']:.3f}; "
            f"left out {cv[f'{quantity}_nominal']:.3f} -> {cv[f'{quantity}_calibrated']:.3f}"
        )
    for name, estimate in fit.estimates.items():
        short = name.removeprefix("culture.")
        if estimate.ci95_low is None or estimate.ci95_high is None:
            print(f"  {short:58s} not identifiable (kept nominal)")
            continue
        if is_additive(name):  # the amount added
            print(f"  {short:58s} {estimate.value - estimate.nominal:+.4f} [{estimate.ci95_low - estimate.nominal:+.4f}, {estimate.ci95_high - estimate.nominal:+.4f}]")
            continue
        factor = estimate.value / estimate.nominal
        low, high = estimate.ci95_low / estimate.nominal, estimate.ci95_high / estimate.nominal
        expected = None if truth is None else truth.get(short, 1.0)
        inside = "" if expected is None else (" truth inside" if low <= expected <= high else " TRUTH OUTSIDE")
        shown = "" if expected is None else f" (true x{expected:.2f})"
        print(f"  {short:58s} x{factor:.3f} [{low:.3f}, {high:.3f}]{shown}{inside}")
    slowest = max(fit.wall_s, with_cv.wall_s)
    print(f"  target: {BATCHES} batches in <= 120 s: {'met' if slowest <= 120.0 else 'NOT met'} ({slowest:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plant", default="cell_cycle", help="a plant of other structure (simulator.plants)")
    parser.add_argument("--corrections", action="store_true", help="also fit the model's corrections (docs/calibration.md §2b)")
    args = parser.parse_args()
    configure_logging(level=logging.WARNING)
    settings = CalibrationSettings(parameters=WITH_CORRECTIONS) if args.corrections else CalibrationSettings()
    run("CHO model, known factors", {"true_parameter_factors": TRUE_FACTORS}, TRUE_FACTORS, settings)
    run(f"plant {args.plant}", {"plant": args.plant}, None, settings)


if __name__ == "__main__":
    main()
