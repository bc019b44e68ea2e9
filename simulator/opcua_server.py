"""The simulated PLC served over OPC UA (asyncua), exactly as the tag map and the reference interface say.

Address space (docs/plc-simulator.md): an object for the unit (``BR01``) under
Objects, and under it a folder per group of the signal's name (``PV``, ``SP``,
``Sample``, ``Status``, ``MPC`` with ``Rec`` and ``Pred``, ``Sim``); each
variable's browse name is the last part of the signal's name
(``BR01/PV/Temperature``) and its node id is the tag map's, unchanged
(``ns=<idx>;s=BR01.PV.Temperature``), with the map's data type. A real signal
(temperature, volume, a rate, a lab value, a time) is an ``AnalogItemType``
with the ``EURange`` and ``EngineeringUnits`` properties (UNECE units, from
:data:`interfaces.signals.SIGNALS`); the setpoints' EURange is the equipment's
range, outside which a write is refused. The server names itself
(ApplicationUri, ProductUri, BuildInfo with the package's version) instead of
asyncua's defaults.

:meth:`OpcUaPlcServer.publish` scans the PLC and writes every value with its
status (Good, or Bad for a failed probe or an unmeasured lab field) and a
wall-clock UTC source timestamp: the moment of the scan that produced it. A
client's write to a writable variable goes through the PLC's own logic:
refused with ``BadUserAccessDenied`` while remote is disabled,
``BadOutOfRange`` outside the equipment's range, and the old value stays.

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

import contextlib
import hmac
import importlib.metadata
import math
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import structlog
from asyncua import Node, Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import SimpleRoleRuleset, User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator
from asyncua.server.address_space import NodeData
from asyncua.server.user_managers import CertificateUserManager, UserManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller.config import BatchConfig
from interfaces.opcua_certificates import application_uri, certificate_validator, fingerprint, load_trust_store, read_certificate, read_private_key, validity_problem
from interfaces.opcua_port import VARIANT_TYPES
from interfaces.signals import SIGNALS, Kind
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


PACKAGE = "bioreactor-mpc"
PRODUCT_URI = "urn:bioreactor-mpc:plc-sim"
PRODUCT_NAME = "bioreactor-mpc simulated reference PLC"
MANUFACTURER_NAME = "bioreactor-mpc project"


def default_application_uri() -> str:
    """The simulated PLC's ApplicationUri without a certificate: unique per host, as OPC UA asks (``urn:<host>:bioreactor-mpc:plc-sim``)."""
    return f"urn:{socket.gethostname()}:bioreactor-mpc:plc-sim"


def build_info() -> tuple[str, datetime]:
    """The package's version and the time its installed metadata was written (the build date a PLC's BuildInfo shows)."""
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown", datetime(1970, 1, 1, tzinfo=UTC)
    built = datetime(1970, 1, 1, tzinfo=UTC)
    for file in distribution.files or ():
        if file.name in ("METADATA", "PKG-INFO"):
            with contextlib.suppress(OSError):
                built = datetime.fromtimestamp(Path(str(distribution.locate_file(file))).stat().st_mtime, UTC)
            break
    return distribution.version, built


UNECE_UNITS_URI = "http://www.opcfoundation.org/UA/units/un/cefact"
"""The namespace of ``EUInformation`` units taken from UNECE Recommendation 20 (OPC UA Part 8)."""


@dataclass(frozen=True)
class EngineeringUnit:
    """A unit as OPC UA's ``EngineeringUnits`` carries it: a UNECE common code (None where Rec. 20 has none), its symbol and its name."""

    common_code: str | None
    symbol: str
    name: str

    @property
    def unit_id(self) -> int:
        """The UNECE common code packed into an Int32 as OPC UA Part 8 specifies; -1 for a unit without one."""
        if self.common_code is None:
            return -1
        unit_id = 0
        for character in self.common_code:
            unit_id = (unit_id << 8) | ord(character)
        return unit_id

    def information(self) -> ua.EUInformation:
        return ua.EUInformation(NamespaceUri=UNECE_UNITS_URI, UnitId=self.unit_id, DisplayName=ua.LocalizedText(self.symbol), Description=ua.LocalizedText(self.name))


