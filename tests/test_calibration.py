"""Calibration: known kinetics recovered inside their intervals, unidentifiable parameters named and left nominal, bad input refused, the CLI end to end."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from controller.calibration import WITH_CORRECTIONS, CalibrationError, CalibrationSettings, calibrate, check_records, delivered_grid
from controller.records import BatchRecord
from controller.version import tool_version
from interfaces.batch_records import sha256_of, write_batch_directory
from plant_models.parameters import CorrectionParameters, CultureParameters, ParameterEstimate, parameter_bounds, parameter_vector, replaced_parameters, scaled_parameters
from simulator.config import load_simulation
from simulator.records import development_batches
from simulator.scenarios import load_scenario

REPO = Path(__file__).resolve().parent.parent
TRUE_FACTORS = {"growth.mu_max_per_h": 0.8, "product.q_product_pg_per_cell_day": 1.25, "measurement.capacitance_pf_per_cm_per_1e6_cells_ml": 1.3}
FAST = CalibrationSettings(
    parameters=(
        "culture.growth.mu_max_per_h",
        "culture.product.q_product_pg_per_cell_day",
        "culture.measurement.capacitance_pf_per_cm_per_1e6_cells_ml",
        "culture.metabolism.yield_cells_per_glucose_1e9_per_g",
        "culture.death.kd_min_per_h",
    ),
    step_h=2.0,
    rk4_substeps=4,
)


@pytest.fixture(scope="module")
def records() -> list[BatchRecord]:
    """Four batches of a cell line that grows slower, makes more product and reads higher on the capacitance probe than nominal."""
    return development_batches(load_scenario({"seed": 70, "true_parameter_factors": TRUE_FACTORS}), 4, 70)


@pytest.fixture(scope="module")
def nominal() -> CultureParameters:
    return CultureParameters.from_yaml(REPO / "configs" / "model" / "cho_nominal.yaml")


def test_known_kinetics_are_recovered_inside_their_intervals(records, nominal):
    result = calibrate(records, nominal, settings=FAST, cross_validate=False)
    truth = {f"culture.{name}": factor for name, factor in TRUE_FACTORS.items()}
    for name, estimate in result.estimates.items():
        factor = truth.get(name, 1.0)
        assert estimate.identifiable, name
        assert estimate.ci95_low / estimate.nominal <= factor <= estimate.ci95_high / estimate.nominal, (name, estimate)
        assert estimate.value / estimate.nominal == pytest.approx(factor, rel=0.06), name
    assert result.fit_statistics["reduced_chi2"] < 0.2 * result.fit_statistics["reduced_chi2_nominal"]
    assert result.fit_statistics["rel_rmse_vcd_1e6_per_ml"] < 0.5 * result.fit_statistics["rel_rmse_vcd_1e6_per_ml_nominal"]
    # The calibrated set is the nominal one with the fitted entries changed, and says where it came from.
    calibrated = result.parameters
    assert calibrated.growth.mu_max_per_h == pytest.approx(result.estimates["culture.growth.mu_max_per_h"].value)
    assert calibrated.growth.k_glucose_g_per_l == nominal.growth.k_glucose_g_per_l
    assert calibrated.provenance is not None and calibrated.provenance.batches == tuple(r.batch_id for r in records)
    assert np.all(np.isfinite(parameter_vector(calibrated, records[0].batch.media)))
    # The envelope holds what the development batches ran: their temperature shifts.
    production = {phase.phase: phase for phase in calibrated.envelope}["production"]
    shifted = [r.batch.recipe.temperature_shifted_degc for r in records]
    assert production.temperature_degc.low == pytest.approx(min(shifted), abs=0.01)
    assert production.temperature_degc.high == pytest.approx(max(shifted), abs=0.01)


def test_a_parameter_the_data_cannot_see_is_named_and_left_nominal(records, nominal):
    """Osmolality never comes near the growth-inhibition midpoint in these batches: its parameter is not identifiable."""
    settings = FAST.model_copy(update={"parameters": (*FAST.parameters[:2], "culture.growth.osmolality_half_mosm_per_kg")})
    result = calibrate(records, nominal, settings=settings, cross_validate=False)
    assert result.not_identifiable == ("culture.growth.osmolality_half_mosm_per_kg",)
    estimate = result.estimates["culture.growth.osmolality_half_mosm_per_kg"]
    assert not estimate.identifiable and estimate.value == estimate.nominal == nominal.growth.osmolality_half_mosm_per_kg
    assert result.parameters.growth.osmolality_half_mosm_per_kg == nominal.growth.osmolality_half_mosm_per_kg
    assert result.estimates["culture.growth.mu_max_per_h"].identifiable
    assert not any("put back to nominal" in w for w in result.warnings)  # the records do not reject the nominal they cannot see


def test_a_nominal_the_records_reject_is_put_back_only_with_a_warning(nominal):
    """Basal death a hundredth of nominal: the fit runs to its bound (×0.1), where the records hardly tell values apart.

    The rule puts the parameter back to nominal as not identifiable; the review says the records reject that nominal,
    by how much, and what to do, where before it said nothing (the fit itself looked fine).
    """
    lasting = development_batches(load_scenario({"seed": 73, "true_parameter_factors": {"death.kd_min_per_h": 0.01}}), 4, 73)
    # (The interval spans a factor of about 4.3 there: the rule's threshold is lowered to 3 for a clear margin.)
    settings = FAST.model_copy(update={"parameters": ("culture.product.q_product_pg_per_cell_day", "culture.death.kd_min_per_h"), "identifiable_max_ratio": 3.0})
    result = calibrate(lasting, nominal, settings=settings, cross_validate=False)
    assert result.not_identifiable == ("culture.death.kd_min_per_h",)
    warning = next(w for w in result.warnings if w.startswith("death.kd_min_per_h was put back to nominal"))
    assert "the records reject that value" in warning and "log_multiplier_bound" in warning
    assert float(warning.split("chi-square ")[1].split(" ")[0]) > 3.841
    assert "did not converge" not in warning and not any("without converging" in w for w in result.warnings)
    # Where the records say nothing about the parameter put back, there is no such warning:
    # test_a_parameter_the_data_cannot_see_is_named_and_left_nominal.


def test_a_batch_without_lab_results_is_refused_by_name(records, nominal):
    blind = dataclasses.replace(records[1], lab=())
    with pytest.raises(CalibrationError, match=rf"batch '{records[1].batch_id}': no lab VCD or titer result"):
        calibrate([records[0], blind], nominal, settings=FAST, cross_validate=False)


def test_settings_name_an_unknown_parameter():
    with pytest.raises(ValueError, match="culture.growth.mu_maximum"):
        CalibrationSettings(parameters=("culture.growth.mu_maximum",))


def test_calibrate_command_writes_a_parameter_file_with_provenance_and_a_report(records, tmp_path):
    directories = [write_batch_directory(record, tmp_path / "records" / record.batch_id) for record in records[:3]]
    settings = tmp_path / "calibration.yaml"
    settings.write_text(yaml.safe_dump(FAST.model_dump(mode="json", include={"parameters", "step_h", "rk4_substeps"})))
    output = tmp_path / "site" / "cho_site.yaml"
    command = [sys.executable, "-m", "bioreactor_mpc", "calibrate", str(tmp_path / "records"), "--output", str(output), "--settings", str(settings)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "calibrating on 3 batches" in done.stdout and "reduced χ²" in done.stdout
    calibrated = CultureParameters.from_yaml(output)
    provenance = calibrated.provenance
    assert provenance is not None
    assert dict(provenance.inputs)[str(directories[0] / "lab.csv")] == sha256_of(directories[0] / "lab.csv")
    assert set(provenance.parameters) == set(FAST.parameters)
    assert {"vcd_1e6_per_ml_calibrated", "vcd_1e6_per_ml_nominal"} <= set(provenance.cross_validation)
    assert math.isfinite(provenance.fit_statistics["reduced_chi2"])
    # How it was fitted, whole: the settings file's choices and the defaults it left, as a settings file that fits the same way again.
    assert provenance.tool_version == tool_version() and provenance.tool_version
    ran_with = CalibrationSettings.model_validate(provenance.settings)
    assert ran_with == CalibrationSettings(parameters=FAST.parameters, step_h=FAST.step_h, rk4_substeps=FAST.rk4_substeps)
    assert ran_with.prior_log_sd == CalibrationSettings().prior_log_sd and ran_with.phases == CalibrationSettings().phases
    assert calibrated.growth.mu_max_per_h == pytest.approx(0.8 * 0.05, rel=0.08)
    report = tmp_path / "site" / "cho_site-report"
    text = (report / "report.md").read_text()
    assert "## Cross-validation" in text and "## Operating envelope" in text
    assert f"bioreactor-mpc calibrate {tool_version()}" in text
    assert "## Settings" in text and "step_h:" in text and "prior_log_sd" not in text  # what the file changed, not the defaults it left
    for record in records[:3]:
        assert (report / f"{record.batch_id}.png").read_bytes().startswith(b"\x89PNG")
    assert (report / "fit.csv").read_text().count("\n") > 100
    # A second run does not overwrite the reviewed file without --force.
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 2 and f"{output} exists" in again.stderr
    # --strict: a fit with review warnings (here: no cross-validation) exits 1, and still writes the file for the review.
    output.unlink()
    strict = subprocess.run([*command, "--no-cross-validation", "--strict"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "cross-validation was not run" in strict.stdout and output.exists()


def test_calibrate_command_names_the_file_row_and_column_of_bad_input(records, tmp_path):
    directory = write_batch_directory(records[0], tmp_path / records[0].batch_id)
    lab = directory / "lab.csv"
    lines = lab.read_text().splitlines()
    lines[0] = lines[0].replace("glucose_g_per_l", "glucose_mm")
    lab.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "bioreactor_mpc", "calibrate", str(directory), "--output", str(tmp_path / "out.yaml")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert str(lab) in done.stderr and "glucose_mm" in done.stderr and "glucose_g_per_l" in done.stderr
    assert not (tmp_path / "out.yaml").exists()


def _with_online(record: BatchRecord, **changes: np.ndarray | None) -> BatchRecord:
    values = {name: series for name, series in record.online.values.items() if changes.get(name, series) is not None}
    values.update({name: series for name, series in changes.items() if series is not None})
    return dataclasses.replace(record, online=dataclasses.replace(record.online, values=values))


def _records_of_a_line(nominal: CultureParameters, tmp_path: Path, changes: dict[str, float], seed: int) -> list[BatchRecord]:
    """Four process-development batches (other temperature shifts among them) of a CHO line whose kinetics differ by ``changes``."""
    model_file = tmp_path / f"line_{seed}.yaml"
    model_file.write_text(yaml.safe_dump(replaced_parameters(nominal, changes).model_dump(mode="json", exclude={"provenance", "envelope"})))
    records = development_batches(load_simulation(REPO / "configs" / "simulate" / "platform.yaml", seed=seed, model=model_file), 4, seed)
    assert len({r.batch.recipe.temperature_shifted_degc for r in records}) > 1  # the records saw more than one temperature
    return records


SENSITIVITY = "culture.product.temperature_sensitivity_per_degc"


def test_a_temperature_effect_of_the_other_sign_is_learned(nominal, tmp_path):
    """A line whose productivity falls when cold (the nominal kinetics say it rises ×1.6 at 33 °C): the default fit learns the sign.

    The sensitivity is fitted additively and may be negative; the opt-in correction is the same function of ΔT and learns
    the same line. (As a multiplier, the sensitivity could only fall towards 0, which it reached infinitely far away: the
    fit called it not identifiable and put the nominal back.)
    """
    shifted = _records_of_a_line(nominal, tmp_path, {"correction.product_temperature_per_degc": 0.3}, 71)  # net exp(+0.165 ΔT): warmer makes more
    fits = {
        kind: calibrate(shifted, nominal, settings=FAST.model_copy(update={"parameters": ("culture.product.q_product_pg_per_cell_day", name)}), cross_validate=False)
        for kind, name in (("sensitivity", SENSITIVITY), ("correction", "culture.correction.product_temperature_per_degc"))
    }
    net = nominal.product.temperature_sensitivity_per_degc - 0.3
    learned = fits["sensitivity"].estimates[SENSITIVITY]
    assert learned.identifiable and learned.ci95_low is not None and learned.ci95_high is not None
    assert learned.ci95_low <= net <= learned.ci95_high < 0.0
    assert not any("holds 0" in w for w in fits["sensitivity"].warnings)  # the records say which way: no warning
    assert fits["sensitivity"].parameters.product.temperature_sensitivity_per_degc == pytest.approx(learned.value)
    correction = fits["correction"].estimates["culture.correction.product_temperature_per_degc"]
    assert correction.nominal == 0.0 and correction.identifiable
    assert correction.ci95_low is not None and correction.ci95_high is not None and correction.ci95_low <= 0.3 <= correction.ci95_high
    assert fits["correction"].parameters.correction.product_temperature_per_degc == pytest.approx(correction.value)
    titer = {kind: fit.fit_statistics["rel_rmse_titer_g_per_l"] for kind, fit in fits.items()}
    assert titer["sensitivity"] == pytest.approx(titer["correction"], rel=0.1)
    assert titer["sensitivity"] < 0.5 * fits["sensitivity"].fit_statistics["rel_rmse_titer_g_per_l_nominal"]


def test_records_showing_no_temperature_effect_give_no_effect_not_the_nominal(nominal, tmp_path):
    """Records of a line whose productivity does not change with temperature: the fit says 0, identifiably, and the report says how much was added.

    As a multiplier, 0 was ln 0 away: the interval was infinite, the parameter "not identifiable", and the nominal ×1.6 at
    33 °C that these records contradict went back into the model (the ``amino_acid`` and ``biovolume`` plants, 7 Dec 2026).
    """
    flat = _records_of_a_line(nominal, tmp_path, {"product.temperature_sensitivity_per_degc": 0.0}, 72)
    result = calibrate(flat, nominal, settings=FAST.model_copy(update={"parameters": ("culture.product.q_product_pg_per_cell_day", SENSITIVITY)}), cross_validate=False)
    assert result.not_identifiable == ()
    learned = result.estimates[SENSITIVITY]
    assert learned.ci95_low is not None and learned.ci95_high is not None and learned.ci95_low <= 0.0 <= learned.ci95_high
    assert abs(learned.value) < 0.03 and learned.ci95_high - learned.ci95_low < 0.1
    warning = next(w for w in result.warnings if w.startswith("product.temperature_sensitivity_per_degc is "))
    assert "holds 0" in warning and "nor which way" in warning  # the sign of the effect is not known either
    from bioreactor_mpc.calibrate_cli import change

    assert change(SENSITIVITY, learned) == f"{learned.value - 0.135:+.4g}"  # an amount added, not a factor


def test_a_fit_at_its_edge_or_unfinished_says_so(nominal, tmp_path):
    """A line whose productivity falls steeply when cooled (s = −0.5): the fit reaches −0.325 (nominal 0.135 − 2.3 × 0.2) and
    no further. Its interval there is not a 95 % interval, and the review says so; a fit cut short says that too."""
    steep = _records_of_a_line(nominal, tmp_path, {"product.temperature_sensitivity_per_degc": -0.5}, 74)
    settings = FAST.model_copy(update={"parameters": ("culture.product.q_product_pg_per_cell_day", SENSITIVITY)})
    result = calibrate(steep, nominal, settings=settings, cross_validate=False)
    assert result.estimates[SENSITIVITY].value == pytest.approx(0.135 - 2.3 * 0.2)
    assert any(w.startswith("product.temperature_sensitivity_per_degc ended at the edge of what the fit allows (-0.325") for w in result.warnings)
    assert not any("ended at the edge" in w and "q_product" in w for w in result.warnings)
    unfinished = calibrate(steep, nominal, settings=settings.model_copy(update={"max_iterations": 1}), cross_validate=False)
    assert any(w.startswith("the fit stopped after max_iterations (1) without converging") for w in unfinished.warnings)
    assert not any("without converging" in w for w in result.warnings)


def test_the_corrections_settings_file_names_the_opt_in_set():
    settings = CalibrationSettings.model_validate(yaml.safe_load((REPO / "configs" / "calibration" / "corrections.yaml").read_text()))
    assert settings.parameters == WITH_CORRECTIONS
    assert {name for name in WITH_CORRECTIONS if name.startswith("culture.correction.")} == {f"culture.correction.{n}" for n in CorrectionParameters.model_fields}
    assert "culture.product.temperature_sensitivity_per_degc" not in WITH_CORRECTIONS  # exactly confounded with the productivity's temperature slope


def test_a_correction_is_calibrated_not_estimated_nor_scaled(nominal):
    """A correction is zero in the model and of either sign: no log multiplier can move it, so the estimator and a factor refuse it by name."""
    from controller.estimator import EstimatedParameter

    with pytest.raises(ValueError, match="culture.correction.product_age.*is a correction"):
        EstimatedParameter(name="culture.correction.product_age", prior_log_sd=0.3, random_walk_log_sd_per_sqrt_h=0.01)
    with pytest.raises(ValueError, match="product.temperature_sensitivity_per_degc.*is a temperature sensitivity.*no multiplier to estimate"):
        EstimatedParameter(name=SENSITIVITY, prior_log_sd=0.3, random_walk_log_sd_per_sqrt_h=0.01)
    with pytest.raises(ValueError, match="correction.product_age.*is zero"):
        scaled_parameters(nominal, {"correction.product_age": 1.5})
    # The report shows what calibration did to a correction: the amount added, also when the file it started from had one.
    from bioreactor_mpc.calibrate_cli import change

    started_from = ParameterEstimate(nominal=-0.13, value=0.04, ci95_low=0.03, ci95_high=0.05, identifiable=True)
    assert change("culture.correction.growth_temperature_per_degc", started_from) == "+0.17"
    assert change("culture.growth.mu_max_per_h", ParameterEstimate(nominal=0.05, value=0.04, ci95_low=0.035, ci95_high=0.045, identifiable=True)) == "×0.800"


def test_a_fit_stays_inside_what_the_parameter_file_allows(records, nominal):
    """A lactate yield above 1 g/g would be a file the runtime refuses to load: the fit's bounds are the schema's, narrowed from ±bound."""
    assert parameter_bounds("culture.metabolism.lactate_yield_from_glucose_g_per_g") == (0.0, 1.0)
    assert parameter_bounds("culture.correction.product_age") == (-3.0, 3.0)
    low, high = parameter_bounds("culture.growth.mu_max_per_h")  # gt=0, le=0.2
    assert 0.0 < low < 1e-300 and high == 0.2
    with pytest.raises(KeyError, match="culture.growth.mu_maximum"):
        parameter_bounds("culture.growth.mu_maximum")
    # Lab titers ×20: the data ask for a specific productivity of about 400 pg/(cell·day). The multiplier bound e^±5 would
    # allow ×148 of the nominal 20; the schema allows 200, and the file the fit writes must load.
    name = "culture.product.q_product_pg_per_cell_day"
    assert parameter_bounds(name) == (0.0, 200.0)
    inflated = [
        dataclasses.replace(r, lab=tuple(dataclasses.replace(s, values={**s.values, "titer_g_per_l": 20.0 * s.values["titer_g_per_l"]}) for s in r.lab)) for r in records[:2]
    ]
    result = calibrate(inflated, nominal, settings=FAST.model_copy(update={"parameters": (name,), "log_multiplier_bound": 5.0}), cross_validate=False)
    assert result.estimates[name].value == pytest.approx(200.0)
    assert result.parameters.product.q_product_pg_per_cell_day == pytest.approx(200.0)


def test_one_batch_fits_and_says_it_was_not_cross_validated(records, nominal):
    result = calibrate([records[0]], nominal, settings=FAST, cross_validate=True)
    assert result.cross_validation == {}
    assert any("cross-validation needs at least 3 batches (1 given)" in w for w in result.warnings)
    assert result.parameters.provenance is not None and result.parameters.provenance.warnings == result.warnings


def test_probe_factors_without_probe_data_are_not_identifiable(records, nominal):
    """No capacitance or OUR recorded: nothing informs the probe factors, and they must not come out with a zero-width interval."""
    blind = [_with_online(r, capacitance_pf_per_cm=None, our_mmol_per_l_h=None) for r in records[:2]]
    settings = FAST.model_copy(
        update={
            "parameters": ("culture.growth.mu_max_per_h", "culture.measurement.capacitance_pf_per_cm_per_1e6_cells_ml", "culture.measurement.o2_maintenance_mmol_per_1e9_cells_h")
        }
    )
    result = calibrate(blind, nominal, settings=settings, cross_validate=False)
    assert set(result.not_identifiable) == {"culture.measurement.capacitance_pf_per_cm_per_1e6_cells_ml", "culture.measurement.o2_maintenance_mmol_per_1e9_cells_h"}
    assert result.estimates["culture.measurement.capacitance_pf_per_cm_per_1e6_cells_ml"].ci95_low is None
    assert result.estimates["culture.growth.mu_max_per_h"].identifiable


def test_a_totaliser_reset_does_not_remove_feed(records):
    record = records[0]
    total = record.online.signal("feed_total_l").copy()
    after = record.online.time_h >= 200.0
    reset = total.copy()
    reset[after] -= total[after][0]  # the counter restarts from zero at 200 h
    grid, inputs = delivered_grid(record, 1.0)
    grid_reset, inputs_reset = delivered_grid(_with_online(record, feed_total_l=reset), 1.0)
    delivered = float(np.sum(inputs[:-1, 0] * np.diff(grid)))
    delivered_reset = float(np.sum(inputs_reset[:-1, 0] * np.diff(grid_reset)))
    hourly = float(np.max(inputs[:, 0]))
    assert delivered - hourly <= delivered_reset <= delivered  # at most the hour across the reset is lost


def test_records_that_would_mislead_the_fit_are_refused_by_batch_and_field(records, nominal):
    small = records[0].batch.model_copy(update={"inoculation": records[0].batch.inoculation.model_copy(update={"volume_l": 700.0})})
    with pytest.raises(CalibrationError, match=r"inoculation.volume_l is 700 L but the online volume .* reads 1[34]\d\d"):
        check_records([dataclasses.replace(records[0], batch=small)])
    fraction = records[0].batch.model_copy(update={"inoculation": records[0].batch.inoculation.model_copy(update={"viability_pct": 0.97})})
    with pytest.raises(CalibrationError, match=r"inoculation.viability_pct is 0.97 % but the lab measured 9\d"):
        check_records([dataclasses.replace(records[0], batch=fraction)])
    twice = dataclasses.replace(records[0], batch_id="COPY-OF-1")
    with pytest.raises(CalibrationError, match=rf"'COPY-OF-1'.* the same online data as batch '{records[0].batch_id}'"):
        check_records([records[0], twice])
    doubled = dataclasses.replace(records[1], lab=(*records[1].lab, records[1].lab[3]))
    with pytest.raises(CalibrationError, match=r"drawn at the same time twice"):
        check_records([doubled])


def test_a_crashed_batch_among_healthy_ones_is_flagged_for_review(records, nominal):
    crashed_lab = tuple(
        dataclasses.replace(
            sample,
            values={
                **sample.values,
                "vcd_1e6_per_ml": sample.values["vcd_1e6_per_ml"] * (0.15 if sample.draw_h > 100 else 1.0),
                "viability_pct": 20.0 if sample.draw_h > 100 else sample.values["viability_pct"],
            },
        )
        for sample in records[3].lab
    )
    crashed = dataclasses.replace(records[3], lab=crashed_lab)
    result = calibrate([*records[:3], crashed], nominal, settings=FAST, cross_validate=False)
    flagged = " ".join(result.warnings)
    assert f"batch {crashed.batch_id} fits far worse than the others" in flagged
    assert f"batch {crashed.batch_id}: lab viability fell to 20 %" in flagged
    assert all(records[i].batch_id not in flagged for i in range(3))
