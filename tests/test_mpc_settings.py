"""A site's equipment, limits, media and tuning are parameters of the compiled NLP: another site reuses the cached library and gets its own answer.

The cache key is the compiled library's name (:attr:`EconomicMpc.library`);
what changes it is the model and the horizon's layout (stage counts, substeps
per stage), nothing a site config sets. The compiled solves are held against
fresh, interpreted builds of each config (an independent evaluation of the
same NLP: CasADi's virtual machine, not the generated C).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from controller import codegen
from controller.config import BatchConfig
from controller.mpc import SETTINGS_ROWS, EconomicMpc, MpcConfig, substep_bucket

SMALL: dict[str, Any] = {"fine_stages": 6, "coarse_stages": 4}
COMPILE_TEST_TIMEOUT_S = 1800
"""A compile of the default NLP takes about a minute on the 2-core machine (-O1), several on a loaded one."""


@pytest.fixture(scope="module")
def late_batch(day_twelve):
    """Truth at day 12 of a recipe batch: the state, the true parameters, the recipe's setpoints."""
    plc, applied = day_twelve
    return plc.plant.state.copy(), plc.plant.parameters, np.array([applied.feed_rate_lph, applied.glucose_rate_lph, applied.temperature_degc])


def another_site(batch: BatchConfig) -> BatchConfig:
    """A different reactor, media and limits: every value a site config sets that the NLP uses."""
    data = batch.model_dump()
    data["cycle_period_h"] = 0.5
    data["equipment"].update(max_working_volume_l=2100.0, feed_rate_max_lph=12.0, glucose_rate_max_lph=2.5, temperature_min_degc=31.0, temperature_max_degc=37.5)
    data["media"].update(glucose_feed_g_per_l=450.0, nutrient_feed_glucose_g_per_l=45.0, nutrient_feed_other_osmolytes_mosm_per_kg=550.0)
    data["limits"].update(osmolality_max_mosm_per_kg=470.0, latest_harvest_h=340.0)
    return BatchConfig.model_validate(data)


ANOTHER_TUNING: dict[str, Any] = {
    "osmolality_backoff_mosm_per_kg": 5.0,
    "viability_at_harvest_min_pct": 65.0,
    "galactosylated_fraction_min": 0.45,
    "temperature_rate_max_degc_per_h": 0.4,
    "glucose_min_g_per_l": 1.5,
    "glucose_max_g_per_l": 7.0,
    "volume_backoff_l": 20.0,
    "move_penalty": (2e-3, 1e-3, 5e-4),
    "slack_l1": 20.0,
    "slack_l2": 50.0,
    "tol": 1e-7,
}


def test_cache_key_ignores_site_values_and_follows_the_structure(model, batch):
    reference = EconomicMpc(model, batch, MpcConfig(**SMALL, compile=False))
    other = EconomicMpc(model, another_site(batch), MpcConfig(**SMALL, compile=False, **ANOTHER_TUNING))
    assert other.library == reference.library
    assert not np.array_equal(other.settings_vector(), reference.settings_vector()) and other.settings_vector().shape == (SETTINGS_ROWS,)
    # The horizon's layout is the structure: another stage count, or stages that need more substeps than the bucket holds, is another library.
    assert EconomicMpc(model, batch, MpcConfig(fine_stages=7, coarse_stages=4, compile=False)).library != reference.library
    longer = batch.model_copy(update={"limits": batch.limits.model_copy(update={"latest_harvest_h": 600.0})})
    assert substep_bucket(45) == substep_bucket(48) != substep_bucket(49)
    assert EconomicMpc(model, longer, MpcConfig(**SMALL, compile=False)).library != reference.library


