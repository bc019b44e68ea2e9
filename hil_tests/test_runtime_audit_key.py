"""``bioreactor-mpc run`` with an audit key beside its config and a checkpoints file: what it records verifies with the key and the checkpoints, and an edit is found."""

from __future__ import annotations

import argparse
import asyncio
import io
import sqlite3
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from runtime_harness import TEST_SETTINGS, run_command_runtime

from bioreactor_mpc.admin_cli import add_parsers, dispatch
from controller.mpc import EconomicMpc
from controller.runtime_config import load_runtime_config
from interfaces.audit import AuditTrail
from interfaces.audit_export import read_checkpoints
from interfaces.audit_keys import KEY_ENV, create_key_file
from plant_models.cho import CultureModel
from simulator.config import load_simulation

pytestmark = [pytest.mark.hil, pytest.mark.security]

REPO = Path(__file__).resolve().parent.parent
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"


def _verify(*argv: str) -> tuple[int | None, str]:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    out = io.StringIO()
    return dispatch(parser.parse_args(["audit", "verify", *argv]), Console(file=out, width=200)), out.getvalue()


def test_a_keyed_run_verifies_with_its_key_and_checkpoints_and_an_edited_cycle_is_found(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    etc, offsite = tmp_path / "etc", tmp_path / "offsite" / "checkpoints.jsonl"
    key = create_key_file(etc / "audit.key")  # the documented default: audit.key beside the config
    history_path = tmp_path / "var" / "history.sqlite"
    config = yaml.safe_load((REPO / "configs" / "runtime" / "reference-opcua.yaml").read_text())
    for name in ("tag_map", "batch", "model"):
        config[name] = str((REPO / "configs" / "runtime" / config[name]).resolve())
    config.update(history=str(history_path), poll_interval_s=0.01, reconnect_initial_s=0.05, safeguards={"claim_watch_s": 0.2})
    config["audit"] = {"checkpoints": {"file": str(offsite), "every_cycles": 2}}
    config["monitoring"] = {"port": 0}  # a free port: never collides with a runtime or test running beside this one
    (etc / "runtime.yaml").write_text(yaml.safe_dump(config))
    loaded = load_runtime_config(etc / "runtime.yaml")
    mpc = EconomicMpc(CultureModel(), loaded.batch, TEST_SETTINGS.nmpc.mpc)

    asyncio.run(run_command_runtime(loaded, load_simulation(PLATFORM), until_h=1.5, mpc=mpc))
    with AuditTrail(history_path, read_only=True) as trail:
        records = trail.records()
    assert records and all(r.key_id == key.key_id and r.mac for r in records), "every record MAC'd with the key beside the config"
    assert [r.action for r in records].count("history_checkpoint") >= 2, "every 2 cycles and at shutdown"
    read, damaged = read_checkpoints(offsite)
    assert damaged == [] and read[-1].checkpoint.reason == "shutdown" and read[-1].checkpoint.seq == records[-1].seq
    db = sqlite3.connect(history_path)
    cycles = db.execute("SELECT COUNT(*), COUNT(audit_mac) FROM cycles").fetchone()
    db.close()
    assert cycles[0] >= 2 and cycles[0] == cycles[1], "every cycle row MAC'd"
    status, out = _verify("--history", str(history_path), "--key", str(etc), "--checkpoints", str(offsite))
    assert status == 0, out
    sqlite3.connect(history_path, isolation_level=None).execute("UPDATE cycles SET state = 'advisory' WHERE id = 1")
    status, out = _verify("--history", str(history_path), "--key", str(etc), "--checkpoints", str(offsite))
    assert status == 1
    assert "cycles row 1: altered: its MAC does not match" in out.splitlines()