ENGINEERING_UNITS: dict[str, EngineeringUnit] = {
    "°C": EngineeringUnit("CEL", "°C", "degree Celsius"),
    "pH": EngineeringUnit("C62", "pH", "pH (dimensionless)"),
    "% air saturation": EngineeringUnit("P1", "%", "percent of air saturation"),
    "%": EngineeringUnit("P1", "%", "percent"),
    "L": EngineeringUnit("LTR", "L", "litre"),
    "L/h": EngineeringUnit("E32", "L/h", "litre per hour"),
    "g/L": EngineeringUnit("GL", "g/L", "gram per litre"),
    "mM": EngineeringUnit("M33", "mmol/L", "millimole per litre"),
    "h": EngineeringUnit("HUR", "h", "hour"),
    "rpm": EngineeringUnit("RPM", "r/min", "revolutions per minute"),
    "mmol/L/h": EngineeringUnit(None, "mmol/(L·h)", "millimole per litre and hour"),
    "pF/cm": EngineeringUnit(None, "pF/cm", "picofarad per centimetre"),
    "1e6 cells/mL": EngineeringUnit(None, "1e6 cells/mL", "million cells per millilitre"),
    "mOsm/kg": EngineeringUnit(None, "mOsm/kg", "milliosmole per kilogram"),
}
"""The unit of each real signal of :data:`interfaces.signals.SIGNALS`, by its unit there, as OPC UA ``EUInformation``."""

INSTRUMENT_SPANS: dict[str, tuple[float, float]] = {
    "PV.Temperature": (0.0, 50.0),
    "PV.pH": (0.0, 14.0),
    "PV.DO": (0.0, 200.0),
    "PV.OUR": (0.0, 50.0),
    "PV.CER": (0.0, 50.0),
    "PV.Capacitance": (0.0, 100.0),
    "PV.AgitationSpeed": (0.0, 500.0),
    "Sample.VCD": (0.0, 100.0),
    "Sample.Viability": (0.0, 100.0),
    "Sample.Glucose": (0.0, 50.0),
    "Sample.Lactate": (0.0, 20.0),
    "Sample.Glutamine": (0.0, 20.0),
    "Sample.Ammonia": (0.0, 30.0),
    "Sample.Titer": (0.0, 20.0),
    "Sample.Osmolality": (0.0, 1000.0),
    "MPC.Pred.HarvestTiter": (0.0, 20.0),
}
"""EURange of the measured values: the spans a PLC engineer configures for the instruments and the lab's reporting range."""

_UNBOUNDED_BATCH_SPANS: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("PV.Volume", "PV.FeedTotal", "PV.GlucoseFeedTotal", "PV.BaseTotal"), (0.0, 25000.0)),
    **dict.fromkeys(("SP.FeedRate", "SP.GlucoseRate", "MPC.Rec.FeedRate", "MPC.Rec.GlucoseRate"), (0.0, 1000.0)),
    **dict.fromkeys(("SP.Temperature", "MPC.Rec.Temperature"), (0.0, 50.0)),
    **dict.fromkeys(("Status.ProcessTime", "Sample.TakenAt", "MPC.Rec.HarvestTime"), (0.0, 720.0)),
}
"""EURange of the batch's values when the server is not given the batch: the widest a reference plant uses (25 m³, 30 days)."""


