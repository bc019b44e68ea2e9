"""An engineer approves a calibrated model before the runtime may use it: ``bioreactor-mpc model approve`` and the check at ``run``."""

from __future__ import annotations

import argparse
import hashlib
import io
from pathlib import Path

import pytest
import structlog
import yaml
from argon2 import PasswordHasher
from rich.console import Console

from bioreactor_mpc.admin_cli import AdminCommandError, add_parsers, dispatch
from bioreactor_mpc.calibrate_cli import write_parameter_file
from bioreactor_mpc.cli import main
from bioreactor_mpc.runtime_cli import approved_model_file
from controller.runtime_config import load_runtime_config
from controller.takeover import RuntimeStartError
from interfaces.audit import AuditTrail
from interfaces.users import Role, UserStore
from plant_models.parameters import CultureParameters, ModelProvenance, ParameterEstimate, PhaseEnvelope

pytestmark = pytest.mark.usefixtures("uncached_logging")

REPO = Path(__file__).resolve().parent.parent
PASSWORDS = {"erik": "engineer-password-1", "olga": "operator-password-1"}


def calibrated(nominal: CultureParameters, path: Path, envelope: tuple[PhaseEnvelope, ...]) -> Path:
    """The nominal kinetics with a calibration's provenance and envelope, written by ``bioreactor-mpc calibrate``'s own writer."""
    growth = nominal.growth.model_copy(update={"mu_max_per_h": 0.9 * nominal.growth.mu_max_per_h})
    provenance = ModelProvenance(
        created_utc="2026-12-06T08:00:00+00:00",
        tool="bioreactor-mpc calibrate (test)",
        based_on="configs/model/cho_nominal.yaml",
        inputs=(("records/BR01-101/lab.csv", "0" * 64),),
        batches=("BR01-101", "BR01-102"),
        parameters={
            "growth.mu_max_per_h": ParameterEstimate(nominal=nominal.growth.mu_max_per_h, value=growth.mu_max_per_h, ci95_low=0.03, ci95_high=0.04, identifiable=True),
            "death.kd_min_per_h": ParameterEstimate(nominal=0.001, value=0.001, ci95_low=None, ci95_high=None, identifiable=False),
        },
        not_identifiable=("death.kd_min_per_h",),
        fit_statistics={"reduced_chi2": 1.1},
        warnings=("only two batches",),
        tool_version="0.1.0",
        settings={"parameters": ["culture.growth.mu_max_per_h"], "prior_log_sd": 0.7},
    )
    write_parameter_file(path, nominal.model_copy(update={"growth": growth, "provenance": provenance, "envelope": envelope}))
    assert CultureParameters.from_yaml(path).provenance == provenance  # a parameter that was not identifiable (no interval) included
    return path


def runtime_config(tmp_path: Path, model: Path, history: Path) -> Path:
    """The reference OPC UA runtime config with another kinetics file and history."""
    config = yaml.safe_load((REPO / "configs" / "runtime" / "reference-opcua.yaml").read_text())
    for key in ("tag_map", "batch"):
        config[key] = str((REPO / "configs" / "runtime" / config[key]).resolve())
    config.update(model=str(model), history=str(history), monitoring={"port": 0})  # a free port: never the 9108 of a runtime beside this test
    path = tmp_path / f"runtime-{model.stem}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def history(tmp_path: Path, uncached_logging: None) -> Path:
    """A history file with an engineer and an operator (cheap password hashes: tests)."""
    path = tmp_path / "history.sqlite"
    with UserStore(path, password_hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)) as users:
        users.add_user("erik", full_name="Erik Lind", role=Role.ENGINEER, password=PASSWORDS["erik"])
        users.add_user("olga", full_name="Olga Ivanova", role=Role.OPERATOR, password=PASSWORDS["olga"])
    return path


