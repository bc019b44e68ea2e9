"""`bioreactor-mpc certs`: makes a certificate an operator can check, and never overwrites one by accident."""

from __future__ import annotations

from bioreactor_mpc.cli import main
from interfaces.opcua_certificates import application_uri, read_certificate


def test_certs_makes_a_certificate_and_refuses_to_overwrite_it(tmp_path, capsys):
    cert, key = tmp_path / "runtime.der", tmp_path / "runtime.pem"
    arguments = ["certs", "--cert", str(cert), "--key", str(key), "--common-name", "edge01", "--application-uri", "urn:edge01:bioreactor-mpc", "--hostname", "edge01"]
    assert main(arguments) == 0
    assert "SHA-256" in capsys.readouterr().out
    assert application_uri(read_certificate(cert, field="certificate")) == "urn:edge01:bioreactor-mpc"
    assert key.stat().st_mode & 0o077 == 0, "the private key is readable by its owner only"
    before = cert.read_bytes()
    assert main(arguments) == 2
    assert "exists; nothing written (--force replaces it)" in capsys.readouterr().err
    assert cert.read_bytes() == before
    assert main([*arguments, "--force"]) == 0 and cert.read_bytes() != before
