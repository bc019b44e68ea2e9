"""Who may write to the PLC: the runtime's identity only, and a runtime the PLC refuses waits, alarms and writes nothing.

The simulated PLC is served secured on 127.0.0.1 (SignAndEncrypt, every
certificate made with ``create_certificate`` in tmp_path, hil_tests/opcua_pki.py).
An operator's HMI is a client the PLC trusts but gives no write rights: it
reads everything and is refused every write with ``BadUserAccessDenied``. The
runtime's certificate (or a user with write rights) writes. A runtime whose
certificate the PLC does not trust is refused at every connect; the runtime
then backs off exponentially to a cap, raises one alarm that says what to do,
logs each refusal as one line without a traceback, and writes nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from opcua_pki import SitePki, make_site_pki, plc_security, secured_tag_map, serving, serving_server
from runtime_harness import TEST_SETTINGS
from structlog.testing import capture_logs

from controller.mpc import EconomicMpc
from controller.ports import PlcAuthError, Reading, Value
from controller.runtime import Runtime
from interfaces.history import SqliteHistory
from interfaces.opcua_certificates import fingerprint, read_certificate
from interfaces.opcua_port import OpcUaPort
from interfaces.signals import SIGNALS
from plant_models.cho import CultureModel
from plant_models.errors import ConfigError
from plant_models.parameters import parameter_vector
from simulator.config import load_simulation
from simulator.opcua_server import OpcUaServerSecurity
from simulator.plc import SimulatedPlc

pytestmark = [pytest.mark.hil, pytest.mark.security]

REPO = Path(__file__).resolve().parent.parent
NAMESPACE = "urn:bioreactor-mpc:reference-plc"
TIMEOUT_S = 3.0
RUNTIME_USER, RUNTIME_PASSWORD = "bioreactor-mpc", "runtime password, long enough"
OPERATOR_USER, OPERATOR_PASSWORD = "operator", "operator password, long enough"


@pytest.fixture
def site(tmp_path: Path) -> SitePki:
    return make_site_pki(tmp_path)


@pytest.fixture
def structlog_uncached() -> Iterator[None]:
    """structlog's capture_logs needs loggers that are not cached (a CLI test run before this one configures caching)."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


def _run(scenario: Callable[[], Coroutine[Any, Any, None]], timeout_s: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=timeout_s))


async def _operator_client(site: SitePki, endpoint: str, *, user: str | None = None, password: str | None = None) -> Client:
    """An operator's HMI: a plain OPC UA client with its own certificate, which the PLC trusts."""
    client = Client(endpoint, timeout=TIMEOUT_S)
    client.application_uri = "urn:test:operator-hmi"
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        certificate=str(site.operator_cert),
        private_key=str(site.operator_key),
        server_certificate=str(site.plc_cert),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    if user is not None and password is not None:
        client.set_user(user)
        client.set_password(password)
    return client


def _plc_values(plc: SimulatedPlc) -> dict[str, Value]:
    snapshot = plc.snapshot()
    return {name: snapshot[name].value for name in ("SP.FeedRate", "SP.GlucoseRate", "SP.Temperature", "SP.HarvestRequest", "MPC.Mode")} | {"MPC.Heartbeat": plc.heartbeat}


def _write_status(error: ua.UaStatusCodeError) -> str:
    return ua.StatusCode(ua.UInt32(error.code)).name