def _approve(monkeypatch: pytest.MonkeyPatch, parameters: Path, history: Path, user: str, password: str, reason: str = "report reviewed with QA") -> tuple[int, str]:
    monkeypatch.setenv("APPROVER_PASSWORD", password)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    argv = ["model", "approve", str(parameters), "--history", str(history), "--user", user, "--reason", reason, "--password-env", "APPROVER_PASSWORD"]
    out = io.StringIO()
    status = dispatch(parser.parse_args(argv), Console(file=out, width=200))
    return status if status is not None else -1, out.getvalue()


def _approvals(history: Path) -> list[tuple[str, str]]:
    with AuditTrail(history, read_only=True) as trail:
        return [(record.actor, record.details["sha256"]) for record in trail.records(action="model_approved")]


def test_run_refuses_a_calibrated_model_until_an_engineer_approves_that_very_file(tmp_path, nominal, envelope, history, monkeypatch, capsys):
    model = calibrated(nominal, tmp_path / "site.yaml", envelope)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    config = runtime_config(tmp_path, model, history)
    # Refused at start, naming the file and the command that approves it; nothing run, nothing recorded.
    saved = structlog.get_config()
    try:
        assert main(["run", "--config", str(config)]) == 2
    finally:  # the CLI points structlog at this test's captured stderr, closed after it
        structlog.reset_defaults()
        structlog.configure(**saved)
    error = capsys.readouterr().err
    assert f"{model} is a calibrated model (sha256 {digest}) that no engineer has approved in {history}" in error
    assert f"bioreactor-mpc model approve {model} --history {history} --user ENGINEER" in error
    # A wrong password, an operator and a missing reason approve nothing.
    with pytest.raises(AdminCommandError, match="erik: wrong user name or password; nothing approved"):
        _approve(monkeypatch, model, history, "erik", "not-the-password")
    with pytest.raises(AdminCommandError, match="olga is operator: only an engineer can approve a model"):
        _approve(monkeypatch, model, history, "olga", PASSWORDS["olga"])
    with pytest.raises(AdminCommandError, match="--reason"):
        _approve(monkeypatch, model, history, "erik", PASSWORDS["erik"], reason="  ")
    assert _approvals(history) == []
    with pytest.raises(RuntimeStartError, match="no engineer has approved"):
        approved_model_file(load_runtime_config(config))
    # The engineer's approval: the file's sha256, the signature and a summary of the provenance, in the audit trail.
    status, out = _approve(monkeypatch, model, history, "erik", PASSWORDS["erik"])
    assert status == 0 and f"approved {model} (sha256 {digest}) as erik" in out and "only two batches" in out
    with AuditTrail(history, read_only=True) as trail:
        (record,) = trail.records(action="model_approved")
        assert trail.verify().ok
    assert record.actor == "erik" and record.subject == "model site.yaml" and record.details["file"] == str(model.resolve())
    assert record.details["signature"] | {"signed_utc": None} == {
        "signer": "erik",
        "printed_name": "Erik Lind",
        "role": "engineer",
        "reason": "report reviewed with QA",
        "signed_utc": None,
    }
    provenance = record.details["provenance"]
    assert provenance["batches"] == ["BR01-101", "BR01-102"] and provenance["not_identifiable"] == ["death.kd_min_per_h"]
    assert set(provenance["fitted"]) == {"growth.mu_max_per_h"} and [phase["phase"] for phase in provenance["envelope"]] == ["growth", "production"]
    assert provenance["tool_version"] == "0.1.0" and provenance["settings"]["parameters"] == ["culture.growth.mu_max_per_h"]  # how it was fitted
    # Now the runtime accepts it, and names the approval in its start record.
    model_file = approved_model_file(load_runtime_config(config))
    assert (model_file.sha256, model_file.calibrated, model_file.approval_seq) == (digest, True, record.seq)
    # A file changed after its approval is another model: refused again.
    model.write_text(model.read_text() + "# edited after the approval\n")
    with pytest.raises(RuntimeStartError, match="no engineer has approved"):
        approved_model_file(load_runtime_config(config))


