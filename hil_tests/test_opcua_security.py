"""OPC UA security end to end on 127.0.0.1: SignAndEncrypt with certificates from a trust store and credentials from the environment or a file.

Every certificate is made here (in tmp_path) with the operator's function,
:func:`interfaces.opcua_certificates.create_certificate`. The simulated PLC
offers only the configured policy; the runtime's port must connect with it,
and must refuse, or be refused, whenever one side does not trust the other or
the password is wrong.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import shutil
import socket
import stat
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Client, ua
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from controller.ports import PlcAuthError, PlcLinkError
from interfaces.opcua_certificates import create_certificate, fingerprint, read_certificate, read_private_key
from interfaces.opcua_port import SECURITY_MODES, SECURITY_POLICIES, OpcUaPort
from interfaces.tagmap import OpcUaTagMap, load_tag_map
from plant_models.errors import ConfigError
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.opcua_server import OpcUaPlcServer, OpcUaServerSecurity
from simulator.plc import SimulatedPlc

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
REFERENCE_MAP = REPO / "configs" / "plc" / "reference-opcua.yaml"
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
USER, PASSWORD = "operator", "correct horse battery staple"
TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Pki:
    """Certificates as an edge controller and a PLC hold them: own certificate and key, and a directory of trusted peers."""

    root: Path
    client_cert: Path
    client_key: Path
    client_trusts: Path
    server_cert: Path
    server_key: Path
    server_trusts: Path
    stranger_cert: Path


def _certificate(directory: Path, name: str, uri: str, hosts: list[str]) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.der", directory / f"{name}.pem"
    create_certificate(cert, key, common_name=f"bioreactor-mpc test {name}", application_uri=uri, hostnames=hosts, days=2)
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """The runtime trusts the PLC and the PLC trusts the runtime; a stranger's certificate is trusted by nobody."""
    for folder in ("own", "trusted", "plc/own", "plc/trusted", "stranger"):
        (tmp_path / folder).mkdir(parents=True)
    client_cert, client_key = _certificate(tmp_path / "own", "runtime", "urn:test:bioreactor-mpc:runtime", [socket.gethostname()])
    server_cert, server_key = _certificate(tmp_path / "plc" / "own", "plc", "urn:test:bioreactor-mpc:plc", ["127.0.0.1", "localhost", socket.gethostname()])
    stranger_cert, _ = _certificate(tmp_path / "stranger", "stranger", "urn:test:stranger", ["127.0.0.1"])
    shutil.copy(server_cert, tmp_path / "trusted" / "plc.der")
    shutil.copy(client_cert, tmp_path / "plc" / "trusted" / "runtime.der")
    return Pki(
        root=tmp_path,
        client_cert=client_cert,
        client_key=client_key,
        client_trusts=tmp_path / "trusted",
        server_cert=server_cert,
        server_key=server_key,
        server_trusts=tmp_path / "plc" / "trusted",
        stranger_cert=stranger_cert,
    )


def _tag_map(pki: Pki, **security: Any) -> OpcUaTagMap:
    """The reference map with a security section, written beside the certificates with relative paths, and loaded."""
    data = yaml.safe_load(REFERENCE_MAP.read_text(encoding="utf-8"))
    data["security"] = {"certificate": "own/runtime.der", "private_key": "own/runtime.pem", "trust_store": "trusted", **security}
    path = pki.root / "plc-map.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    tag_map = load_tag_map(path)
    assert isinstance(tag_map, OpcUaTagMap)
    return tag_map