def test_solutions_are_those_of_the_formulation_with_values_in_the_code(model, batch, late_batch):
    """The same config gives the answer it gave when its values were constants of the NLP (commit 408cbba, interpreted, measured before the change)."""
    state, parameters, recipe_inputs = late_batch
    cases: dict[str, tuple[BatchConfig, dict[str, Any], float, list[float]]] = {
        "platform": (batch, {}, -8.624979270243378, [6.949785955200692, 0.9793213843782733, 32.500000055096145]),
        "another": (
            BatchConfig.model_validate(
                batch.model_dump()
                | {
                    "equipment": batch.equipment.model_dump() | {"temperature_max_degc": 37.5, "feed_rate_max_lph": 12.0, "max_working_volume_l": 2100.0},
                    "limits": batch.limits.model_dump() | {"osmolality_max_mosm_per_kg": 470.0},
                }
            ),
            {"osmolality_backoff_mosm_per_kg": 5.0, "viability_at_harvest_min_pct": 65.0, "temperature_rate_max_degc_per_h": 0.4, "move_penalty": (2e-3, 1e-3, 1e-3)},
            -8.616740415891227,
            [7.447974830683423, 0.8473214480206218, 32.60000027214029],
        ),
    }
    for name, (site, tuning, objective, first_inputs) in cases.items():
        mpc = EconomicMpc(model, site, MpcConfig(**SMALL, compile=False, **tuning))
        solution = mpc.solve(process_time_h=288.0, state=state, parameters=parameters, previous_inputs=recipe_inputs, harvest_time_h=336.0)
        assert solution.success, name
        assert solution.objective == pytest.approx(objective, rel=1e-9, abs=1e-12), name
        np.testing.assert_allclose(solution.first_inputs, first_inputs, rtol=1e-8, err_msg=name)


def _solve(mpc: EconomicMpc, late_batch: Any):
    state, parameters, recipe_inputs = late_batch
    return mpc.solve(process_time_h=288.0, state=state, parameters=parameters, previous_inputs=recipe_inputs, harvest_time_h=336.0)


@pytest.mark.timeout(COMPILE_TEST_TIMEOUT_S)
def test_two_sites_share_one_compiled_library_and_solve_as_fresh_builds(model, batch, late_batch, monkeypatch):
    """The runtime's NLP layout (the default stage counts), in the machine's cache: at most one compile (none when the cache is warm), then none for the second site."""
    compiles: list[Path] = []
    compile_once = codegen._compile

    def counted(solver: Any, compiler: str, library: Path) -> None:
        compiles.append(library)
        compile_once(solver, compiler, library)

    monkeypatch.setattr(codegen, "_compile", counted)
    sites = {"platform": (batch, MpcConfig()), "another": (another_site(batch), MpcConfig(**ANOTHER_TUNING))}
    built = {name: EconomicMpc(model, site, config) for name, (site, config) in sites.items()}
    assert len(compiles) <= 1 and built["platform"].library == built["another"].library
    assert all(mpc.compiled for mpc in built.values())
    for name, (site, config) in sites.items():
        fresh = EconomicMpc(model, site, config.model_copy(update={"compile": False}))
        compiled, interpreted = _solve(built[name], late_batch), _solve(fresh, late_batch)
        assert compiled.success and interpreted.success, name
        assert compiled.objective == pytest.approx(interpreted.objective, rel=1e-7), name
        np.testing.assert_allclose(compiled.first_inputs, interpreted.first_inputs, rtol=1e-5, atol=1e-7, err_msg=name)
    assert len(compiles) <= 1


@pytest.mark.compile  # 74 s under load (200 s with -O2): a library compiled from scratch; run with ./dev.sh test -m compile
@pytest.mark.timeout(COMPILE_TEST_TIMEOUT_S)
def test_background_compile_starts_interpreted_then_switches(model, batch, late_batch, tmp_path, monkeypatch):
    """A cache miss with a background compile: the first solve runs interpreted, the compile's progress is logged, and the first solve after it ends runs compiled."""
    monkeypatch.setenv("BIOREACTOR_MPC_CACHE", str(tmp_path))
    monkeypatch.setattr(codegen, "PROGRESS_EVERY_S", 2.0)
    with structlog.testing.capture_logs() as events:
        mpc = EconomicMpc(model, batch, MpcConfig(**SMALL), background_compile=True)
        job = mpc.compile_job
        assert job is not None and not mpc.compiled and mpc.library.parent == tmp_path
        first = _solve(mpc, late_batch)
        assert first.success and not mpc.compiled
        assert job.wait(codegen.COMPILE_TIMEOUT_S), job.error
        second = _solve(mpc, late_batch)
        assert mpc.compiled and mpc.compile_job is None and second.success
    names = [event["event"] for event in events]
    assert names[0] == "mpc_compile_started" and "mpc_compile_progress" in names
    assert names.index("mpc_compile_ready") < names.index("mpc_switched_to_compiled")
    assert all(event["elapsed_s"] > 0.0 for event in events if event["event"] in ("mpc_compile_progress", "mpc_compile_ready"))
    assert second.objective == pytest.approx(first.objective, rel=1e-7)
    np.testing.assert_allclose(second.first_inputs, first.first_inputs, rtol=1e-5, atol=1e-7)