def eu_ranges(batch: BatchConfig | None) -> dict[str, tuple[float, float]]:
    """The EURange of every real signal: the instruments' spans, and the equipment's and the batch's ranges from ``batch``.

    The setpoints' range is the equipment's, the one outside which the PLC
    answers a write with ``BadOutOfRange``; volumes go up to the maximum
    working volume, times up to the latest harvest.
    """
    ranges = {**INSTRUMENT_SPANS, **_UNBOUNDED_BATCH_SPANS}
    if batch is not None:
        equipment = batch.equipment
        ranges.update(dict.fromkeys(("PV.Volume", "PV.FeedTotal", "PV.GlucoseFeedTotal", "PV.BaseTotal"), (0.0, equipment.max_working_volume_l)))
        ranges.update(dict.fromkeys(("SP.FeedRate", "MPC.Rec.FeedRate"), (0.0, equipment.feed_rate_max_lph)))
        ranges.update(dict.fromkeys(("SP.GlucoseRate", "MPC.Rec.GlucoseRate"), (0.0, equipment.glucose_rate_max_lph)))
        ranges.update(dict.fromkeys(("SP.Temperature", "MPC.Rec.Temperature"), (equipment.temperature_min_degc, equipment.temperature_max_degc)))
        ranges.update(dict.fromkeys(("Status.ProcessTime", "Sample.TakenAt", "MPC.Rec.HarvestTime"), (0.0, batch.limits.latest_harvest_h)))
    return ranges


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


DEFAULT_UNIT = "BR01"


def unit_of(tag_map: OpcUaTagMap) -> str:
    """The unit the map's node ids name (``BR01`` in ``BR01.PV.Temperature``): the object the variables are grouped under.

    It is the prefix every string node id puts before its signal's name; a
    map without one common prefix is grouped under :data:`DEFAULT_UNIT`.
    """
    prefixes = {tag.node[: -len(name) - 1] for name, tag in tag_map.tags.items() if isinstance(tag.node, str) and tag.node.endswith(f".{name}")}
    prefixes.discard("")
    return prefixes.pop() if len(prefixes) == 1 else DEFAULT_UNIT


async def _add_analog_item(
    parent: Node, nodeid: ua.NodeId, browse_name: ua.QualifiedName, value: ua.Variant, eu_range: ua.Range, unit: EngineeringUnit, *, properties_prefix: str
) -> Node:
    """A variable of type ``AnalogItemType`` (OPC UA Part 8) holding ``value``, with its ``EURange`` and ``EngineeringUnits`` properties.

    asyncua's ``add_variable`` makes a ``BaseDataVariableType``; this asks for
    the node with the analog type definition instead. The properties get the
    string node ids ``<properties_prefix>.EURange`` and
    ``<properties_prefix>.EngineeringUnits`` in the variable's namespace (for
    ``BR01.PV.Temperature``: ``BR01.PV.Temperature.EURange``).
    """
    item = ua.AddNodesItem()
    item.RequestedNewNodeId = nodeid
    item.BrowseName = browse_name
    item.NodeClass = ua.NodeClass.Variable
    item.ParentNodeId = parent.nodeid
    item.ReferenceTypeId = ua.NodeId(ua.Int32(ua.ObjectIds.HasComponent))
    item.TypeDefinition = ua.NodeId(ua.Int32(ua.ObjectIds.AnalogItemType))
    attributes = ua.VariableAttributes()
    attributes.DisplayName = ua.LocalizedText(browse_name.Name)
    attributes.Description = ua.LocalizedText(f"{browse_name.Name} [{unit.symbol}]")
    attributes.DataType = ua.NodeId(ua.Int32(value.VariantType.value))
    attributes.Value = value
    attributes.ValueRank = ua.ValueRank.Scalar
    attributes.AccessLevel = ua.AccessLevel.CurrentRead.mask
    attributes.UserAccessLevel = ua.AccessLevel.CurrentRead.mask
    item.NodeAttributes = attributes
    (result,) = await parent.session.add_nodes([item])
    result.StatusCode.check()
    node = Node(parent.session, result.AddedNodeId)

    def property_id(name: str) -> ua.NodeId:
        return ua.NodeId(ua.String(f"{properties_prefix}.{name}"), nodeid.NamespaceIndex)

    await node.add_property(property_id("EURange"), ua.QualifiedName("EURange", 0), eu_range, datatype=ua.NodeId(ua.Int32(ua.ObjectIds.Range)))
    await node.add_property(property_id("EngineeringUnits"), ua.QualifiedName("EngineeringUnits", 0), unit.information(), datatype=ua.NodeId(ua.Int32(ua.ObjectIds.EUInformation)))
    return node