def _reissue(pki: Pki, *, not_before: dt.datetime, not_after: dt.datetime) -> None:
    """Replace the runtime's certificate by one with the same key, name and extensions and the given validity."""
    original = read_certificate(pki.client_cert, field="certificate")
    builder = (
        x509.CertificateBuilder()
        .subject_name(original.subject)
        .issuer_name(original.issuer)
        .public_key(original.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for extension in original.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    certificate = builder.sign(read_private_key(pki.client_key, field="key"), hashes.SHA256())
    pki.client_cert.write_bytes(certificate.public_bytes(serialization.Encoding.DER))


def _server_security(pki: Pki, **overrides: Any) -> OpcUaServerSecurity:
    settings: dict[str, Any] = {
        "certificate": pki.server_cert,
        "private_key": pki.server_key,
        "trusted_clients": pki.server_trusts,
        "users": {USER: PASSWORD},
        "writer_certificates": (pki.client_cert,),  # the runtime writes; hil_tests/test_plc_access.py checks that nobody else does
    }
    return OpcUaServerSecurity(**{**settings, **overrides})


@asynccontextmanager
async def _serving(tag_map: OpcUaTagMap, endpoint: str, security: OpcUaServerSecurity | None) -> AsyncIterator[SimulatedPlc]:
    plc, _ = build_simulated_plc(load_simulation(PLATFORM))
    server = OpcUaPlcServer(plc, tag_map, endpoint=endpoint, security=security)
    await server.start()
    try:
        yield plc
    finally:
        await server.stop()


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIOREACTOR_MPC_OPCUA_USER", USER)
    monkeypatch.setenv("BIOREACTOR_MPC_OPCUA_PASSWORD", PASSWORD)


CREDENTIALS_FROM_ENV = {"username_env": "BIOREACTOR_MPC_OPCUA_USER", "password_env": "BIOREACTOR_MPC_OPCUA_PASSWORD"}


@pytest.mark.parametrize(
    ("policy", "mode", "password_from"),
    [
        ("Basic256Sha256", "sign_and_encrypt", "env"),
        ("Aes128_Sha256_RsaOaep", "sign_and_encrypt", "file"),
        ("Aes256_Sha256_RsaPss", "sign_and_encrypt", "env"),
        ("Basic256Sha256", "sign", "file"),
    ],
)
def test_secured_connection_reads_and_writes(pki, opcua_endpoint, credentials, policy, mode, password_from):
    if password_from == "file":
        (pki.root / "secrets").mkdir()
        (pki.root / "secrets" / "opcua-password").write_text(PASSWORD + "\n", encoding="utf-8")
        tag_map = _tag_map(pki, policy=policy, mode=mode, username_env="BIOREACTOR_MPC_OPCUA_USER", password_file="secrets/opcua-password")
    else:
        tag_map = _tag_map(pki, policy=policy, mode=mode, **CREDENTIALS_FROM_ENV)
    assert tag_map.security is not None and tag_map.security.certificate == pki.client_cert  # relative to the map's directory

    async def scenario() -> None:
        async with _serving(tag_map, opcua_endpoint, _server_security(pki, policy=policy, mode=mode)) as plc:
            port = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S)  # no insecure opt-in needed
            try:
                await port.connect()
                # The channel really runs the configured policy and mode.
                assert port.security_policy_uri == SECURITY_POLICIES[policy].URI
                assert port.security_mode == SECURITY_MODES[mode]
                readings = await port.read()
                assert readings["PV.Volume"].good and readings["PV.Volume"].value == pytest.approx(1400.0, abs=10.0)
                plc.set_operator_remote(True)
                await port.write({"SP.FeedRate": 2.5, "MPC.Heartbeat": 3})
                assert (plc.snapshot()["SP.FeedRate"].value, plc.heartbeat) == (2.5, 3)
            finally:
                await port.close()

    _run(scenario)


@pytest.mark.security
def test_server_offers_only_the_configured_policy(pki, opcua_endpoint, credentials):
    tag_map = _tag_map(pki, **CREDENTIALS_FROM_ENV)

    async def scenario() -> None:
        async with _serving(tag_map, opcua_endpoint, _server_security(pki)):
            endpoints = await Client(opcua_endpoint, timeout=TIMEOUT_S).connect_and_get_server_endpoints()
            assert {(e.SecurityPolicyUri, e.SecurityMode) for e in endpoints} == {(SECURITY_POLICIES["Basic256Sha256"].URI, ua.MessageSecurityMode.SignAndEncrypt)}
            # A port configured for Sign finds no such endpoint, and says what there is.
            sign_only = OpcUaPort(_tag_map(pki, mode="sign", **CREDENTIALS_FROM_ENV), endpoint=opcua_endpoint, timeout_s=TIMEOUT_S)
            with pytest.raises(PlcLinkError, match=r"offers no endpoint with Basic256Sha256 Sign; it offers: Basic256Sha256 SignAndEncrypt"):
                await sign_only.connect()
            # A client that ignores the endpoints and opens a session on an unsecured channel, with the right password, is refused.
            intruder = Client(opcua_endpoint, timeout=TIMEOUT_S)
            intruder.set_user(USER)
            intruder.set_password(PASSWORD)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(Client, "find_endpoint", staticmethod(lambda endpoints, mode, uri: endpoints[0]))
                with pytest.raises(ua.UaStatusCodeError) as refused:
                    await intruder.connect()
            assert ua.StatusCode(refused.value.code).name == "BadUserAccessDenied"

    _run(scenario)


@pytest.mark.security
def test_untrusted_server_certificate_is_refused_by_the_port(pki, opcua_endpoint, credentials, caplog):
    (pki.client_trusts / "plc.der").unlink()
    shutil.copy(pki.stranger_cert, pki.client_trusts / "stranger.der")
    tag_map = _tag_map(pki, **CREDENTIALS_FROM_ENV)
    server_fingerprint = fingerprint(read_certificate(pki.server_cert, field="server certificate"))
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        async with _serving(tag_map, opcua_endpoint, _server_security(pki)):
            port = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S)
            with pytest.raises(PlcAuthError) as refused:  # not retried at the link's pace: the trust store needs an operator
                await port.connect()
            message = str(refused.value)
            assert opcua_endpoint in message and "BadCertificateUntrusted" in message
            assert server_fingerprint in message and str(pki.client_trusts) in message  # what to check, and where to put it
            assert PASSWORD not in message and not port.connected
            assert refused.value.retry_after_s == 300.0
            with pytest.raises(PlcAuthError) as again:  # still untrusted: the wait doubles (docs/opcua-security.md, section 9)
                await port.connect()
            assert again.value.retry_after_s == 600.0 and port.auth_refusals == 2

    _run(scenario)
    # The refusal is the exception's one line; nothing logs a traceback for it (asyncua's own trust store would).
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []


