"""Bad configs fail at load with one clear error naming the file, the field path, the value and what was expected.

Each case starts from a shipped config and changes one thing (issue 11: a probe of
74 bad configs, 30 of which were accepted or ended in a traceback). The shipped
configs themselves must all still load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml

from controller.calibration import CalibrationSettings
from controller.config import BatchConfig
from controller.modes import RequestedMode
from controller.quality import DataQualityConfig
from controller.runtime_config import load_runtime_config
from interfaces.tagmap import load_tag_map
from plant_models.config_loading import load_yaml_model, read_yaml_mapping
from plant_models.errors import ConfigError
from plant_models.parameters import CultureParameters
from simulator.config import load_simulation
from simulator.io_map import load_io_map

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

Path_ = tuple[str, ...]


def _set(data: dict[str, Any], path: Path_, value: Any) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


def _runtime_data(tmp_path: Path, source: str = "reference-opcua.yaml") -> dict[str, Any]:
    """A shipped runtime config with its paths made absolute, so it can be written anywhere."""
    origin = CONFIGS / "runtime" / source
    data = yaml.safe_load(origin.read_text())
    for key in ("tag_map", "batch", "model"):
        data[key] = str((origin.parent / data[key]).resolve())
    data["history"] = str(tmp_path / "history.sqlite")
    return data


def _simulation_data() -> dict[str, Any]:
    origin = CONFIGS / "simulate" / "platform.yaml"
    data = yaml.safe_load(origin.read_text())
    for key in ("batch", "model"):
        data[key] = str((origin.parent / data[key]).resolve())
    return data


SOURCES: dict[str, tuple[Callable[[Path], dict[str, Any]], Callable[[Path], object]]] = {
    "batch": (lambda tmp: yaml.safe_load((CONFIGS / "batch" / "platform.yaml").read_text()), BatchConfig.from_yaml),
    "model": (lambda tmp: yaml.safe_load((CONFIGS / "model" / "cho_nominal.yaml").read_text()), CultureParameters.from_yaml),
    "runtime": (_runtime_data, load_runtime_config),
    "simulation": (lambda tmp: _simulation_data(), load_simulation),
    "opcua": (lambda tmp: yaml.safe_load((CONFIGS / "plc" / "reference-opcua.yaml").read_text()), load_tag_map),
    "modbus": (lambda tmp: yaml.safe_load((CONFIGS / "plc" / "reference-modbus.yaml").read_text()), load_tag_map),
}

INF, NAN = float("inf"), float("nan")

# (source, {field path: new value}, fragments the error must contain besides the file name)
CASES: list[tuple[str, dict[Path_, Any], list[str]]] = [
    # inverted limits
    (
        "batch",
        {("equipment", "temperature_min_degc"): 38.0, ("equipment", "temperature_max_degc"): 32.0},
        ["equipment.temperature_min_degc", "got 38.0", "below temperature_max_degc (32.0)"],
    ),
    ("runtime", {("nmpc", "mpc", "glucose_min_g_per_l"): 9.0}, ["nmpc.mpc.glucose_min_g_per_l", "got 9.0", "below nmpc.mpc.glucose_max_g_per_l (8.0)"]),
    (
        "runtime",
        {("quality", "signals", "PV.Temperature", "low"): 40.0, ("quality", "signals", "PV.Temperature", "high"): 30.0},
        ["quality.signals.PV.Temperature.low", "got 40.0", "high (30.0)"],
    ),
    ("runtime", {("reconnect_initial_s",): 20.0, ("reconnect_max_s",): 10.0}, ["reconnect_initial_s", "got 20.0", "reconnect_max_s (10.0)"]),
    ("simulation", {("faults",): [{"kind": "probe", "tag": "PV.OUR", "start_h": 50.0, "end_h": 40.0}]}, ["faults.0.probe.end_h", "got 40.0", "start_h (50.0)"]),
    ("simulation", {("faults",): [{"kind": "operator_local", "start_h": 50.0, "end_h": 10.0}]}, ["faults.0.operator_local.end_h", "got 10.0", "start_h (50.0)"]),
    # nan and inf
    ("batch", {("equipment", "feed_rate_max_lph"): INF}, ["equipment.feed_rate_max_lph", "finite number", "got inf"]),
    ("batch", {("equipment", "max_working_volume_l"): INF}, ["equipment.max_working_volume_l", "finite number", "got inf"]),
    ("batch", {("limits", "latest_harvest_h"): INF}, ["limits.latest_harvest_h", "finite number", "got inf"]),
    ("batch", {("recipe", "feed_start_h"): NAN}, ["recipe.feed_start_h", "finite number", "got nan"]),
    ("model", {("growth", "k_glucose_g_per_l"): INF}, ["growth.k_glucose_g_per_l", "finite number", "got inf"]),
    ("runtime", {("quality", "stale_after_s"): INF}, ["quality.stale_after_s", "finite number", "got inf"]),
    ("runtime", {("estimator", "online_noise", "volume_l"): INF}, ["estimator.online_noise.volume_l", "finite number", "got inf"]),
    ("simulation", {("sampling", "interval_h"): INF}, ["sampling.interval_h", "finite number", "got inf"]),
    ("simulation", {("true_parameter_factors",): {"growth.mu_max_per_h": NAN}}, ["true_parameter_factors.growth.mu_max_per_h", "finite number", "got nan"]),
    ("opcua", {("tags", "PV.OUR", "scale"): NAN}, ["tags.PV.OUR.scale", "finite number", "got nan"]),
    ("modbus", {("tags", "PV.OUR", "offset"): INF}, ["tags.PV.OUR.offset", "finite number", "got inf"]),
    # the control cycle
    ("batch", {("cycle_period_h",): 1e-9}, ["cycle_period_h", "got 1e-09", "at least one minute"]),
    ("batch", {("cycle_period_h",): 0.7}, ["cycle_period_h", "got 0.7", "divides a day"]),
    ("batch", {("cycle_period_h",): 0.11}, ["cycle_period_h", "got 0.11", "whole number of minutes"]),
    # the recipe outside the equipment or the limits
    ("batch", {("recipe", "temperature_initial_degc"): 39.0}, ["recipe.temperature_initial_degc", "got 39.0", "[30.0, 38.0]"]),
    ("batch", {("recipe", "temperature_shifted_degc"): 30.5, ("equipment", "temperature_min_degc"): 31.0}, ["recipe.temperature_shifted_degc", "got 30.5", "[31.0, 38.0]"]),
    (
        "batch",
        {("recipe", "feed_fraction_of_initial_volume_per_day"): 0.2},
        ["recipe.feed_fraction_of_initial_volume_per_day", "got 0.2", "11.7 L/h", "equipment.feed_rate_max_lph (10.0 L/h)"],
    ),
    ("batch", {("recipe", "harvest_h"): 400.0}, ["recipe.harvest_h", "got 400.0", "limits.latest_harvest_h (360.0)"]),
    ("batch", {("recipe", "glucose_target_g_per_l"): 0.4}, ["recipe.glucose_target_g_per_l", "got 0.4", "limits.glucose_min_g_per_l (0.5)"]),
    ("batch", {("recipe", "feed_stop_below_max_l"): 700.0}, ["recipe.feed_stop_below_max_l", "got 700.0", "600"]),
    ("batch", {("limits", "osmolality_max_mosm_per_kg"): 290.0}, ["limits.osmolality_max_mosm_per_kg", "got 290.0", "inoculation.osmolality_mosm_per_kg (300.0)"]),
    ("batch", {("limits", "latest_harvest_h"): 0.5}, ["limits.latest_harvest_h", "got 0.5", "cycle_period_h"]),
    # the runtime's settings against its batch
    ("runtime", {("nmpc", "initial_harvest_h"): -5.0}, ["nmpc.initial_harvest_h", "got -5.0", "greater than 0"]),
    ("runtime", {("nmpc", "initial_harvest_h"): 400.0}, ["nmpc.initial_harvest_h", "got 400.0", "limits.latest_harvest_h (360.0"]),
    ("runtime", {("nmpc", "mpc", "volume_backoff_l"): 700.0}, ["nmpc.mpc.volume_backoff_l", "got 700.0", "600"]),
    # booleans are true or false, nothing else
    ("runtime", {("allow_insecure",): "yes"}, ["allow_insecure", "got 'yes'", "true or false"]),
    ("runtime", {("allow_insecure",): "true"}, ["allow_insecure", "got 'true'", "true or false"]),
    ("runtime", {("auto_approve",): 1}, ["auto_approve", "got 1", "true or false"]),
    ("runtime", {("early_warning", "viability_low"): "no"}, ["early_warning.viability_low", "got 'no'", "true or false"]),
    ("runtime", {("nmpc", "mpc", "compile"): "off"}, ["nmpc.mpc.compile", "got 'off'", "true or false"]),
    ("runtime", {("quality", "signals", "PV.OUR", "critical"): "yes"}, ["quality.signals.PV.OUR.critical", "got 'yes'", "true or false"]),
    ("runtime", {("io_timeout_s",): True}, ["io_timeout_s", "got True", "a number, not true or false"]),
    ("simulation", {("plc", "remote_enabled_at_start"): "on"}, ["plc.remote_enabled_at_start", "got 'on'", "true or false"]),
    # quality checks the cycle cannot run without
    ("runtime", {("quality", "signals", "PV.FeedTotal", "critical"): False}, ["quality.signals.PV.FeedTotal.critical", "got False", "cannot run without"]),
    ("runtime", {("quality", "signals", "SP.Temperature", "critical"): False}, ["quality.signals.SP.Temperature.critical", "got False", "cannot run without"]),
    # the simulator against its batch
    ("simulation", {("plc", "watchdog_timeout_h"): 0.5}, ["plc.watchdog_timeout_h", "got 0.5", "cycle_period_h (1.0"]),
    ("simulation", {("true_parameter_relative_sd",): {"growth.mu_max_per_h": -0.1}}, ["true_parameter_relative_sd.growth.mu_max_per_h", "got -0.1"]),
    ("simulation", {("true_parameter_factors",): {"growth.mu_max_per_h": 0.0}}, ["true_parameter_factors.growth.mu_max_per_h", "got 0.0"]),
    # tag maps
    ("opcua", {("tags", "PV.OUR", "node"): ""}, ["tags.PV.OUR.node", "got ''"]),
    ("opcua", {("tags", "PV.OUR", "node"): " BR01.PV.OUR"}, ["tags.PV.OUR.node", "got ' BR01.PV.OUR'", "string node id"]),
    ("opcua", {("tags", "PV.OUR", "node"): "ns=2;s=BR01.PV.OUR"}, ["tags.PV.OUR.node", "got 'ns=2;s=BR01.PV.OUR'", "namespace_uri"]),
    ("opcua", {("tags", "PV.OUR", "scale"): 0.0}, ["tags.PV.OUR.scale", "got 0.0", "must not be 0"]),
    ("opcua", {("tags", "PV.OUR", "scale"): INF}, ["tags.PV.OUR.scale", "finite number", "got inf"]),
    ("modbus", {("tags", "PV.OUR", "bad_when", "bit"): 8}, ["tags.PV.OUR.bad_when", "input 63 bit 8", "tags.PV.CER"]),
    ("modbus", {("tags", "PV.CER", "address"): 15}, ["tags.PV.CER.address", "got 15", "input register 15", "tags.PV.OUR"]),
    ("modbus", {("tags", "PV.OUR", "bad_when", "address"): 17}, ["tags.PV.OUR.bad_when.address", "got 17", "input register 17", "tags.PV.CER"]),
    ("modbus", {("tags", "MPC.Pred.HarvestTiter", "address"): 65535}, ["tags.MPC.Pred.HarvestTiter.address", "got 65535", "65535"]),
    ("modbus", {("tags", "PV.OUR", "length"): 4}, ["tags.PV.OUR.length", "got 4", "string"]),
]


def _case_id(case: tuple[str, dict[Path_, Any], list[str]]) -> str:
    source, edits, _ = case
    return f"{source}:" + ",".join(".".join(path) + "=" + repr(value) for path, value in edits.items())


@pytest.mark.parametrize(("source", "edits", "fragments"), CASES, ids=[_case_id(case) for case in CASES])
def test_a_bad_config_is_refused_with_file_field_value_and_expectation(tmp_path, source, edits, fragments):
    make, load = SOURCES[source]
    data = make(tmp_path)
    for field_path, value in edits.items():
        _set(data, field_path, value)
    path = tmp_path / f"bad-{source}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert f"{path}: " in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert "Traceback" not in message
    assert not (tmp_path / "history.sqlite").exists()


# ---------------------------------------------------------------------------------------------- YAML itself


def test_off_on_yes_no_are_strings_so_the_documented_mode_off_works(tmp_path):
    data = _runtime_data(tmp_path)
    path = tmp_path / "runtime.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if k != "mode"}) + "mode: off\n")
    assert load_runtime_config(path).config.mode is RequestedMode.OFF
    path.write_text("a: off\nb: on\nc: yes\nd: no\ne: true\nf: False\ng: 1.5\nh: null\n")
    assert read_yaml_mapping(path) == {"a": "off", "b": "on", "c": "yes", "d": "no", "e": True, "f": False, "g": 1.5, "h": None}


def test_an_unquoted_yes_for_a_boolean_is_refused(tmp_path):
    data = _runtime_data(tmp_path)
    path = tmp_path / "runtime.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if k != "allow_insecure"}) + "allow_insecure: yes\n")
    with pytest.raises(ConfigError, match=r"allow_insecure: must be true or false.*got 'yes'"):
        load_runtime_config(path)


def test_a_duplicate_key_names_the_file_the_key_and_both_lines(tmp_path):
    path = tmp_path / "runtime.yaml"
    path.write_text("mode: advisory\npoll_interval_s: 1.0\nquality:\n  stale_after_s: 60\n  stale_after_s: 90\n")
    with pytest.raises(ConfigError) as caught:
        read_yaml_mapping(path)
    message = str(caught.value)
    assert f"{path}: duplicate key 'stale_after_s' at line 5 (first at line 4)" in message


def test_merge_keys_may_be_overridden_without_counting_as_duplicates(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &base {low: 1.0, high: 2.0}\nother:\n  <<: *base\n  high: 3.0\n")
    assert read_yaml_mapping(path)["other"] == {"low": 1.0, "high": 3.0}


def test_a_file_that_is_not_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("batch_id: BR01\n# température\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        BatchConfig.from_yaml(path)
    message = str(caught.value)
    assert f"{path}: not UTF-8" in message and "byte offset 21" in message and "line 2" in message


def test_latest_harvest_inf_fails_before_the_history_is_created(tmp_path, capsys):
    from bioreactor_mpc.cli import main

    batch = yaml.safe_load((CONFIGS / "batch" / "platform.yaml").read_text())
    batch["limits"]["latest_harvest_h"] = INF
    batch_path = tmp_path / "batch.yaml"
    batch_path.write_text(yaml.safe_dump(batch))
    data = _runtime_data(tmp_path)
    data["batch"] = str(batch_path)
    path = tmp_path / "runtime.yaml"
    path.write_text(yaml.safe_dump(data))
    saved = structlog.get_config()
    try:
        assert main(["run", "--config", str(path)]) == 2
    finally:  # the CLI points structlog at this test's captured stderr, closed after it
        structlog.reset_defaults()
        structlog.configure(**saved)
    err = capsys.readouterr().err
    assert "limits.latest_harvest_h: Input should be a finite number" in err and "Traceback" not in err
    assert not (tmp_path / "history.sqlite").exists()


# ---------------------------------------------------------------------------------------------- quality overrides


def test_a_quality_override_merges_over_the_default_and_keeps_critical():
    config = DataQualityConfig.model_validate({"signals": {"PV.FeedTotal": {"low": 0.0}, "PV.Temperature": {"max_step": 1.0}}})
    feed = config.check_of("PV.FeedTotal")
    assert feed is not None and feed.critical and feed.low == 0.0 and feed.high == 1.0e6
    temperature = config.check_of("PV.Temperature")
    assert temperature is not None and (temperature.low, temperature.high, temperature.max_step) == (0.0, 60.0, 1.0)
    optional = DataQualityConfig.model_validate({"signals": {"PV.OUR": {"critical": True}}}).check_of("PV.OUR")
    assert optional is not None and optional.critical and optional.frozen_cycles == 4


# ---------------------------------------------------------------------------------------------- shipped configs


SHIPPED = sorted(CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_every_shipped_config_loads(path):
    loaders: dict[str, Callable[[Path], object]] = {
        "batch": BatchConfig.from_yaml,
        "model": CultureParameters.from_yaml,
        "plc": load_tag_map,
        "runtime": load_runtime_config,
        "simulate": load_simulation,
        "io": load_io_map,
        "calibration": lambda p: load_yaml_model(p, CalibrationSettings),
    }
    assert loaders[path.parent.name](path) is not None