class OpcUaPlcServer(PlcServerClocks):
    """An asyncua server in front of a :class:`~simulator.plc.SimulatedPlc`.

    ``batch`` gives the equipment's and the batch's ranges for the analog
    items' EURange (:func:`eu_ranges`); without it they are the widest a
    reference plant uses.
    """

    def __init__(
        self,
        plc: SimulatedPlc,
        tag_map: OpcUaTagMap,
        *,
        endpoint: str | None = None,
        security: OpcUaServerSecurity | None = None,
        batch: BatchConfig | None = None,
    ) -> None:
        super().__init__(plc)
        self.tag_map = tag_map
        self.endpoint = endpoint or tag_map.endpoint
        self.security = security
        self.unit = unit_of(tag_map)
        self.eu_ranges = eu_ranges(batch)
        self.application_uri = default_application_uri()
        """The ApplicationUri the server announces: its certificate's when secured."""
        self._server = Server()
        self._nodes: dict[str, ua.NodeId] = {}
        self._writable: set[ua.NodeId] = set()
        self._rights = _WriteRights()
        self._publishing = False
        self._scans: dict[str, tuple[float, datetime]] = {}
        for name, tag in tag_map.tags.items():
            if tag.node is None:
                raise ConfigError(
                    f"tags.{name}: browse_path {tag.browse_path!r}: the simulated PLC serves node ids, and places each variable itself "
                    f"(<unit>/<group>/<name>, docs/plc-simulator.md); give the runtime's map the browse path instead"
                )

    async def start(self) -> None:
        server = self._server
        server.product_uri = PRODUCT_URI
        server.manufacturer_name = MANUFACTURER_NAME
        server.application_type = ua.ApplicationType.Server
        server.set_server_name(PRODUCT_NAME)
        await server.init()
        version, built = build_info()
        await server.set_build_info(PRODUCT_URI, MANUFACTURER_NAME, PRODUCT_NAME, version, version, built)
        await server.set_application_uri(self.application_uri)
        server.set_endpoint(self.endpoint)
        if self.security is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        else:
            await self._secure(self.security)
        self._answer_writes_per_node()
        index = await server.register_namespace(self.tag_map.namespace_uri)
        indices = {self.tag_map.namespace_uri: index}
        for uri in self.tag_map.namespaces.values():
            indices[uri] = await server.register_namespace(uri)
        unit = await server.nodes.objects.add_object(ua.NodeId(self.unit, index), ua.QualifiedName(self.unit, index))  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values
        folders: dict[tuple[str, ...], Node] = {(): unit}
        snapshot = self.plc.snapshot()
        for name, tag in self.tag_map.tags.items():
            *groups, leaf = name.split(".")
            parent = await self._folder(folders, tuple(groups), index)
            reading = snapshot.get(name)
            initial = _raw(tag.to_raw(reading.value), tag.type) if reading is not None else _DEFAULTS.get(tag.type, 0)
            namespace = indices[self.tag_map.namespace_of(tag)]
            identifier = ua.Int32(tag.node) if isinstance(tag.node, int) else ua.String(str(tag.node))  # a numeric identifier is a UInt32; asyncua annotates it Int32
            nodeid, browse_name = ua.NodeId(identifier, ua.Int16(namespace)), ua.QualifiedName(leaf, namespace)
            variant = ua.Variant(initial, VARIANT_TYPES[tag.type])
            if SIGNALS[name].kind is Kind.REAL and not tag.scaled:
                low, high = self.eu_ranges[name]
                node = await _add_analog_item(
                    parent, nodeid, browse_name, variant, ua.Range(Low=low, High=high), ENGINEERING_UNITS[SIGNALS[name].unit], properties_prefix=f"{self.unit}.{name}"
                )
            else:
                node = await parent.add_variable(nodeid, browse_name, variant)
            if SIGNALS[name].writable:
                await node.set_writable()
                server.set_attribute_value_setter(node.nodeid, self._setter(name))
                self._writable.add(node.nodeid)
            self._nodes[name] = node.nodeid
        await server.start()
        await self.publish()
        security = "None" if self.security is None else f"{self.security.policy} {self.security.mode}"
        log.info(
            "opcua_plc_started",
            endpoint=self.endpoint,
            namespace_index=index,
            variables=len(self._nodes),
            security=security,
            application_uri=self.application_uri,
        )

    async def _folder(self, folders: dict[tuple[str, ...], Node], groups: tuple[str, ...], index: int) -> Node:
        """The folder ``<unit>/<group>/...`` (made on first use), with the string node id ``<unit>.<group>...`` in the map's namespace."""
        if groups in folders:
            return folders[groups]
        parent = await self._folder(folders, groups[:-1], index)
        folder = await parent.add_folder(ua.NodeId(".".join((self.unit, *groups)), index), ua.QualifiedName(groups[-1], index))  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values
        folders[groups] = folder
        return folder

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
        self.application_uri = uri
        await server.set_application_uri(uri)  # a client checks that the certificate names the ApplicationUri the server announces
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
        here, and a refused one answers its own status code. A value written to
        a signal the PLC only reports (``PV.*``, ``Status.*``, ``Sample.*``)
        answers ``BadNotWritable``, as OPC UA specifies for a variable whose
        AccessLevel forbids writing (asyncua would answer ``BadUserAccessDenied``,
        which means *this user* may not, and sends a client looking for rights).
        """
        service = self._server.iserver.attribute_service
        write_all = service.write
        not_writable = ua.StatusCode(ua.StatusCodes.BadNotWritable)  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values

        async def write_each(params: ua.WriteParameters, user: Any = None) -> list[ua.StatusCode]:
            results: list[ua.StatusCode] = []
            read_only = set(self._nodes.values()) - self._writable
            for item in params.NodesToWrite:
                if item.NodeId in read_only and item.AttributeId == ua.AttributeIds.Value:
                    results.append(not_writable)
                    continue
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
        """Scan the PLC and write every mapped value with its status and the wall-clock time of the scan that produced it."""
        now = datetime.now(UTC)
        process_time_h = self.plc.process_time_h
        snapshot = self.plc.snapshot()
        self._publishing = True
        try:
            for name, tag in self.tag_map.tags.items():
                reading = snapshot.get(name)
                if reading is None:
                    continue
                status = ua.StatusCode(ua.StatusCodes.Good if reading.good else ua.StatusCodes.Bad)  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values
                variant = ua.Variant(_raw(tag.to_raw(reading.value), tag.type), VARIANT_TYPES[tag.type])
                scanned = self._source_time(name, reading.scanned_at_h, process_time_h, now)
                await self._server.write_attribute_value(self._nodes[name], ua.DataValue(variant, StatusCode=status, SourceTimestamp=scanned, ServerTimestamp=now))  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values
        finally:
            self._publishing = False

    def _source_time(self, name: str, scanned_at_h: float, process_time_h: float, now: datetime) -> datetime:
        """The wall-clock time of the scan that produced a value.

        A value scanned now (its scan time is the plant's present) was produced
        now, even when the plant's clock has not moved since the last publish
        (free-running, several publishes fall in one plant minute; a client's
        write in a lockstep pause). A value the PLC repeats from an earlier
        scan (a stale probe: value and scan time both stop) keeps the time of
        that scan.
        """
        last = self._scans.get(name)
        if last is not None and last[0] == scanned_at_h and scanned_at_h < process_time_h:
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
