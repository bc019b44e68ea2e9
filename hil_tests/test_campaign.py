"""The closed-loop campaign's targets, asserted (about 15 minutes on 2 cores: ``./dev.sh test -m campaign``)."""

from __future__ import annotations

import logging
import statistics
from concurrent.futures import ProcessPoolExecutor

import pytest

from bioreactor_mpc.logging import configure_logging
from simulator.scenarios import run_scenario, scenarios

pytestmark = [pytest.mark.campaign, pytest.mark.timeout(3600)]


def _quiet() -> None:
    configure_logging(level=logging.WARNING)


def test_nmpc_closes_the_gap_to_the_oracle_without_violations():
    with ProcessPoolExecutor(max_workers=2, initializer=_quiet) as pool:
        results = list(pool.map(run_scenario, scenarios()))
    assert len(results) >= 20
    for result in results:
        assert result.nmpc_score >= result.recipe_score, f"{result.name}: NMPC below the recipe"
        assert result.nmpc_violation_h == 0.0, f"{result.name}: {result.nmpc_violation_h} h of constraint violation"
    assert statistics.mean(result.gap_closed for result in results) >= 0.8