@pytest.mark.security
def test_untrusted_client_certificate_is_refused_by_the_server(pki, opcua_endpoint, credentials):
    (pki.server_trusts / "runtime.der").unlink()
    shutil.copy(pki.stranger_cert, pki.server_trusts / "stranger.der")
    tag_map = _tag_map(pki, **CREDENTIALS_FROM_ENV)

    async def scenario() -> None:
        async with _serving(tag_map, opcua_endpoint, _server_security(pki, writer_certificates=(pki.stranger_cert,))):  # a writer must be trusted
            port = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S)
            with pytest.raises(PlcAuthError, match=r"the PLC does not trust this runtime's certificate \(BadCertificateUntrusted\), SHA-256 ") as refused:
                await port.connect()
            assert opcua_endpoint in str(refused.value) and str(pki.client_cert) in str(refused.value)
            assert not port.connected

    _run(scenario)


@pytest.mark.security
def test_wrong_password_or_no_user_is_refused(pki, opcua_endpoint, monkeypatch):
    wrong = "Tr0ub4dor&3"
    monkeypatch.setenv("BIOREACTOR_MPC_OPCUA_USER", USER)
    monkeypatch.setenv("BIOREACTOR_MPC_OPCUA_PASSWORD", wrong)
    tag_map = _tag_map(pki, **CREDENTIALS_FROM_ENV)

    async def scenario() -> None:
        async with _serving(tag_map, opcua_endpoint, _server_security(pki)):
            port = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S)
            with pytest.raises(PlcAuthError, match=r"refused the credentials \(BadUserAccessDenied\) of user 'operator' \(from \$BIOREACTOR_MPC_OPCUA_USER") as refused:
                await port.connect()
            assert wrong not in str(refused.value) and PASSWORD not in str(refused.value)
            # Minutes before the next attempt, not the link's seconds: a PLC locks an account after a few wrong passwords.
            assert refused.value.retry_after_s >= 60.0 and not port.connected
            patient = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S, auth_retry_after_s=900.0)
            with pytest.raises(PlcAuthError) as refused_again:
                await patient.connect()
            assert refused_again.value.retry_after_s == 900.0
            # The password is read at every connect: once it is right, the same port connects.
            monkeypatch.setenv("BIOREACTOR_MPC_OPCUA_PASSWORD", PASSWORD)
            await port.connect()
            assert port.connected
            await port.close()
            # An anonymous session is refused by a server that has users.
            anonymous = OpcUaPort(_tag_map(pki), endpoint=opcua_endpoint, timeout_s=TIMEOUT_S)
            with pytest.raises(PlcAuthError, match="refused an anonymous session"):
                await anonymous.connect()

    _run(scenario)


def test_own_certificate_that_cannot_be_used_at_connect_is_an_auth_error(pki, opcua_endpoint, credentials):
    """Renewed (or broken) while the runtime runs: refused before anything is sent, naming the file, and tried again later."""
    tag_map = _tag_map(pki, **CREDENTIALS_FROM_ENV)
    port = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S)  # built while the certificate was valid
    now = dt.datetime.now(dt.UTC)
    certificate, key = pki.client_cert.read_bytes(), pki.client_key.read_bytes()

    async def scenario() -> None:
        async with _serving(tag_map, opcua_endpoint, _server_security(pki)):
            _reissue(pki, not_before=now - dt.timedelta(days=400), not_after=now - dt.timedelta(days=35))
            with pytest.raises(PlcAuthError) as expired:
                await port.connect()
            message = str(expired.value)
            assert f"security.certificate: {pki.client_cert}: expired on {now - dt.timedelta(days=35):%Y-%m-%d}" in message
            assert expired.value.retry_after_s == 300.0 and not port.connected
            _reissue(pki, not_before=now + dt.timedelta(days=3), not_after=now + dt.timedelta(days=300))
            with pytest.raises(PlcAuthError, match=rf"{pki.client_cert}: not valid before {now + dt.timedelta(days=3):%Y-%m-%d}"):
                await port.connect()
            pki.client_cert.write_bytes(certificate)
            pki.client_key.write_text("not a key\n", encoding="utf-8")
            with pytest.raises(PlcAuthError, match=rf"security.private_key: {pki.client_key}: not a private key in PEM or DER"):
                await port.connect()
            assert not port.connected
            pki.client_key.write_bytes(key)  # put right: the same port connects, without a restart
            await port.connect()
            await port.close()

    _run(scenario)
    # At start, the same certificate stops the start instead: there is nobody to wait for.
    _reissue(pki, not_before=now - dt.timedelta(days=400), not_after=now - dt.timedelta(days=35))
    with pytest.raises(ConfigError, match=rf"security.certificate: {pki.client_cert}: expired on"):
        OpcUaPort(_tag_map(pki, **CREDENTIALS_FROM_ENV), endpoint=opcua_endpoint)


