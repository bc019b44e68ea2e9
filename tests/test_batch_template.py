"""The batch file as a process template: pinned to a batch with ``batch_id``, following the PLC without; and what a new batch must match."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.config import ANY_BATCH_ID, BatchConfig, BatchTemplate
from controller.runtime_config import RuntimeSettings, load_runtime_config
from controller.takeover import BatchRefusedError, plan_start
from plant_models.cho import CultureModel
from plant_models.errors import ConfigError
from plant_models.parameters import parameter_vector
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.plc import PHASE_HARVESTED, PHASE_RUNNING

REPO = Path(__file__).resolve().parent.parent
PLATFORM_BATCH = REPO / "configs" / "batch" / "platform.yaml"
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"


def _template_data() -> dict[str, Any]:
    data = yaml.safe_load(PLATFORM_BATCH.read_text())
    del data["batch_id"]
    return data


def test_a_batch_file_with_a_batch_id_is_pinned_to_it_and_loads_as_before():
    template = BatchTemplate.from_yaml(PLATFORM_BATCH)
    assert template.pinned and template.batch_id == "BR01-DEMO-001"
    assert template.for_batch() == BatchConfig.from_yaml(PLATFORM_BATCH)


def test_a_template_names_no_batch_and_becomes_any_batch_of_the_plc(tmp_path):
    template = BatchTemplate.model_validate(_template_data())
    assert not template.pinned and template.batch_id is None
    batch = template.for_batch("BR01-B0042")
    assert isinstance(batch, BatchConfig) and batch.batch_id == "BR01-B0042"
    assert batch.model_dump(exclude={"batch_id"}) == template.model_dump(exclude={"batch_id"})
    assert template.for_batch().batch_id == ANY_BATCH_ID  # what depends on no batch (the MPC's problem)
    # One batch's config still needs its id: the history's runs and the simulator name their batch.
    path = tmp_path / "template.yaml"
    path.write_text(yaml.safe_dump(_template_data()))
    with pytest.raises(ConfigError, match="batch_id"):
        BatchConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("batch_id", "problem"),
    [("", "empty"), ("BR01-" + "X" * 12, "17 characters"), ("BR01-Ä", "ASCII"), ("A\nbatch_id: B", "control characters"), ("BR01\t7", "control characters"), (" BR01-7", "space")],
)
def test_a_plc_batch_id_the_plc_could_not_hold_is_not_a_batch(batch_id, problem):
    with pytest.raises(ValueError, match=problem):
        BatchTemplate.model_validate(_template_data()).for_batch(batch_id)


def test_a_batch_file_pinned_to_an_id_with_a_line_break_is_refused_by_name():
    """An id with a line break would forge a line wherever it is written (the proposed batch file's header, logs)."""
    with pytest.raises(ValueError, match="batch_id.*control characters"):
        BatchTemplate.model_validate({**_template_data(), "batch_id": "A\nbatch_id: B"})


def test_a_runtime_config_naming_a_template_follows_the_plc(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "runtime" / "reference-opcua.yaml").read_text())
    for key in ("tag_map", "model"):
        config[key] = str((REPO / "configs" / "runtime" / config[key]).resolve())
    (tmp_path / "template.yaml").write_text(yaml.safe_dump(_template_data()))
    config["batch"] = "template.yaml"
    (tmp_path / "runtime.yaml").write_text(yaml.safe_dump(config))
    loaded = load_runtime_config(tmp_path / "runtime.yaml")
    assert not loaded.template.pinned
    assert loaded.batch.batch_id == ANY_BATCH_ID and loaded.batch.inoculation == loaded.template.inoculation


# ---------------------------------------------------------------- a new batch against the template


@pytest.fixture(scope="module")
def model() -> CultureModel:
    return CultureModel()


def _plan(model: CultureModel, *, inoculation_volume_l: float | None = None, after_a_batch: bool = False):
    """A simulated PLC's first scan of a batch, and the start plan of a runtime following the PLC with the platform template."""
    loaded = load_simulation(PLATFORM)
    inoculation = loaded.batch.inoculation.model_copy(update={"volume_l": inoculation_volume_l or loaded.batch.inoculation.volume_l})
    batch_at_plc = loaded.batch.model_copy(update={"inoculation": inoculation})
    if after_a_batch:  # a first batch run to day 2.5 (lab results published), harvested, then the next one inoculated
        plc, _ = build_simulated_plc(loaded)
        plc.advance_to(60.0)
        plc.write_heartbeat(1)  # a runtime's heartbeat: remote enabled again, so the harvest request is accepted
        plc.request_harvest(True)
        assert plc.phase == PHASE_HARVESTED and plc.snapshot()["Sample.Seq"].value >= 1
        plc.next_batch(batch_at_plc.model_copy(update={"batch_id": "BR01-NEXT"}))
    else:
        plc, _ = build_simulated_plc(loaded.model_copy(update={"batch": batch_at_plc}))
    readings = plc.snapshot()
    template = BatchTemplate.model_validate(_template_data())
    batch = template.for_batch(str(readings["Status.BatchId"].value))
    nominal = parameter_vector(loaded.nominal, template.media)
    return plc, plan_start(readings=readings, batch=batch, settings=RuntimeSettings(), model=model, nominal_parameters=nominal, resume=None, follows_plc=True)


def test_a_new_batch_matching_the_template_starts_from_its_inoculation_record(model):
    _, plan = _plan(model)
    assert plan.how == "new batch" and plan.lab_seq == 0
    assert plan.estimator.estimate.value("volume") == pytest.approx(1400.0)


def test_a_new_batch_whose_volume_at_inoculation_contradicts_the_template_is_refused_saying_why(model):
    with pytest.raises(BatchRefusedError, match=r"does not match the batch template: PV.Volume reads 10\d\d\.\d L.*inoculation.volume_l \(1400 L\)"):
        _plan(model, inoculation_volume_l=1050.0)


def test_a_volume_within_the_balances_tolerance_is_the_templates_batch(model):
    _, plan = _plan(model, inoculation_volume_l=1390.0)  # 10 L off: the load cell's accuracy, not another process
    assert plan.how == "new batch"


def test_the_lab_result_the_plc_holds_at_inoculation_is_the_previous_batchs(model):
    plc, plan = _plan(model, after_a_batch=True)
    readings = plc.snapshot()
    assert readings["Status.BatchId"].value == "BR01-NEXT" and readings["Status.Phase"].value == PHASE_RUNNING and readings["Status.ProcessTime"].value == 0.0
    assert plan.how == "new batch" and plan.lab_seq == readings["Sample.Seq"].value >= 1  # not new to the new batch's estimator
    assert not readings["Sample.VCD"].good and math.isnan(float(readings["Sample.VCD"].value))  # the new batch has no result yet
