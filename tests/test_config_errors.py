"""Bad configuration fails at start, naming the file, the field and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bioreactor_mpc.cli import main
from controller.config import BatchConfig
from plant_models.errors import ConfigError
from plant_models.parameters import CultureParameters
from simulator.config import load_simulation

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _edited(tmp_path: Path, source: Path, edit) -> Path:
    data = yaml.safe_load(source.read_text())
    edit(data)
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump(data))
    return path


def test_misspelt_field_names_file_field_and_suggestion(tmp_path):
    def edit(data):
        data["growth"]["mu_max_per_hour"] = data["growth"].pop("mu_max_per_h")

    path = _edited(tmp_path, CONFIGS / "model" / "cho_nominal.yaml", edit)
    with pytest.raises(ConfigError) as caught:
        CultureParameters.from_yaml(path)
    message = str(caught.value)
    assert str(path) in message
    assert "growth.mu_max_per_hour: unknown field; did you mean 'mu_max_per_h'?" in message
    assert "growth.mu_max_per_h: Field required" in message


def test_value_in_wrong_unit_is_caught_by_its_range(tmp_path):
    def edit(data):
        data["equipment"]["temperature_max_degc"] = 311.0  # kelvin written where °C is expected

    path = _edited(tmp_path, CONFIGS / "batch" / "platform.yaml", edit)
    with pytest.raises(ConfigError) as caught:
        BatchConfig.from_yaml(path)
    message = str(caught.value)
    assert f"{path}: equipment.temperature_max_degc: Input should be less than or equal to 40" in message
    assert "highest temperature setpoint [°C]" in message and "got 311.0" in message


def test_unit_suffix_mismatch_is_an_unknown_field(tmp_path):
    def edit(data):
        data["inoculation"]["volume_ml"] = data["inoculation"].pop("volume_l") * 1000

    path = _edited(tmp_path, CONFIGS / "batch" / "platform.yaml", edit)
    with pytest.raises(ConfigError, match=r"inoculation\.volume_ml: unknown field; did you mean 'volume_l'\?"):
        BatchConfig.from_yaml(path)


def test_wrong_type_and_cross_field_checks(tmp_path):
    def edit(data):
        data["cycle_period_h"] = "hourly"
        data["inoculation"].update(osmolality_mosm_per_kg=200.0, glucose_g_per_l=30.0, glutamine_mm=50.0)

    path = _edited(tmp_path, CONFIGS / "batch" / "platform.yaml", edit)
    with pytest.raises(ConfigError) as caught:
        BatchConfig.from_yaml(path)
    message = str(caught.value)
    assert "cycle_period_h: Input should be a valid number" in message
    assert "inoculation.osmolality_mosm_per_kg: must be at least what glucose" in message and "got 200.0" in message and "got {" not in message
    assert "(2 problems)" in message


def test_every_problem_of_a_file_is_listed_with_its_field_and_value(tmp_path):
    def edit(data):
        data["equipment"].update(temperature_min_degc=38.0, temperature_max_degc=32.0)
        data["limits"]["latest_harvest_h"] = float("inf")
        data["economics"]["turnaround_days"] = True

    path = _edited(tmp_path, CONFIGS / "batch" / "platform.yaml", edit)
    with pytest.raises(ConfigError) as caught:
        BatchConfig.from_yaml(path)
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{path}: invalid configuration (3 problems)"
    assert f"  {path}: equipment.temperature_min_degc: must be below temperature_max_degc (32.0); got 38.0" in lines
    assert f"  {path}: limits.latest_harvest_h: Input should be a finite number (expected: the batch ends here at the latest [h]); got inf" in lines
    assert f"  {path}: economics.turnaround_days: must be a number, not true or false; got True" in lines


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("growth:\n  mu_max_per_h: [0.05\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line \d+, column \d+"):
        CultureParameters.from_yaml(path)


def test_missing_file_and_nested_file_errors_name_the_nested_file(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml: configuration file not found"):
        load_simulation(tmp_path / "nowhere.yaml")
    sim = tmp_path / "sim.yaml"
    sim.write_text(yaml.safe_dump({"model": "missing-model.yaml", "batch": str(CONFIGS / "batch" / "platform.yaml")}))
    with pytest.raises(ConfigError, match="missing-model.yaml: configuration file not found"):
        load_simulation(sim)


def test_unknown_fault_kind_and_perturbed_parameter_are_rejected(tmp_path):
    sim = tmp_path / "sim.yaml"
    base = {"model": str(CONFIGS / "model" / "cho_nominal.yaml"), "batch": str(CONFIGS / "batch" / "platform.yaml")}
    sim.write_text(yaml.safe_dump({**base, "faults": [{"kind": "meteor", "start_h": 3}]}))
    with pytest.raises(ConfigError, match=r"faults\.0"):
        load_simulation(sim)
    sim.write_text(yaml.safe_dump({**base, "true_parameter_factors": {"growth.mu_maximum": 1.2}}))
    with pytest.raises(ConfigError, match="'growth.mu_maximum' is not a parameter of plant 'cho'"):
        load_simulation(sim)
    sim.write_text(yaml.safe_dump({**base, "faults": [{"kind": "probe", "tag": "PV.Glucose", "start_h": 3}]}))
    with pytest.raises(ConfigError, match="'PV.Glucose' is not an online signal"):
        load_simulation(sim)


def test_cli_reports_config_error_without_traceback(tmp_path, capsys):
    sim = tmp_path / "sim.yaml"
    sim.write_text(yaml.safe_dump({"model": str(CONFIGS / "model" / "cho_nominal.yaml"), "batch": str(CONFIGS / "batch" / "platform.yaml"), "sed": 4}))
    status = main(["simulate", "--config", str(sim), "--output-dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 2
    assert "error:" in captured.err and "sed: unknown field; did you mean 'seed'?" in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()


def test_schema_command_writes_json_schemas(tmp_path):
    import json

    assert main(["schema", "--output-dir", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "batch.schema.json",
        "culture-parameters.schema.json",
        "io-faults.schema.json",
        "io-map.schema.json",
        "runtime.schema.json",
        "simulation.schema.json",
        "tag-map-modbus.schema.json",
        "tag-map-opcua.schema.json",
    ]
    batch_schema = json.loads((tmp_path / "batch.schema.json").read_text())
    assert batch_schema["additionalProperties"] is False
    assert "max_working_volume_l" in json.dumps(batch_schema)
    assert "batch_id" not in batch_schema.get("required", []), "the batch file is a template: without batch_id the runtime follows the PLC"
