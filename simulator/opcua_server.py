"""The simulated PLC served over OPC UA (asyncua), exactly as the tag map and the reference interface say.

Every mapped signal is a variable ``ns=<idx>;s=<node>`` in the map's
namespace, with the map's data type. :meth:`OpcUaPlcServer.publish` scans the
PLC and writes every value with its status (Good, or Bad for a failed probe or
an unmeasured lab field) and a wall-clock UTC source timestamp. A client's
write to a writable variable goes through the PLC's own logic: refused with
``BadUserAccessDenied`` while remote is disabled, ``BadOutOfRange`` outside the
equipment's range, and the old value stays.

The clocks (lockstep and free-running) are :class:`~simulator.clocks.PlcServerClocks`.

Security: without :class:`OpcUaServerSecurity` the server offers security mode
None only (127.0.0.1, tests, demos). With it, it offers only the configured
policy and mode (Basic256Sha256 SignAndEncrypt by default), with its own
certificate; a client whose certificate is not in the trusted directory
(directly or through a CA there) is refused, and so is a wrong user name or
password when users are configured. asyncua alone would still serve a session
on an unsecured channel (discovery needs one) and would check only the
certificate a client names in CreateSession; the server therefore also
requires, when a session is activated, that the channel itself is secured
with a trusted certificate.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog
from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.server.address_space import NodeData
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from interfaces.opcua_certificates import application_uri, certificate_validator, load_trust_store, read_certificate, read_private_key
from interfaces.opcua_port import VARIANT_TYPES
from interfaces.signals import SIGNALS
from interfaces.tagmap import OpcUaTagMap, SecurityPolicyName
from plant_models.errors import ConfigError, RemoteDisabledError, SetpointOutOfRangeError
from simulator.clocks import PlcServerClocks
from simulator.plc import SimulatedPlc

log = structlog.get_logger(__name__)

_DEFAULTS: dict[str, Any] = {"double": 0.0, "float": 0.0, "boolean": False, "string": ""}
_POLICY_TYPES: dict[tuple[str, str], ua.SecurityPolicyType] = {
    ("Basic256Sha256", "sign_and_encrypt"): ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ("Basic256Sha256", "sign"): ua.SecurityPolicyType.Basic256Sha256_Sign,
    ("Aes128_Sha256_RsaOaep", "sign_and_encrypt"): ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
    ("Aes128_Sha256_RsaOaep", "sign"): ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    ("Aes256_Sha256_RsaPss", "sign_and_encrypt"): ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
    ("Aes256_Sha256_RsaPss", "sign"): ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
}


@dataclass(frozen=True)
class OpcUaServerSecurity:
    """The simulated PLC's security: its certificate and key, the clients it trusts, its users.

    ``trusted_clients`` is a directory of trusted client (or CA) certificates,
    ``*.der`` or ``*.pem``. ``users`` maps user names to passwords; empty means
    anonymous sessions (over the secured channel only). The server's
    application URI is the one in its certificate.
    """

    certificate: Path
    private_key: Path
    trusted_clients: Path
    users: Mapping[str, str] = field(default_factory=dict, repr=False)
    policy: SecurityPolicyName = "Basic256Sha256"
    mode: Literal["sign_and_encrypt", "sign"] = "sign_and_encrypt"

    def __post_init__(self) -> None:
        if (self.policy, self.mode) not in _POLICY_TYPES:
            raise ConfigError(f"OPC UA server security: unknown policy {self.policy!r} or mode {self.mode!r}")


class _SecuredSessions(UserManager):
    """asyncua user manager: a session needs a channel secured with a trusted certificate, and a known user if there are users.

    asyncua hands the manager the certificate of the secure channel (empty on
    an unsecured one) together with the user token, so the check covers the
    channel that will carry the session, not only the certificate the client
    named in CreateSession.
    """

    def __init__(self, trust_store: TrustStore, users: Mapping[str, str]) -> None:
        self._trust_store = trust_store
        self._users = dict(users)

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None) -> User | None:
        if not certificate:
            log.info("opcua_session_refused", reason="unsecured channel")
            return None
        try:
            channel_certificate = x509.load_der_x509_certificate(certificate)
        except ValueError:
            log.info("opcua_session_refused", reason="unreadable channel certificate")
            return None
        if not self._trust_store.is_trusted(channel_certificate):
            log.info("opcua_session_refused", reason="untrusted channel certificate")
            return None
        if not self._users:
            return User(role=UserRole.User)
        expected = self._users.get(username or "")
        if expected is None or password is None or not hmac.compare_digest(password.encode(), expected.encode()):
            log.info("opcua_session_refused", reason="wrong user name or password", user=username)
            return None
        return User(role=UserRole.User, name=username)


def _raw(value: Any, type_name: str) -> Any:
    """A PLC value as the variable's Python type (NaN for a Bad real; 0 for a non-finite integer)."""
    if type_name in ("double", "float"):
        return float(value)
    if type_name == "boolean":
        return bool(value)
    if type_name == "string":
        return str(value)
    number = float(value)
    return int(number) if math.isfinite(number) else 0


