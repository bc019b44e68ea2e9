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
None only, and every client may read and write (a test-only mode: 127.0.0.1,
quick software-in-the-loop runs, demos). With it, it offers only the
configured policy and mode (Basic256Sha256 SignAndEncrypt by default), with
its own certificate; a client whose certificate is not in the trusted
directory (directly or through a CA there) is refused, and so is a wrong user
name or password when users are configured. asyncua alone would still serve a
session on an unsecured channel (discovery needs one) and would check only
the certificate a client names in CreateSession; the server therefore also
requires, when a session is activated, that the channel itself is secured
with a trusted certificate.

Access, secured: only the *writers* may write, as a PLC gives write rights to
the runtime's identity alone. A session is a writer when its channel's
certificate is one of ``writer_certificates`` (`plc-sim`: the runtime's by default) or
its user is one of ``writer_users``; every other trusted client (an
operator's HMI, a historian) reads, browses and subscribes but may not write
or call methods. It is done with asyncua's own mechanisms: the user manager
gives each session a :class:`PlcUser` (the writer certificates matched by
asyncua's :class:`~asyncua.server.user_managers.CertificateUserManager`), a
:class:`~asyncua.crypto.permission_rules.PermissionRuleset` refuses a
reader's Write and Call requests with ``BadUserAccessDenied``, and the
``UserAccessLevel`` a reader reads of a writable variable lacks CurrentWrite,
as a PLC reports it per user.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import structlog
from asyncua import Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import SimpleRoleRuleset, User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator
from asyncua.server.address_space import NodeData
from asyncua.server.user_managers import CertificateUserManager, UserManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from interfaces.opcua_certificates import application_uri, certificate_validator, fingerprint, load_trust_store, read_certificate, read_private_key, validity_problem
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
    """The simulated PLC's security: its certificate and key, the clients it trusts, its users, and who may write.

    ``trusted_clients`` is a directory of trusted client (or CA) certificates,
    ``*.der`` or ``*.pem``. ``users`` maps user names to passwords; empty means
    anonymous sessions (over the secured channel only). The server's
    application URI is the one in its certificate.

    ``writer_certificates`` (certificate files, each trusted by
    ``trusted_clients``) and ``writer_users`` (names in ``users``) say whose
    sessions may write: the runtime's identity. Every other trusted client is
    read-only. At least one writer is needed: a PLC nobody may write to would
    refuse the runtime too.
    """

    certificate: Path
    private_key: Path
    trusted_clients: Path
    users: Mapping[str, str] = field(default_factory=dict, repr=False)
    policy: SecurityPolicyName = "Basic256Sha256"
    mode: Literal["sign_and_encrypt", "sign"] = "sign_and_encrypt"
    writer_certificates: tuple[Path, ...] = ()
    writer_users: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if (self.policy, self.mode) not in _POLICY_TYPES:
            raise ConfigError(f"OPC UA server security: unknown policy {self.policy!r} or mode {self.mode!r}")
        if isinstance(self.writer_certificates, str | Path) or isinstance(self.writer_users, str):
            raise ConfigError("OPC UA server security: writer_certificates is a tuple of paths and writer_users a set of names, not a single value")
        unknown = sorted(set(self.writer_users) - set(self.users))
        if unknown:
            raise ConfigError(
                f"OPC UA server security: writer_users: {', '.join(map(repr, unknown))}: not a user (the users: {', '.join(sorted(self.users)) or 'none configured'})"
            )
        if not self.writer_certificates and not self.writer_users:
            raise ConfigError(
                "OPC UA server security: no writer (writer_certificates or writer_users): every client would be read-only, the runtime too; "
                "name the runtime's certificate (bioreactor-mpc certs) as a writer"
            )


DEFAULT_WRITER_CERTIFICATE_NAME = "runtime.der"
"""The runtime's certificate in the PLC's trusted directory, as docs/opcua-security.md names it: ``plc-sim``'s writer by default."""


def read_users_file(path: Path) -> dict[str, str]:
    """The simulated PLC's users from a file of ``name:password`` lines (``#`` comments and blank lines skipped), mode 0600.

    A problem is a :class:`ConfigError` naming the file and the line; the
    password never appears in a message.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"users file: {path}: not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"users file: {path}: not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(f"users file: {path}: cannot read it ({error.strerror})") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, colon, password = line.partition(":")
        name = name.strip()
        if not colon or not name or not password:
            raise ConfigError(f"users file: {path}: line {number}: expected 'name:password' with both parts non-empty")
        if name in users:
            raise ConfigError(f"users file: {path}: line {number}: user {name!r} appears twice")
        users[name] = password
    if not users:
        raise ConfigError(f"users file: {path}: holds no 'name:password' line")
    return users


class Access(Enum):
    """What a session may do to the PLC's variables."""

    READ = "read"
    WRITE = "write"


@dataclass
class PlcUser(User):
    """asyncua's session user, with the session's access: a writer (the runtime's identity) or read-only."""

    access: Access = Access.READ


_WRITING_SERVICES = frozenset(
    ua.NodeId(ua.Int32(service))
    for service in (ua.ObjectIds.WriteRequest_Encoding_DefaultBinary, ua.ObjectIds.CallRequest_Encoding_DefaultBinary, ua.ObjectIds.HistoryUpdateRequest_Encoding_DefaultBinary)
)
"""The services that change the PLC (Write, Call, HistoryUpdate): a writer's only."""


class _WriteRights:
    """Whether a session may write now: a writer's, unless the PLC's administrator withdrew the writers' rights while sessions are open."""

    def __init__(self) -> None:
        self.granted = True

    def allow(self, user: Any) -> bool:
        return self.granted and isinstance(user, PlcUser) and user.access is Access.WRITE


class _PlcAccessRules(SimpleRoleRuleset):
    """asyncua's permission ruleset, with the writers' services kept for writers.

    asyncua's :class:`SimpleRoleRuleset` decides by role (nobody here is an
    Admin, so nobody changes the address space); on top of it a Write, Call or
    HistoryUpdate request of a read-only session is refused, which asyncua
    answers with a ``BadUserAccessDenied`` service fault: nothing of the
    request is applied.
    """

    def __init__(self, rights: _WriteRights) -> None:
        super().__init__()
        self._rights = rights

    def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
        if not super().check_validity(user, action_type_id, body):
            return False
        if action_type_id in _WRITING_SERVICES and not self._rights.allow(user):
            log.info("opcua_write_refused", user=getattr(user, "name", None), reason="read-only session: only the runtime's identity may write")
            return False
        return True


def _logging_refusals(validator: CertificateValidator) -> Any:
    """asyncua's client certificate check, saying once which certificate it refused (as a PLC lists rejected certificates)."""

    async def validate(certificate: x509.Certificate, description: ua.ApplicationDescription) -> None:
        try:
            await validator(certificate, description)
        except ServiceError as error:
            log.info(
                "opcua_client_refused",
                reason=ua.StatusCode(ua.UInt32(error.code)).name,
                certificate_sha256=fingerprint(certificate),
                subject=certificate.subject.rfc4514_string(),
                application_uri=description.ApplicationUri,
            )
            raise

    return validate


class _PlcSessions(UserManager):
    """asyncua user manager: a session needs a channel secured with a trusted certificate, and a known user if there are users; writers write.

    asyncua hands the manager the certificate of the secure channel (empty on
    an unsecured one) together with the user token, so the check covers the
    channel that will carry the session, not only the certificate the client
    named in CreateSession. A session is a writer when that certificate is a
    writer certificate (asyncua's :class:`CertificateUserManager` matches it)
    or its user is a writer user; read-only otherwise.
    """

    def __init__(self, trust_store: TrustStore, users: Mapping[str, str], writer_certificates: CertificateUserManager, writer_users: frozenset[str]) -> None:
        self._trust_store = trust_store
        self._users = dict(users)
        self._writer_certificates = writer_certificates
        self._writer_users = writer_users

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
            log.info("opcua_session_refused", reason="untrusted channel certificate", certificate_sha256=fingerprint(channel_certificate))
            return None
        name: str | None = None
        if self._users:
            expected = self._users.get(username or "")
            if expected is None or password is None or not hmac.compare_digest(password.encode(), expected.encode()):
                log.info("opcua_session_refused", reason="wrong user name or password", user=username)
                return None
            name = username
        writer_by_certificate = self._writer_certificates.get_user(iserver, certificate=bytes(certificate)) is not None
        access = Access.WRITE if writer_by_certificate or (name is not None and name in self._writer_users) else Access.READ
        log.info("opcua_session_opened", user=name, certificate_sha256=fingerprint(channel_certificate), access=access.value)
        return PlcUser(role=UserRole.User, name=name or channel_certificate.subject.rfc4514_string(), access=access)


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
        self._writable: set[ua.NodeId] = set()
        self._rights = _WriteRights()
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
                self._writable.add(node.nodeid)
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
        trust_store = await load_trust_store(security.trusted_clients, field="trusted client certificates")
        writer_certificates = CertificateUserManager()
        for path in security.writer_certificates:
            writer = read_certificate(path, field="writer certificate")
            invalid = validity_problem(writer)
            if invalid is not None:
                raise ConfigError(f"writer certificate: {path}: {invalid}")
            if not trust_store.is_trusted(writer):
                raise ConfigError(
                    f"writer certificate: {path}: not trusted by {security.trusted_clients} (SHA-256 {fingerprint(writer)}); a writer must be a trusted client: copy it there too"
                )
            await writer_certificates.add_role(writer.public_bytes(serialization.Encoding.DER), UserRole.User, name=fingerprint(writer), format="der")  # type: ignore[arg-type]  # asyncua loads a path or the certificate's bytes; annotated as a path
        server.set_security_policy([_POLICY_TYPES[(security.policy, security.mode)]], permission_ruleset=_PlcAccessRules(self._rights))
        server.set_identity_tokens([ua.UserNameIdentityToken] if security.users else [ua.AnonymousIdentityToken])
        server.set_certificate_validator(_logging_refusals(certificate_validator(trust_store, peer="client")))
        server.iserver.set_user_manager(_PlcSessions(trust_store, security.users, writer_certificates, security.writer_users))
        server.subscribe_server_callback(CallbackType.PostRead, self._user_access_level)

    def _user_access_level(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        """A read-only session reads the UserAccessLevel of a writable variable without CurrentWrite, as a PLC reports its rights per user."""
        if not event.is_external or self._rights.allow(event.user) or event.response_params is None:
            return
        writable = self._writable
        for index, item in enumerate(event.request_params.NodesToRead):
            if item.AttributeId != ua.AttributeIds.UserAccessLevel or item.NodeId not in writable:
                continue
            answer: ua.DataValue = event.response_params[index]
            if answer.Value is not None and isinstance(answer.Value.Value, int):
                level = answer.Value.Value & ~ua.AccessLevel.CurrentWrite.mask
                event.response_params[index] = ua.DataValue(ua.Variant(level, ua.VariantType.Byte), StatusCode=answer.StatusCode)

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

    def grant_write_rights(self, granted: bool) -> None:
        """Secured: grant the writers their rights (the default), or withdraw them while sessions are open, as a PLC's administrator can.

        Withdrawn, every session is read-only: writes are refused with
        ``BadUserAccessDenied`` and ``UserAccessLevel`` lacks CurrentWrite.
        Security mode None has no rights to withdraw.
        """
        if self.security is None:
            raise ConfigError("write rights: the server runs with security mode None, where every client may write; serve it secured (OpcUaServerSecurity)")
        self._rights.granted = granted
        log.info("opcua_write_rights_changed", granted=granted)

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