@pytest.mark.security
def test_security_none_needs_the_opt_in_even_when_configured(pki, opcua_endpoint):
    tag_map = _tag_map(pki, mode="none")
    with pytest.raises(ConfigError, match=r"security section says mode 'none'.*allow_insecure=True"):
        OpcUaPort(tag_map)

    async def scenario() -> None:
        async with _serving(tag_map, opcua_endpoint, None):
            port = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S, allow_insecure=True)
            await port.connect()
            assert port.security_policy_uri == "http://opcfoundation.org/UA/SecurityPolicy#None"
            await port.close()

    _run(scenario)


def test_unreadable_security_files_fail_when_the_port_is_built(pki, monkeypatch):
    monkeypatch.delenv("BIOREACTOR_MPC_OPCUA_PASSWORD", raising=False)
    monkeypatch.setenv("BIOREACTOR_MPC_OPCUA_USER", USER)
    with pytest.raises(ConfigError, match=r"security.password_env: the environment variable BIOREACTOR_MPC_OPCUA_PASSWORD is not set"):
        OpcUaPort(_tag_map(pki, **CREDENTIALS_FROM_ENV))
    with pytest.raises(ConfigError, match=r"security.password_file: .*opcua-password: file not found"):
        OpcUaPort(_tag_map(pki, username_env="BIOREACTOR_MPC_OPCUA_USER", password_file="opcua-password"))
    with pytest.raises(ConfigError, match=rf"security.certificate: {pki.root / 'own' / 'missing.der'}: certificate file not found"):
        OpcUaPort(_tag_map(pki, certificate="own/missing.der"))
    with pytest.raises(ConfigError, match=r"security.private_key: .*is not the key of the certificate"):
        OpcUaPort(_tag_map(pki, certificate="stranger/stranger.der"))
    (pki.root / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"security.trust_store: .*empty: holds no certificate"):
        OpcUaPort(_tag_map(pki, trust_store="empty"))
    shutil.copy(pki.server_cert, pki.client_trusts / "plc.crt")
    with pytest.raises(ConfigError, match=r"security.trust_store: .*plc.crt: a trusted certificate must be named \*.der or \*.pem"):
        OpcUaPort(_tag_map(pki))
    with pytest.raises(ConfigError, match="must not hold a user name or password") as in_url:
        OpcUaPort(_tag_map(pki), endpoint="opc.tcp://operator:secret@127.0.0.1:4840/")
    assert "secret" not in str(in_url.value)


def test_created_certificate_is_an_opc_ua_application_instance_certificate(tmp_path):
    cert_path, key_path = tmp_path / "pki" / "own" / "runtime.der", tmp_path / "pki" / "own" / "runtime.pem"
    made = create_certificate(
        cert_path,
        key_path,
        common_name="bioreactor-mpc edge01",
        organization="Example Biologics",
        application_uri="urn:edge01:bioreactor-mpc",
        hostnames=["edge01", "10.20.0.11"],
        days=730,
    )
    certificate = read_certificate(cert_path, field="certificate")
    assert certificate == made and cert_path.read_bytes()[:1] == b"\x30"  # DER
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----") and stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert certificate.public_key().key_size == 2048 and certificate.issuer == certificate.subject
    assert certificate.subject.rfc4514_string() == "O=Example Biologics,CN=bioreactor-mpc edge01"
    assert (certificate.not_valid_after_utc - certificate.not_valid_before_utc).days == 731  # back-dated a day for clock skew
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:edge01:bioreactor-mpc"]
    assert names.get_values_for_type(x509.DNSName) == ["edge01"] and names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.20.0.11")]
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment and usage.key_encipherment and usage.data_encipherment and usage.key_cert_sign
    extended = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(extended) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    with pytest.raises(FileExistsError, match="exists; not replaced"):
        create_certificate(cert_path, key_path, common_name="x", application_uri="urn:x", hostnames=[], days=1)
    create_certificate(cert_path, key_path, common_name="x", application_uri="urn:x", hostnames=[], days=1, overwrite=True)
    assert read_certificate(cert_path, field="certificate") != made