class OpcUaPlcServer(PlcServerClocks):
    """An asyncua server in front of a :class:`~simulator.plc.SimulatedPlc`."""

    def __init__(self, plc: SimulatedPlc, tag_map: OpcUaTagMap, *, endpoint: str | None = None, security: OpcUaServerSecurity | None = None) -> None:
        super().__init__(plc)
        self.tag_map = tag_map
        self.endpoint = endpoint or tag_map.endpoint
        self.security = security
        self._server = Server()
        self._nodes: dict[str, ua.NodeId] = {}
        self._publishing = False
        self._scans: dict[str, tuple[float, datetime]] = {}

    async def start(self) -> None:
        server = self._server
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("bioreactor-mpc simulated reference PLC")
        if self.security is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            await self._secure(self.security)
        self._answer_writes_per_node()
        index = await server.register_namespace(self.tag_map.namespace_uri)
        folder = await server.nodes.objects.add_object(ua.NodeId("BR01", index), ua.QualifiedName("BR01", index))  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values
        snapshot = self.plc.snapshot()
        for name, tag in self.tag_map.tags.items():
            reading = snapshot.get(name)
            initial = _raw(tag.to_raw(reading.value), tag.type) if reading is not None else _DEFAULTS.get(tag.type, 0)
            node = await folder.add_variable(ua.NodeId(tag.node, index), ua.QualifiedName(name, index), ua.Variant(initial, VARIANT_TYPES[tag.type]))  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values
            if SIGNALS[name].writable:
                await node.set_writable()
                server.set_attribute_value_setter(node.nodeid, self._setter(name))
            self._nodes[name] = node.nodeid
        await server.start()
        await self.publish()
        security = "None" if self.security is None else f"{self.security.policy} {self.security.mode}"
        log.info("opcua_plc_started", endpoint=self.endpoint, namespace_index=index, variables=len(self._nodes), security=security)

    async def _secure(self, security: OpcUaServerSecurity) -> None:
        """Offer only the configured policy and mode, with the server's certificate; trust only the trusted clients."""
        server = self._server
        certificate = read_certificate(security.certificate, field="server certificate")
        key = read_private_key(security.private_key, field="server private key")
        uri = application_uri(certificate)
        if uri is None:
            raise ConfigError(f"server certificate: {security.certificate}: has no application URI in its SubjectAltName")
        await server.load_certificate(certificate.public_bytes(serialization.Encoding.DER))
        await server.load_private_key(key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        await server.set_application_uri(uri)
        server.set_security_policy([_POLICY_TYPES[(security.policy, security.mode)]])
        server.set_identity_tokens([ua.UserNameIdentityToken] if security.users else [ua.AnonymousIdentityToken])
        trust_store = await load_trust_store(security.trusted_clients, field="trusted client certificates")
        server.set_certificate_validator(certificate_validator(trust_store, peer="client"))
        server.iserver.set_user_manager(_SecuredSessions(trust_store, security.users))

    def _answer_writes_per_node(self) -> None:
        """Answer a multi-value write with one status per value, as a PLC does.

        asyncua turns an exception raised by a value setter into a service
        fault for the whole request (values before it applied, after it not,
        and the client cannot tell which). Each value is written on its own
        here, and a refused one answers its own status code.
        """
        service = self._server.iserver.attribute_service
        write_all = service.write

        async def write_each(params: ua.WriteParameters, user: Any = None) -> list[ua.StatusCode]:
            results: list[ua.StatusCode] = []
            for item in params.NodesToWrite:
                single = ua.WriteParameters(NodesToWrite=[item])
                try:
                    results.extend(await (write_all(single, user=user) if user is not None else write_all(single)))
                except ua.UaStatusCodeError as error:
                    results.append(ua.StatusCode(error.code))
            return results

        service.write = write_each  # type: ignore[method-assign]

    async def stop(self) -> None:
        await self._server.stop()

    async def publish(self) -> None:
        """Scan the PLC and write every mapped value with its status and a wall-clock source timestamp."""
        now = datetime.now(UTC)
        snapshot = self.plc.snapshot()
        self._publishing = True
        try:
            for name, tag in self.tag_map.tags.items():
                reading = snapshot.get(name)
                if reading is None:
                    continue
                status = ua.StatusCode(ua.StatusCodes.Good if reading.good else ua.StatusCodes.Bad)  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values
                variant = ua.Variant(_raw(tag.to_raw(reading.value), tag.type), VARIANT_TYPES[tag.type])
                scanned = self._source_time(name, reading.scanned_at_h, now)
                await self._server.write_attribute_value(self._nodes[name], ua.DataValue(variant, StatusCode=status, SourceTimestamp=scanned, ServerTimestamp=now))  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values
        finally:
            self._publishing = False

    def _source_time(self, name: str, scanned_at_h: float, now: datetime) -> datetime:
        """The wall-clock time the PLC scanned a value: now, unless the scan is the same as last publish (a stale probe)."""
        last = self._scans.get(name)
        if last is not None and last[0] == scanned_at_h:
            return last[1]
        self._scans[name] = (scanned_at_h, now)
        return now

    def _setter(self, name: str) -> Any:
        def setter(node: NodeData, attr: ua.AttributeIds, value: ua.DataValue) -> None:
            attribute = node.attributes[attr]
            if self._publishing:
                attribute.value = value
                return
            requested = value.Value.Value if value.Value is not None else None
            before = self.plc.heartbeat
            try:
                self.plc.write(name, self.tag_map.tags[name].to_engineering(requested))
            except RemoteDisabledError as error:
                log.info("opcua_write_refused", tag=name, value=requested, reason=str(error))
                raise ua.UaStatusCodeError(ua.StatusCodes.BadUserAccessDenied) from error
            except (SetpointOutOfRangeError, TypeError, ValueError) as error:
                log.info("opcua_write_refused", tag=name, value=requested, reason=str(error))
                raise ua.UaStatusCodeError(ua.StatusCodes.BadOutOfRange) from error
            now = datetime.now(UTC)
            attribute.value = ua.DataValue(value.Value, SourceTimestamp=now, ServerTimestamp=now)  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values
            if self.plc.heartbeat != before:
                self.heartbeat_moved.set()

        return setter
