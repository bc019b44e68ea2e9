"""`bioreactor-mpc init DIR`: a site's config set the commands accept, equal to the reference configs where the site has not edited it, never overwritten by accident."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bioreactor_mpc.cli import main
from bioreactor_mpc.resources import reference_config
from controller.config import BatchConfig
from controller.runtime_config import load_runtime_config
from interfaces.tagmap import ModbusTagMap, OpcUaTagMap, load_tag_map
from plant_models.parameters import CultureParameters
from simulator.config import load_simulation

SET = ("runtime.yaml", "plc.yaml", "batch.yaml", "model.yaml", "simulate.yaml", "README.md")


def _yaml(path: Path) -> object:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(("protocol", "tag_map_type"), [("opcua", OpcUaTagMap), ("modbus", ModbusTagMap)])
def test_init_writes_a_set_the_loaders_accept(tmp_path, capsys, protocol, tag_map_type):
    site = tmp_path / "site"
    assert main(["init", str(site), "--protocol", protocol]) == 0
    assert sorted(p.name for p in site.iterdir()) == sorted(SET)
    loaded = load_runtime_config(site / "runtime.yaml")
    assert loaded.tag_map_path == site / "plc.yaml"
    assert loaded.history_path == site / "history.sqlite", "the history beside the config unless --history says"
    assert isinstance(load_tag_map(loaded.tag_map_path), tag_map_type)
    assert loaded.batch == BatchConfig.from_yaml(reference_config("batch", "platform.yaml"))
    assert loaded.nominal == CultureParameters.from_yaml(reference_config("model", "cho_nominal.yaml"))
    simulation = load_simulation(site / "simulate.yaml")
    assert simulation.batch == loaded.batch and simulation.nominal == loaded.nominal
    # Apart from the paths, the runtime config is the reference one of the protocol.
    written, reference = _yaml(site / "runtime.yaml"), _yaml(reference_config("runtime", f"reference-{protocol}.yaml"))
    assert isinstance(written, dict) and isinstance(reference, dict)
    paths = ("tag_map", "batch", "model", "history")
    assert {k: v for k, v in written.items() if k not in paths} == {k: v for k, v in reference.items() if k not in paths}
    assert _yaml(site / "plc.yaml") == _yaml(reference_config("plc", f"reference-{protocol}.yaml"))
    readme = (site / "README.md").read_text(encoding="utf-8")
    for name in SET[:-1]:
        assert f"`{name}`" in readme, f"the README says what {name} is for"
    assert ("allow_insecure" in readme) == (protocol == "opcua")
    assert "runtime.yaml" in capsys.readouterr().out


def test_init_names_an_absolute_history_for_a_service(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "site", "--history", "var/history.sqlite"]) == 0
    assert _yaml(tmp_path / "site" / "runtime.yaml")["history"] == str(tmp_path / "var" / "history.sqlite")
    assert load_runtime_config(tmp_path / "site" / "runtime.yaml").history_path == tmp_path / "var" / "history.sqlite"


def test_init_never_overwrites_without_force(tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    (site / "batch.yaml").write_text("batch_id: EDITED\n", encoding="utf-8")
    (site / "notes.txt").write_text("the site's own file\n", encoding="utf-8")
    assert main(["init", str(site)]) == 2
    error = capsys.readouterr().err
    assert "batch.yaml exists; nothing written (--force replaces them)" in error
    assert sorted(p.name for p in site.iterdir()) == ["batch.yaml", "notes.txt"], "nothing written, not even the files that were missing"
    assert main(["init", str(site), "--force"]) == 0
    assert BatchConfig.from_yaml(site / "batch.yaml").batch_id != "EDITED"
    assert (site / "notes.txt").read_text(encoding="utf-8") == "the site's own file\n", "files outside the set are left alone"
    (tmp_path / "file").write_text("", encoding="utf-8")
    assert main(["init", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_simulate_runs_on_the_set(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "site"]) == 0
    assert main(["simulate", "--config", "site/simulate.yaml", "--no-plot", "--output-dir", "out"]) == 0
    assert "score" in capsys.readouterr().out
    assert list((tmp_path / "out").glob("BR01-DEMO-001-seed1-recipe-*.csv"))