def test_a_trusted_operator_reads_but_may_not_write_and_the_runtime_writes(site, opcua_endpoint):
    runtime_map = secured_tag_map(site, certificate=site.runtime_cert, private_key=site.runtime_key)

    async def scenario() -> None:
        async with serving(runtime_map, opcua_endpoint, plc_security(site)) as plc:
            before = _plc_values(plc)
            operator = await _operator_client(site, opcua_endpoint)
            async with operator:
                index = await operator.get_namespace_index(NAMESPACE)
                feed = operator.get_node(f"ns={index};s=BR01.SP.FeedRate")
                volume = operator.get_node(f"ns={index};s=BR01.PV.Volume")
                # It reads what the PLC holds, setpoints included.
                assert await feed.read_value() == pytest.approx(float(before["SP.FeedRate"]))
                assert await volume.read_value() == pytest.approx(1400.0, abs=10.0)
                # The PLC tells it, per user, that it may not write: AccessLevel has CurrentWrite, its UserAccessLevel not.
                access = (await feed.read_attribute(ua.AttributeIds.AccessLevel)).Value.Value
                user_access = (await feed.read_attribute(ua.AttributeIds.UserAccessLevel)).Value.Value
                assert access & ua.AccessLevel.CurrentWrite.mask and access & ua.AccessLevel.CurrentRead.mask
                assert user_access & ua.AccessLevel.CurrentRead.mask and not user_access & ua.AccessLevel.CurrentWrite.mask
                # Every runtime-written signal refuses it, alone or several in one request.
                for node_name, variant in (
                    ("SP.FeedRate", ua.Variant(9.0, ua.VariantType.Double)),
                    ("SP.HarvestRequest", ua.Variant(True, ua.VariantType.Boolean)),
                    ("MPC.Heartbeat", ua.Variant(ua.UInt32(999), ua.VariantType.UInt32)),
                    ("MPC.Mode", ua.Variant(ua.Int32(2), ua.VariantType.Int32)),
                ):
                    with pytest.raises(ua.UaStatusCodeError) as refused:
                        await operator.get_node(f"ns={index};s=BR01.{node_name}").write_value(ua.DataValue(variant))
                    assert _write_status(refused.value) == "BadUserAccessDenied", node_name
                nodes = [operator.get_node(f"ns={index};s=BR01.{name}") for name in ("SP.FeedRate", "SP.Temperature")]
                with pytest.raises(ua.UaStatusCodeError) as refused_both:
                    await operator.write_values(nodes, [ua.DataValue(ua.Variant(8.0, ua.VariantType.Double)), ua.DataValue(ua.Variant(30.0, ua.VariantType.Double))])
                assert _write_status(refused_both.value) == "BadUserAccessDenied"
            assert _plc_values(plc) == before, "nothing the operator sent reached the PLC"

            # The runtime's identity writes, with the same PLC and the same trust list.
            port = OpcUaPort(runtime_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S)
            await port.connect()
            try:
                await port.write({"SP.FeedRate": 2.5, "MPC.Heartbeat": int(before["MPC.Heartbeat"]) + 1, "MPC.Mode": 2})
            finally:
                await port.close()
            after = _plc_values(plc)
            assert (after["SP.FeedRate"], after["MPC.Heartbeat"], after["MPC.Mode"]) == (2.5, int(before["MPC.Heartbeat"]) + 1, 2)

    _run(scenario)


def test_the_runtimes_port_with_a_read_only_identity_is_refused_at_connect(site, opcua_endpoint, caplog):
    """A runtime configured with a certificate the PLC trusts but gives no write rights learns it at connect, before any write."""
    operator_map = secured_tag_map(site, certificate=site.operator_cert, private_key=site.operator_key, name="operator-map")
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        async with serving(operator_map, opcua_endpoint, plc_security(site)) as plc:
            before = _plc_values(plc)
            port = OpcUaPort(operator_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S, auth_retry_after_s=60.0)
            with pytest.raises(PlcAuthError) as refused:
                await port.connect()
            message = str(refused.value)
            named = re.search(r"the PLC gives this session no write rights on (.*?) \(their UserAccessLevel lacks CurrentWrite for this runtime's identity", message)
            assert named is not None, message
            assert set(named.group(1).split(", ")) == {name for name in operator_map.tags if SIGNALS[name].writable}  # SP.*, MPC.*: every signal the runtime writes
            assert fingerprint(read_certificate(site.operator_cert, field="certificate")) in message and str(site.operator_cert) in message
            assert "give the runtime's certificate write rights" in message
            assert refused.value.retry_after_s == 60.0 and not port.connected and port.auth_refusals == 1
            assert _plc_values(plc) == before

    _run(scenario)
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []


def test_a_user_with_write_rights_writes_and_another_user_only_reads(site, opcua_endpoint, monkeypatch):
    """User-based rights (as a PLC's user management gives them): the same trusted certificate, two users, one of them a writer."""
    security = plc_security(
        site,
        users={RUNTIME_USER: RUNTIME_PASSWORD, OPERATOR_USER: OPERATOR_PASSWORD},
        writer_certificates=(),
        writer_users=frozenset({RUNTIME_USER}),
    )
    credentials = {"username_env": "PLC_ACCESS_TEST_USER", "password_env": "PLC_ACCESS_TEST_PASSWORD"}
    tag_map = secured_tag_map(site, certificate=site.runtime_cert, private_key=site.runtime_key, **credentials)

    async def scenario() -> None:
        async with serving(tag_map, opcua_endpoint, security) as plc:
            monkeypatch.setenv("PLC_ACCESS_TEST_USER", OPERATOR_USER)
            monkeypatch.setenv("PLC_ACCESS_TEST_PASSWORD", OPERATOR_PASSWORD)
            as_operator = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S)
            with pytest.raises(
                PlcAuthError,
                match=r"no write rights on .*SP.FeedRate.* and user 'operator' \(from \$PLC_ACCESS_TEST_USER\)\)\); on the PLC, give the runtime's user, or its certificate, write rights",
            ):
                await as_operator.connect()
            monkeypatch.setenv("PLC_ACCESS_TEST_USER", RUNTIME_USER)
            monkeypatch.setenv("PLC_ACCESS_TEST_PASSWORD", RUNTIME_PASSWORD)
            as_runtime = OpcUaPort(tag_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S)
            await as_runtime.connect()
            try:
                await as_runtime.write({"SP.FeedRate": 3.25})
            finally:
                await as_runtime.close()
            assert plc.snapshot()["SP.FeedRate"].value == 3.25
            # An operator's HMI with its own certificate and the operator's user reads and may not write.
            operator = await _operator_client(site, opcua_endpoint, user=OPERATOR_USER, password=OPERATOR_PASSWORD)
            async with operator:
                feed = operator.get_node(f"ns={await operator.get_namespace_index(NAMESPACE)};s=BR01.SP.FeedRate")
                assert await feed.read_value() == 3.25
                with pytest.raises(ua.UaStatusCodeError) as refused:
                    await feed.write_value(ua.DataValue(ua.Variant(0.0, ua.VariantType.Double)))
                assert _write_status(refused.value) == "BadUserAccessDenied"
            assert plc.snapshot()["SP.FeedRate"].value == 3.25

    _run(scenario)


def test_write_rights_withdrawn_mid_session_refuse_the_write_as_an_auth_error_and_back_off(site, opcua_endpoint, caplog):
    """The PLC's administrator withdraws the runtime's write rights while it is connected: the write is refused whole, nothing applied,
    the port drops the session and asks for a longer wait at each refusal, and starts again from the first wait once a write goes through."""
    runtime_map = secured_tag_map(site, certificate=site.runtime_cert, private_key=site.runtime_key)
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        async with serving_server(runtime_map, opcua_endpoint, plc_security(site)) as server:
            plc = server.plc
            port = OpcUaPort(runtime_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S, auth_retry_after_s=10.0, auth_retry_max_s=25.0)
            await port.connect()
            before = _plc_values(plc)
            server.grant_write_rights(False)
            with pytest.raises(PlcAuthError) as refused:
                await port.write({"SP.FeedRate": 4.0, "MPC.Heartbeat": int(before["MPC.Heartbeat"]) + 1})
            message = str(refused.value)
            assert "the PLC refused the write of SP.FeedRate, MPC.Heartbeat as a whole (BadUserAccessDenied)" in message
            assert "nothing of it was applied" in message and fingerprint(read_certificate(site.runtime_cert, field="certificate")) in message
            assert refused.value.retry_after_s == 10.0 and not port.connected
            assert _plc_values(plc) == before
            # Reconnecting, the port sees the missing rights before writing, and waits longer.
            with pytest.raises(PlcAuthError, match="the PLC gives this session no write rights on") as at_connect:
                await port.connect()
            assert at_connect.value.retry_after_s == 20.0 and not port.connected
            with pytest.raises(PlcAuthError) as again:
                await port.connect()
            assert again.value.retry_after_s == 25.0 and port.auth_refusals == 3  # capped
            server.grant_write_rights(True)
            await port.connect()
            assert port.auth_refusals == 3  # a connect does not prove the rights a write lacked
            await port.write({"SP.FeedRate": 4.0})
            assert port.auth_refusals == 0 and port.next_auth_wait_s() == 10.0 and plc.snapshot()["SP.FeedRate"].value == 4.0
            await port.close()

    _run(scenario)
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []


