"""`bioreactor-mpc plc-sim`'s OPC UA security options: every wrong combination stops before anything is served, naming the option and the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bioreactor_mpc.cli import main
from interfaces.opcua_certificates import create_certificate
from plant_models.errors import ConfigError
from simulator.opcua_server import read_users_file


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """The simulated PLC's certificate and key, and a trusted directory holding the runtime's certificate as runtime.der."""
    create_certificate(tmp_path / "plc.der", tmp_path / "plc.pem", common_name="plc", application_uri="urn:test:plc", hostnames=["127.0.0.1"], days=2)
    create_certificate(tmp_path / "runtime.der", tmp_path / "runtime.pem", common_name="runtime", application_uri="urn:test:runtime", hostnames=["edge01"], days=2)
    (tmp_path / "trusted").mkdir()
    shutil.copy(tmp_path / "runtime.der", tmp_path / "trusted" / "runtime.der")
    return tmp_path


def _secured(pki: Path) -> list[str]:
    return ["plc-sim", "--certificate", str(pki / "plc.der"), "--private-key", str(pki / "plc.pem"), "--trusted-clients", str(pki / "trusted")]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--private-key", "x.pem"], "--certificate, --trusted-clients: needed too for a secured server"),
        (["--writer-user", "bob"], "--writer-user: needs a secured server (--certificate, --private-key and --trusted-clients)"),
        (["--protocol", "modbus", "--certificate", "plc.der"], "--certificate: OPC UA security options; Modbus TCP has none"),
        (["--security", "sign-encrypt"], "--security sign-encrypt: needs --certificate, --private-key and --trusted-clients"),
        (["--security", "sign"], "--security sign: needs --certificate, --private-key and --trusted-clients"),
        (["--security", "sign", "--protocol", "modbus"], "--security sign: an OPC UA security option; Modbus TCP has none"),
        (["--security", "none", "--certificate", "plc.der"], "--security none: serves without security, so --certificate would be ignored"),
        (["--security", "none", "--writer-user", "bob"], "--security none: serves without security, so --writer-user would be ignored"),
    ],
)
def test_security_options_that_do_not_go_together_are_refused(extra, expected, capsys):
    assert main(["plc-sim", *extra]) == 2
    assert expected in capsys.readouterr().err


def test_writers_that_cannot_be_used_are_refused_naming_them(pki, capsys):
    (pki / "trusted" / "runtime.der").rename(pki / "trusted" / "edge01.der")
    assert main(_secured(pki)) == 2
    assert f"--writer-cert: {pki / 'trusted' / 'runtime.der'}: certificate file not found (the default writer: the runtime's certificate" in capsys.readouterr().err
    assert main([*_secured(pki), "--writer-cert", str(pki / "missing.der")]) == 2
    assert f"--writer-cert: {pki / 'missing.der'}: certificate file not found" in capsys.readouterr().err
    assert main([*_secured(pki), "--writer-cert", str(pki / "plc.der")]) == 2  # a certificate the PLC does not trust cannot be a writer
    assert f"writer certificate: {pki / 'plc.der'}: not trusted by {pki / 'trusted'}" in capsys.readouterr().err
    (pki / "users").write_text("operator:a long operator password\n", encoding="utf-8")
    assert main([*_secured(pki), "--writer-cert", str(pki / "trusted" / "edge01.der"), "--users-file", str(pki / "users"), "--writer-user", "bob"]) == 2
    assert "writer_users: 'bob': not a user (the users: operator)" in capsys.readouterr().err


def test_users_file_lines_are_checked_and_passwords_never_shown(tmp_path):
    path = tmp_path / "users"
    path.write_text("# the simulated PLC's users\n\nbioreactor-mpc:pass:with:colons\noperator: spaces kept \n", encoding="utf-8")
    assert read_users_file(path) == {"bioreactor-mpc": "pass:with:colons", "operator": " spaces kept "}
    path.write_text("operator:first\nno-colon-secret\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"users file: {path}: line 2: expected 'name:password' with both parts non-empty") as bad:
        read_users_file(path)
    assert "first" not in str(bad.value) and "secret" not in str(bad.value)
    path.write_text("operator:first\noperator:second\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 2: user 'operator' appears twice"):
        read_users_file(path)
    with pytest.raises(ConfigError, match=rf"users file: {tmp_path / 'missing'}: not found"):
        read_users_file(tmp_path / "missing")
