"""How the runtime starts: a new batch, a resumed one, or a running batch without its history (refused unless an engineer signs a take-over)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.advisory import Signer
from controller.estimator import ExtendedKalmanEstimator
from controller.modes import RequestedMode
from controller.ports import ResumeState
from controller.runtime_config import RuntimeSettings
from controller.takeover import RuntimeStartError, StartDeferredError, TakeoverApproval, choose_mode, plan_start
from plant_models.cho import STATE_INDEX, CultureModel
from plant_models.parameters import parameter_vector
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
ENGINEER = TakeoverApproval(Signer("erin", "Erin Engineer", "engineer"), "history disk replaced", "2026-12-06T00:00:00+00:00")


def _resume(mode: str | None) -> ResumeState:
    return ResumeState(batch_id="BR01-DEMO-001", last_cycle_h=80.0, estimator={}, lab_seq=3, harvest_time_h=336.0, requested_mode=mode)


@pytest.mark.parametrize(
    ("configured", "override", "resume", "expected"),
    [
        (RequestedMode.CLOSED_LOOP, None, None, RequestedMode.CLOSED_LOOP),
        (RequestedMode.CLOSED_LOOP, None, _resume("advisory"), RequestedMode.ADVISORY),
        (RequestedMode.CLOSED_LOOP, None, _resume(None), RequestedMode.CLOSED_LOOP),
        (RequestedMode.CLOSED_LOOP, RequestedMode.OFF, _resume("advisory"), RequestedMode.OFF),
    ],
)
def test_an_engineers_mode_outlives_a_restart_unless_the_command_line_says_otherwise(configured, override, resume, expected):
    assert choose_mode(override, resume, configured)[0] is expected


@pytest.fixture(scope="module")
def model() -> CultureModel:
    return CultureModel()


def _plc_at(hours: float):
    loaded = load_simulation(PLATFORM)
    plc, _ = build_simulated_plc(loaded)
    plc.advance_to(hours)  # no runtime: the PLC's watchdog runs its recipe
    return loaded, plc


def _start(loaded, plc, model, **kwargs):
    nominal = parameter_vector(loaded.nominal, loaded.batch.media)
    settings = kwargs.pop("settings", RuntimeSettings())
    return plan_start(readings=plc.snapshot(), batch=loaded.batch, settings=settings, model=model, nominal_parameters=nominal, **kwargs)


def test_a_new_batch_starts_from_the_inoculation_record(model):
    loaded, plc = _plc_at(0.0)
    plan = _start(loaded, plc, model, resume=None)
    assert plan.how == "new batch" and plan.clock.next_cycle_h == 0.0
    assert plan.estimator.estimate.value("volume") == pytest.approx(loaded.batch.inoculation.volume_l)


def test_a_running_batch_without_its_history_is_refused_without_a_signature(model):
    loaded, plc = _plc_at(58.0)
    with pytest.raises(RuntimeStartError, match=r"no record of it.*take-over-as"):
        _start(loaded, plc, model, resume=None)


def test_a_signed_take_over_starts_now_from_the_readings_and_the_latest_lab_result(model):
    loaded, plc = _plc_at(58.0)
    plan = _start(loaded, plc, model, resume=None, takeover=ENGINEER)
    truth = plc.plant.state
    estimate = plan.estimator.estimate
    assert plan.how == "taken over" and plan.taken_over_at_h == pytest.approx(58.0)
    assert plan.clock.next_cycle_h == pytest.approx(58.0)  # the first cycle runs now
    assert plan.estimator.process_time_h == pytest.approx(58.0)
    assert plan.lab_seq == plc.snapshot()["Sample.Seq"].value >= 2
    # Never from inoculation: the volume and cells are today's, within the widened uncertainty.
    for state in ("viable_cells", "volume", "titer"):
        error = abs(estimate.value(state) - truth[STATE_INDEX[state]])
        assert error <= 3.0 * estimate.sd(state), (state, estimate.value(state), truth[STATE_INDEX[state]], estimate.sd(state))
    assert estimate.value("viable_cells") > 3.0 * loaded.batch.inoculation.viable_cell_density_1e6_per_ml


def test_a_take_over_needs_a_lab_result_at_the_plc(model):
    loaded, plc = _plc_at(3.0)  # past the fresh-start window, before the first lab result is published
    with pytest.raises(RuntimeStartError, match="needs a lab result"):
        _start(loaded, plc, model, resume=None, takeover=ENGINEER)


def test_a_history_ahead_of_the_plc_clock_is_refused(model):
    loaded, plc = _plc_at(5.0)
    estimator = ExtendedKalmanEstimator.from_batch(model, loaded.batch, parameter_vector(loaded.nominal, loaded.batch.media))
    resume = ResumeState(loaded.batch.batch_id, 80.0, estimator.to_dict(), 3, 336.0)
    with pytest.raises(RuntimeStartError, match="up to 80.00 h"):
        _start(loaded, plc, model, resume=resume)


def test_a_resumed_estimator_filters_with_the_settings_the_runtime_was_started_with(model):
    loaded, plc = _plc_at(6.0)
    nominal = parameter_vector(loaded.nominal, loaded.batch.media)
    saved = ExtendedKalmanEstimator.from_batch(model, loaded.batch, nominal)
    resume = ResumeState(loaded.batch.batch_id, 5.0, saved.to_dict(), 0, 336.0)
    settings = RuntimeSettings.model_validate({"estimator": {"online_noise": {"volume_l": 9.0}}})
    changed_nominal = nominal * 1.01
    plan = plan_start(readings=plc.snapshot(), batch=loaded.batch, settings=settings, model=model, nominal_parameters=changed_nominal, resume=resume)
    assert plan.how == "resumed" and plan.clock.next_cycle_h == 6.0
    assert plan.estimator.config == settings.estimator  # not the saved one
    assert np.allclose(plan.estimator.to_dict()["nominal_parameters"], changed_nominal)
    assert plan.estimator.estimate.value("volume") == pytest.approx(saved.estimate.value("volume"))


def test_the_wrong_batch_is_refused(model):
    loaded, plc = _plc_at(0.0)
    other = loaded.batch.model_copy(update={"batch_id": "SOMETHING-ELSE"})
    with pytest.raises(RuntimeStartError, match="configured for 'SOMETHING-ELSE'"):
        plan_start(
            readings=plc.snapshot(), batch=other, settings=RuntimeSettings(), model=model, nominal_parameters=parameter_vector(loaded.nominal, loaded.batch.media), resume=None
        )


def _with(plc, **changes: dict[str, Any]) -> dict[str, Any]:
    scan = plc.snapshot()
    for name, fields in changes.items():
        scan[name.replace("_", ".", 1)] = dataclasses.replace(scan[name.replace("_", ".", 1)], **fields)
    return scan


def test_a_first_scan_without_a_good_phase_or_clock_defers_the_start_instead_of_starting_from_inoculation(model):
    loaded, plc = _plc_at(200.0)
    nominal = parameter_vector(loaded.nominal, loaded.batch.media)
    for scan in (_with(plc, Status_Phase={"good": False}), _with(plc, Status_ProcessTime={"good": False}), _with(plc, Status_BatchId={"good": False})):
        with pytest.raises(StartDeferredError):
            plan_start(readings=scan, batch=loaded.batch, settings=RuntimeSettings(), model=model, nominal_parameters=nominal, resume=None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"Sample_TakenAt": {"value": 20.0}}, "drawn within 36 h"),
        ({"Sample_TakenAt": {"good": False}}, "drawn within 36 h"),
        ({"Sample_Viability": {"value": 0.9}}, "viability_pct 0.9 outside"),
        ({"Sample_VCD": {"value": 1.5e7}}, "vcd_1e6_per_ml"),
        ({"Sample_Titer": {"value": 2500.0}}, "titer_g_per_l"),
        ({"PV_Volume": {"value": 1.7}}, "PV.Volume 1.7 outside"),
        ({"PV_Volume": {"value": 1900.0}}, "above the balance"),
    ],
)
def test_a_take_over_refuses_stale_or_implausible_readings(model, changes, message):
    loaded, plc = _plc_at(200.0)
    scan = _with(plc, **changes)
    with pytest.raises(RuntimeStartError, match=message):
        plan_start(
            readings=scan,
            batch=loaded.batch,
            settings=RuntimeSettings(),
            model=model,
            nominal_parameters=parameter_vector(loaded.nominal, loaded.batch.media),
            resume=None,
            takeover=ENGINEER,
        )


def test_a_restart_during_a_fault_hand_over_does_not_send_the_withheld_heartbeat(model):
    loaded, plc = _plc_at(6.5)
    nominal = parameter_vector(loaded.nominal, loaded.batch.media)
    saved = ExtendedKalmanEstimator.from_batch(model, loaded.batch, nominal)
    settings = RuntimeSettings()
    for fault_cycles, beat in ((0, True), (settings.fault_hand_over_cycles, False)):
        resume = ResumeState(loaded.batch.batch_id, 6.0, saved.to_dict(), 0, 336.0, fault_cycles=fault_cycles)
        plan = plan_start(readings=plc.snapshot(), batch=loaded.batch, settings=settings, model=model, nominal_parameters=nominal, resume=resume)
        assert plan.beat_now is beat and plan.fault_cycles == fault_cycles
