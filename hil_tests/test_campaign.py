"""The closed-loop campaign's targets, asserted (about 30 minutes on 2 cores: ``./dev.sh test -m campaign``)."""

from __future__ import annotations

import functools
import logging
import statistics

import pytest

from bioreactor_mpc.logging import configure_logging
from simulator.campaign import run_campaign
from simulator.scenarios import development_calibration, run_scenario, scenarios

pytestmark = [pytest.mark.campaign, pytest.mark.timeout(5400)]


def _quiet() -> None:
    configure_logging(level=logging.WARNING)


def test_nmpc_never_worse_than_the_recipe_and_calibrated_closes_the_gap():
    """Nominal kinetics (the recipe band) and kinetics calibrated on the plant's development batches (their envelope)."""
    calibrated = development_calibration().parameters
    results = run_campaign(functools.partial(run_scenario, calibrated=calibrated), scenarios(), jobs=2, initializer=_quiet, progress=False)
    assert len(results) >= 20
    for result in results:
        assert result.nmpc_score >= result.recipe_score, f"{result.name}: NMPC (nominal) below the recipe"
        assert result.calibrated_score >= result.recipe_score, f"{result.name}: NMPC (calibrated) below the recipe"
        assert result.nmpc_violation_h == result.calibrated_violation_h == 0.0, f"{result.name}: constraint violation"
    assert statistics.mean(result.calibrated_gap_closed for result in results) >= 0.9