def test_the_plc_security_names_a_writer_that_can_connect(site, opcua_endpoint):
    with pytest.raises(ConfigError, match=r"no writer \(writer_certificates or writer_users\): every client would be read-only, the runtime too"):
        OpcUaServerSecurity(certificate=site.plc_cert, private_key=site.plc_key, trusted_clients=site.plc_trusts)
    with pytest.raises(ConfigError, match=r"writer_users: 'nobody': not a user \(the users: operator\)"):
        plc_security(site, users={OPERATOR_USER: OPERATOR_PASSWORD}, writer_users=frozenset({"nobody"}))

    async def start_with_untrusted_writer() -> None:
        async with serving(
            secured_tag_map(site, certificate=site.runtime_cert, private_key=site.runtime_key),
            opcua_endpoint,
            plc_security(site, writer_certificates=(site.stranger_cert,)),
        ):
            pytest.fail("a PLC whose writer it does not trust started")

    with pytest.raises(ConfigError, match=rf"writer certificate: {site.stranger_cert}: not trusted by {site.plc_trusts} \(SHA-256 .*\); a writer must be a trusted client"):
        _run(start_with_untrusted_writer)


class RecordingPort:
    """The runtime's PLC port, with the wall time of every connect attempt and every write the runtime asked for."""

    def __init__(self, port: OpcUaPort) -> None:
        self.port = port
        self.connects: list[float] = []
        self.writes: list[Mapping[str, Value]] = []

    @property
    def connected(self) -> bool:
        return self.port.connected

    async def connect(self) -> None:
        self.connects.append(time.monotonic())
        await self.port.connect()

    async def close(self) -> None:
        await self.port.close()

    async def read(self) -> dict[str, Reading]:
        return await self.port.read()

    async def write(self, values: Mapping[str, Value]) -> None:
        self.writes.append(dict(values))
        await self.port.write(values)


FIRST_WAIT_S, MAX_WAIT_S = 0.25, 1.0
"""The test's back-off: 0.25, 0.5, 1.0, 1.0, ... s (production: 300 s doubling to 1800 s)."""
RUN_FOR_S = 4.5
HANDSHAKE_ALLOWANCE_S = 1.5
"""What a refused attempt itself may take on a loaded machine (discovery, the RSA handshake, the refusal), on top of the wait."""