def test_the_nominal_kinetics_need_no_approval_and_cannot_be_approved(tmp_path, history, monkeypatch):
    nominal_file = REPO / "configs" / "model" / "cho_nominal.yaml"
    model_file = approved_model_file(load_runtime_config(runtime_config(tmp_path, nominal_file, tmp_path / "no-history-yet.sqlite")))
    assert (model_file.calibrated, model_file.approval_seq) == (False, None)
    assert model_file.sha256 == hashlib.sha256(nominal_file.read_bytes()).hexdigest()
    assert not (tmp_path / "no-history-yet.sqlite").exists(), "the check creates nothing"
    with pytest.raises(AdminCommandError, match="no provenance, so not a calibrated model"):
        _approve(monkeypatch, nominal_file, history, "erik", PASSWORDS["erik"])
    with pytest.raises(AdminCommandError, match="missing.sqlite: no such history file"):
        _approve(monkeypatch, nominal_file, tmp_path / "missing.sqlite", "erik", PASSWORDS["erik"])
    assert _approvals(history) == []


def test_with_an_audit_key_only_an_approval_that_key_macd_in_an_intact_trail_lets_the_runtime_start(tmp_path, nominal, envelope, history, monkeypatch):
    """Found by review: the runtime took any ``model_approved`` record with the file's sha256, so whoever could write the history could
    approve a model by inserting one. With an audit key, the approval must carry that key's MAC, in a trail whose hash chain holds."""
    import sqlite3

    from interfaces.audit_keys import KEY_ENV, create_key_file

    model = calibrated(nominal, tmp_path / "site.yaml", envelope)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    config = runtime_config(tmp_path, model, history)
    key = create_key_file(tmp_path / "audit.key")  # beside the runtime's config: the runtime's key
    monkeypatch.delenv(KEY_ENV, raising=False)
    # An approval written without the key (as anyone with the file could): refused, naming the record and the key.
    with AuditTrail(history) as unkeyed:
        forged = unkeyed.append(actor="erik", action="model_approved", subject="model site.yaml", details={"sha256": digest, "file": str(model)})
    with pytest.raises(RuntimeStartError, match=rf"audit record {forged.seq}, by erik\) is not MAC'd, not by the runtime's audit key {key.key_id}"):
        approved_model_file(load_runtime_config(config))
    # The engineer's approval with the key: accepted, and it is that record the runtime names.
    monkeypatch.setenv(KEY_ENV, str(tmp_path / "audit.key"))
    status, _ = _approve(monkeypatch, model, history, "erik", PASSWORDS["erik"])
    monkeypatch.delenv(KEY_ENV)
    assert status == 0
    with AuditTrail(history, read_only=True) as trail:
        approval = trail.records(action="model_approved")[-1]
    assert approval.key_id == key.key_id
    assert approved_model_file(load_runtime_config(config)).approval_seq == approval.seq
    # That approval edited in the file (its reason changed, the triggers dropped first): the chain no longer holds, nothing is trusted.
    db = sqlite3.connect(history, isolation_level=None)
    db.execute("DROP TRIGGER IF EXISTS audit_no_update")
    db.execute("UPDATE audit SET details = replace(details, 'report reviewed with QA', 'rubber-stamped') WHERE seq = ?", (approval.seq,))
    with pytest.raises(RuntimeStartError, match=rf"hash chain is broken \(seq {approval.seq}: altered"):
        approved_model_file(load_runtime_config(config))
    # The chain recomputed with the public formula (as an attacker would): the MAC gives the edit away.
    from test_audit_tamper import _rechain

    _rechain(db)
    db.close()
    with pytest.raises(RuntimeStartError, match=rf"audit record {approval.seq}, by erik\) carries a MAC by the runtime's audit key {key.key_id} that does not match"):
        approved_model_file(load_runtime_config(config))