def test_an_untrusted_runtime_certificate_backs_off_with_one_alarm_no_traceback_and_no_write(site, opcua_endpoint, tmp_path, caplog, capsys, structlog_uncached):
    (site.plc_trusts / "runtime.der").unlink()  # the PLC's administrator has not imported the runtime's certificate yet
    runtime_map = secured_tag_map(site, certificate=site.runtime_cert, private_key=site.runtime_key)
    runtime_fingerprint = fingerprint(read_certificate(site.runtime_cert, field="certificate"))
    loaded = load_simulation(REPO / "configs" / "simulate" / "platform.yaml")
    caplog.set_level(logging.DEBUG)
    outcome: dict[str, Any] = {}

    async def scenario() -> None:
        async with serving(runtime_map, opcua_endpoint, plc_security(site, writer_certificates=(site.operator_cert,))) as plc:
            before = _plc_values(plc)
            port = RecordingPort(OpcUaPort(runtime_map, endpoint=opcua_endpoint, timeout_s=TIMEOUT_S, auth_retry_after_s=FIRST_WAIT_S, auth_retry_max_s=MAX_WAIT_S))
            history = SqliteHistory(tmp_path / "history.sqlite")
            runtime = Runtime(
                port=port,
                history=history,
                batch=loaded.batch,
                nominal_parameters=parameter_vector(loaded.nominal, loaded.batch.media),
                settings=TEST_SETTINGS,
                mpc=EconomicMpc(CultureModel(), loaded.batch, TEST_SETTINGS.nmpc.mpc),
            )
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(RUN_FOR_S, stop.set)
            started = time.monotonic()
            summary = await runtime.run(stop=stop)
            outcome.update(
                connects=[at - started for at in port.connects],
                writes=port.writes,
                alarms=runtime.alarms,
                link_losses=summary.link_losses,
                refusals=port.port.auth_refusals,
                plc_before=before,
                plc_after=_plc_values(plc),
            )
            history.close()

    with capture_logs() as events:
        _run(scenario)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err

    # Bounded, backed-off attempts: the runtime waited at least the port's wait, which doubled up to its cap.
    connects = outcome["connects"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(connects)]
    expected = [min(FIRST_WAIT_S * 2**k, MAX_WAIT_S) for k in range(len(gaps))]
    print(f"connect attempts at {[round(t, 3) for t in connects]} s; gaps {[round(g, 3) for g in gaps]} s; waits asked {expected} s")
    assert 3 <= len(connects) <= 1 + math.ceil(RUN_FOR_S / FIRST_WAIT_S), connects
    assert len(connects) <= 7, f"more attempts than a back-off of 0.25, 0.5, 1, 1, ... s allows in {RUN_FOR_S} s: {connects}"
    for gap, wait in zip(gaps, expected, strict=True):
        assert wait - 0.02 <= gap <= wait + HANDSHAKE_ALLOWANCE_S, (gaps, expected)
    assert outcome["refusals"] == len(connects)

    # One alarm, naming the cause and what to do.
    alarm = outcome["alarms"]["plc_link"]
    print(f"alarm: {alarm}")
    assert f"the PLC does not trust this runtime's certificate (BadCertificateUntrusted), SHA-256 {runtime_fingerprint}" in alarm
    assert f"add {site.runtime_cert} to the PLC's trusted client certificates" in alarm
    raised = [event for event in events if event["event"] == "alarm_raised"]
    assert [event["code"] for event in raised] == ["plc_link"] and outcome["link_losses"] == 1

    # Each refusal logged once, as one structured line with the wait, and nothing logs a traceback.
    refusals = [event for event in events if event["event"] == "opcua_access_refused"]
    assert [event["refusals_in_a_row"] for event in refusals] == list(range(1, len(connects) + 1))
    assert [event["retry_after_s"] for event in refusals] == [min(FIRST_WAIT_S * 2**k, MAX_WAIT_S) for k in range(len(connects))]
    assert all(runtime_fingerprint in event["reason"] for event in refusals)
    plc_side = [event for event in events if event["event"] == "opcua_client_refused"]  # the PLC lists the certificate it refused, as a PLC's rejected list
    assert [(event["reason"], event["certificate_sha256"]) for event in plc_side] == [("BadCertificateUntrusted", runtime_fingerprint)] * len(connects)
    assert not [event for event in events if "exc_info" in event or "exception" in event]
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []
    assert not [record.getMessage() for record in caplog.records if record.name.startswith("asyncua.client") and record.levelno >= logging.WARNING], (
        "asyncua's own warnings about the refusal are not logged again"
    )

    # Nothing written: the runtime asked for no write, and the PLC holds what it held.
    assert outcome["writes"] == []
    assert outcome["plc_after"] == outcome["plc_before"]
