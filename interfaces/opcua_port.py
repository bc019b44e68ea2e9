"""The PLC port over OPC UA (asyncua client).

- The namespace index is resolved from the tag map's namespace URI at every
  connect, never assumed.
- :meth:`OpcUaPort.read` reads every mapped node in one Read request; each
  value keeps its StatusCode (Good or not) and SourceTimestamp.
- :meth:`OpcUaPort.write` sends one Write request with an explicit variant
  type per value (the tag map's type), checks every value's status, and reads
  the written nodes back. A write is never retried: after a link error the
  caller reads the PLC again and decides.
- Every network call has a timeout; a broken client is replaced on the next
  :meth:`connect` (asyncua's client is not reused after a failure).

Security (the tag map's ``security`` section, docs/opcua-security.md): with
mode ``sign_and_encrypt`` (or ``sign``) the port connects with the configured
policy and the runtime's own certificate, and goes on only if the server's
certificate is trusted by the trust store directory (directly or through a
CA in it); a certificate is never trusted because it was seen before. The
user name and password are read from the environment or a password file at
every connect and never appear in a message. Without a security section, or
with mode ``none``, the port connects with security mode None only when the
caller opts in (``allow_insecure=True``), and logs ``opcua_security_none`` as a
warning at every connect.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from asyncua import Client, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import security_policies
from asyncua.crypto.uacrypto import x509_from_der
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from controller.ports import PlcLinkError, PlcWriteMismatchError, PlcWriteRefusedError, Reading, Value
from interfaces.opcua_certificates import application_uri, certificate_validator, describe, load_trust_store, read_certificate, read_private_key, trusted_certificates
from interfaces.signals import SIGNALS, Kind
from interfaces.tagmap import OpcUaSecurity, OpcUaTag, OpcUaTagMap, check_endpoint_has_no_credentials
from plant_models.errors import ConfigError

log = structlog.get_logger(__name__)

VARIANT_TYPES: dict[str, ua.VariantType] = {
    "double": ua.VariantType.Double,
    "float": ua.VariantType.Float,
    "uint32": ua.VariantType.UInt32,
    "int32": ua.VariantType.Int32,
    "uint16": ua.VariantType.UInt16,
    "int16": ua.VariantType.Int16,
    "boolean": ua.VariantType.Boolean,
    "string": ua.VariantType.String,
}
SECURITY_POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
"""The tag map's policy names (the last part of the OPC UA policy URIs) and asyncua's classes."""
SECURITY_MODES: dict[str, ua.MessageSecurityMode] = {
    "sign_and_encrypt": ua.MessageSecurityMode.SignAndEncrypt,
    "sign": ua.MessageSecurityMode.Sign,
}
_FLOAT_READBACK_REL = {"double": 1e-12, "float": 1e-6}
_LINK_ERRORS = (OSError, TimeoutError, asyncio.TimeoutError, ua.UaError, ConnectionError)
_CREDENTIALS_REFUSED = {"BadUserAccessDenied", "BadIdentityTokenRejected", "BadIdentityTokenInvalid", "BadUserSignatureInvalid"}
_CERTIFICATE_PROBLEMS = {
    "BadCertificateUntrusted": "neither it nor a CA that signed it is in the trust store",
    "BadCertificateTimeInvalid": "it is outside its validity period (or a clock is wrong)",
    "BadCertificateUriInvalid": "its SubjectAltName does not hold the application URI its owner announces",
    "BadCertificateUseNotAllowed": "its key usage or extended key usage does not allow this use",
    "BadCertificateInvalid": "it lacks the SubjectAltName, key usage or extended key usage OPC UA requires",
    "BadCertificateRevoked": "it is revoked",
    "BadSecurityChecksFailed": "it failed the security checks",
}


class OpcUaPort:
    """:class:`~controller.ports.PlcPort` over OPC UA.

    The tag map's ``security`` section decides how the port connects; the
    certificate, key, trust store and credentials it names are checked here,
    when the port is built (:class:`ConfigError` naming the field and the file
    or variable). ``allow_insecure`` only permits security mode None where the
    map asks for no security; it never weakens a configured security section.
    """

    def __init__(self, tag_map: OpcUaTagMap, *, endpoint: str | None = None, timeout_s: float = 5.0, allow_insecure: bool = False) -> None:
        self.tag_map = tag_map
        self.endpoint = endpoint or tag_map.endpoint
        try:
            check_endpoint_has_no_credentials(self.endpoint)
        except ValueError as error:
            raise ConfigError(f"endpoint {self.endpoint.split('@')[-1]!r}: {error}") from None
        self.timeout_s = timeout_s
        security = tag_map.security
        self._security: _ClientSecurity | None = None
        if security is not None and security.secured:
            self._security = _ClientSecurity(security, self.endpoint)
        elif not allow_insecure:
            why = "its security section says mode 'none'" if security is not None else "the tag map has no security section"
            raise ConfigError(
                f"{self.endpoint}: {why}; connecting with security mode None needs an explicit opt-in (allow_insecure=True), "
                "and only belongs on 127.0.0.1 or an isolated cell network. For SignAndEncrypt add a security section "
                "(docs/opcua-security.md)"
            )
        self._client: Client | None = None
        self._nodes: dict[str, ua.NodeId] = {}

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def security_policy_uri(self) -> str | None:
        """The security policy URI of the open channel (``...#None`` without security); None while not connected."""
        return self._client.security_policy.URI if self._client is not None else None

    @property
    def security_mode(self) -> ua.MessageSecurityMode | None:
        """The message security mode of the open channel; None while not connected."""
        return self._client.security_policy.Mode if self._client is not None else None

    async def connect(self) -> None:
        """Connect with a new client (a failed one is never reused) and resolve the namespace index.

        Raises :class:`PlcLinkError` when the server cannot be reached, offers
        no endpoint with the configured policy and mode, presents a certificate
        the trust store does not trust, or refuses this client's certificate or
        credentials (each said in the message), and :class:`ConfigError` when a
        certificate, key, trust store or credential cannot be read.
        """
        await self.close()
        client = Client(self.endpoint, timeout=self.timeout_s)
        attempt: _SecureAttempt | None = None
        if self._security is None:
            log.warning("opcua_security_none", endpoint=self.endpoint, reason="security mode None by explicit opt-in")
        else:
            attempt = await self._security.prepare(client, self.timeout_s)
        try:
            await asyncio.wait_for(client.connect(), self.timeout_s)
            index = await asyncio.wait_for(client.get_namespace_index(self.tag_map.namespace_uri), self.timeout_s)
        except ua.UaStatusCodeError as error:
            await _disconnect_quietly(client)
            if attempt is not None:
                raise attempt.refusal(error) from error
            raise PlcLinkError(f"{self.endpoint}: cannot connect or resolve namespace {self.tag_map.namespace_uri!r}: {error!r}") from error
        except _LINK_ERRORS as error:
            await _disconnect_quietly(client)
            raise PlcLinkError(f"{self.endpoint}: cannot connect or resolve namespace {self.tag_map.namespace_uri!r}: {error!r}") from error
        except ValueError as error:  # the namespace URI is not in the server's array
            await _disconnect_quietly(client)
            raise PlcLinkError(f"{self.endpoint}: the server has no namespace {self.tag_map.namespace_uri!r}") from error
        self._client = client
        self._nodes = {name: ua.NodeId(tag.node, index) for name, tag in self.tag_map.tags.items()}
        policy = client.security_policy
        log.info("opcua_connected", endpoint=self.endpoint, namespace_index=index, security_policy=policy.URI.rpartition("#")[2], security_mode=policy.Mode.name)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _disconnect_quietly(client)

    async def read(self) -> dict[str, Reading]:
        names = list(self._nodes)
        values = await self._read_nodes(names)
        return {name: _reading(self.tag_map.tags[name], name, value) for name, value in zip(names, values, strict=True)}

    async def write(self, values: Mapping[str, Value]) -> None:
        client = self._require_client()
        names = list(values)
        for name in names:
            if name not in self._nodes or not SIGNALS[name].writable:
                raise KeyError(f"{name} is not a writable signal of this tag map")
        data = [ua.DataValue(ua.Variant(_raw_value(self.tag_map.tags[name], name, values[name]), VARIANT_TYPES[self.tag_map.tags[name].type])) for name in names]
        try:
            statuses = await asyncio.wait_for(client.uaclient.write_attributes([self._nodes[n] for n in names], data), self.timeout_s)
        except _LINK_ERRORS as error:
            await self.close()
            raise PlcLinkError(f"{self.endpoint}: write of {', '.join(names)} failed on the link: {error!r}; state unknown, read again") from error
        refusals = {name: status.name for name, status in zip(names, statuses, strict=True) if not status.is_good()}
        accepted = [name for name in names if name not in refusals]
        if accepted:
            back = dict(zip(accepted, await self._read_nodes(accepted), strict=True))
            mismatched = {n: (values[n], back[n].Value.Value if back[n].Value else None) for n in accepted if not _same(self.tag_map.tags[n], n, values[n], back[n])}
            if mismatched:
                raise PlcWriteMismatchError(f"{self.endpoint}: written values read back differently: {mismatched}")
        if refusals:
            raise PlcWriteRefusedError(refusals)

    # ------------------------------------------------------------------ helpers

    def _require_client(self) -> Client:
        if self._client is None:
            raise PlcLinkError(f"{self.endpoint}: not connected")
        return self._client

    async def _read_nodes(self, names: list[str]) -> list[ua.DataValue]:
        client = self._require_client()
        parameters = ua.ReadParameters()
        parameters.NodesToRead = [ua.ReadValueId(NodeId=self._nodes[name], AttributeId=ua.AttributeIds.Value) for name in names]
        parameters.TimestampsToReturn = ua.TimestampsToReturn.Both
        try:
            return await asyncio.wait_for(client.uaclient.read(parameters), self.timeout_s)
        except _LINK_ERRORS as error:
            await self.close()
            raise PlcLinkError(f"{self.endpoint}: read failed: {error!r}") from error


# --------------------------------------------------------------------------- security


@dataclass(frozen=True)
class _ClientIdentity:
    """The runtime's certificate and key, as asyncua takes them (DER), and the application URI in the certificate."""

    certificate: x509.Certificate
    certificate_der: bytes
    private_key_der: bytes
    application_uri: str


class _ClientSecurity:
    """SignAndEncrypt (or Sign) for one endpoint: everything is checked when built, and read again at every connect.

    Reading again lets an operator renew the certificate, add a trusted
    server certificate or change the password without restarting the runtime.
    """

    def __init__(self, settings: OpcUaSecurity, endpoint: str) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.policy = SECURITY_POLICIES[settings.policy]
        self.mode = SECURITY_MODES[settings.mode]
        self._identity()
        trusted_certificates(self._path("trust_store"), field="security.trust_store")
        self._credentials()
        _warn_if_readable_by_others(self._path("private_key"), field="security.private_key")
        if settings.password_file is not None:
            _warn_if_readable_by_others(settings.password_file, field="security.password_file")

    def _path(self, name: str) -> Path:
        path = getattr(self.settings, name)
        if path is None:  # the tag map's validation makes this impossible for a secured mode
            raise ConfigError(f"security.{name}: required for mode '{self.settings.mode}'")
        return Path(path)

    def _identity(self) -> _ClientIdentity:
        certificate = read_certificate(self._path("certificate"), field="security.certificate")
        key = read_private_key(self._path("private_key"), field="security.private_key")
        where = f"security.certificate: {self.settings.certificate}"
        public_key = certificate.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise ConfigError(f"{where}: the OPC UA RSA security policies need an RSA certificate; got {type(public_key).__name__}")
        if key.public_key().public_numbers() != public_key.public_numbers():
            raise ConfigError(f"security.private_key: {self.settings.private_key}: is not the key of the certificate {self.settings.certificate}")
        uri = application_uri(certificate)
        if uri is None:
            raise ConfigError(f"{where}: has no application URI (a URI in its SubjectAltName), which OPC UA requires; make it with `bioreactor-mpc certs`")
        now = dt.datetime.now(dt.UTC)
        if certificate.not_valid_after_utc < now:
            raise ConfigError(f"{where}: expired on {certificate.not_valid_after_utc:%Y-%m-%d}; make a new one and have the PLC trust it")
        return _ClientIdentity(
            certificate=certificate,
            certificate_der=certificate.public_bytes(serialization.Encoding.DER),
            private_key_der=key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            application_uri=uri,
        )

    def _credentials(self) -> tuple[str, str] | None:
        """(user name, password) from the environment or the password file; None for an anonymous session."""
        settings = self.settings
        if settings.username_env is None:
            return None
        username = _environment_value(settings.username_env, field="security.username_env", what="the OPC UA user name")
        if settings.password_env is not None:
            return username, _environment_value(settings.password_env, field="security.password_env", what="the OPC UA password")
        if settings.password_file is None:  # the tag map's validation makes this impossible
            raise ConfigError("security: a user name needs password_env or password_file")
        return username, _password_from_file(Path(settings.password_file))

    async def prepare(self, client: Client, timeout_s: float) -> _SecureAttempt:
        """Give ``client`` the policy, the certificates and the credentials, after checking the server's certificate.

        The server's endpoints are asked for over an unsecured channel (OPC UA
        discovery); the endpoint with the configured policy and mode gives the
        server's certificate, which must pass the trust store before anything
        else is sent. asyncua checks again, when the session is created, that
        the server signs with the same certificate.
        """
        identity = self._identity()
        store = await load_trust_store(self._path("trust_store"), field="security.trust_store")
        validator = certificate_validator(store, peer="server")
        credentials = self._credentials()
        try:
            endpoints = await asyncio.wait_for(client.connect_and_get_server_endpoints(), timeout_s)
        except _LINK_ERRORS as error:
            raise PlcLinkError(f"{self.endpoint}: cannot ask the server for its endpoints: {error!r}") from error
        wanted = f"{self.settings.policy} {self.mode.name}"
        try:
            endpoint = Client.find_endpoint(endpoints, self.mode, self.policy.URI)
        except ua.UaError:
            offered = sorted({f"{e.SecurityPolicyUri.rpartition('#')[2]} {e.SecurityMode.name}" for e in endpoints})
            raise PlcLinkError(f"{self.endpoint}: the server offers no endpoint with {wanted}; it offers: {', '.join(offered) or 'nothing'}") from None
        server_certificate = x509_from_der(endpoint.ServerCertificate)
        if server_certificate is None:
            raise PlcLinkError(f"{self.endpoint}: the server's {wanted} endpoint comes without a certificate")
        try:
            await validator(server_certificate, endpoint.Server)
        except ServiceError as error:
            raise PlcLinkError(self.server_refused(server_certificate, ua.StatusCode(error.code).name)) from None
        client.application_uri = identity.application_uri
        client.name = client.description = "bioreactor-mpc runtime"
        client.certificate_validator = validator
        await client.set_security(
            self.policy,
            certificate=identity.certificate_der,
            private_key=identity.private_key_der,
            server_certificate=server_certificate.public_bytes(serialization.Encoding.DER),
            mode=self.mode,
        )
        if credentials is not None:
            client.set_user(credentials[0])
            client.set_password(credentials[1])
        return _SecureAttempt(self, identity, server_certificate, credentials[0] if credentials is not None else None)

    def server_refused(self, certificate: x509.Certificate, status: str) -> str:
        """Why the server's certificate is refused, and what the operator does about it."""
        problem = _CERTIFICATE_PROBLEMS.get(status, "it failed the checks")
        advice = (
            f"if it is the PLC's certificate, compare its fingerprint with the one the PLC shows, then copy it into {self.settings.trust_store}"
            if status == "BadCertificateUntrusted"
            else "the PLC needs a certificate that passes the checks of docs/opcua-security.md"
        )
        return f"{self.endpoint}: the server's certificate is refused ({status}: {problem}): {describe(certificate)}; {advice}"


@dataclass(frozen=True)
class _SecureAttempt:
    """One secured connect: what the message needs if the server refuses it."""

    security: _ClientSecurity
    identity: _ClientIdentity
    server_certificate: x509.Certificate
    username: str | None

    def refusal(self, error: ua.UaStatusCodeError) -> PlcLinkError:
        """The refusal as a :class:`PlcLinkError` that says whose fault it is (never with the password)."""
        status = ua.StatusCode(error.code).name
        endpoint, settings = self.security.endpoint, self.security.settings
        if isinstance(error.__cause__, ServiceError):  # asyncua's client ran our validator again when creating the session
            return PlcLinkError(self.security.server_refused(self.server_certificate, status))
        if status in _CREDENTIALS_REFUSED:
            if self.username is None:
                return PlcLinkError(f"{endpoint}: the server refused an anonymous session ({status}); it needs a user name and password (docs/opcua-security.md)")
            source = f"${settings.password_env}" if settings.password_env is not None else str(settings.password_file)
            return PlcLinkError(f"{endpoint}: the server refused the credentials ({status}) of user {self.username!r} (from ${settings.username_env}, password from {source})")
        if status in _CERTIFICATE_PROBLEMS:
            return PlcLinkError(
                f"{endpoint}: the server refused this client's certificate ({status}; {_CERTIFICATE_PROBLEMS[status]}): "
                f"{describe(self.identity.certificate)}; the PLC must trust {settings.certificate}: import it into the PLC's trusted certificates"
            )
        return PlcLinkError(f"{endpoint}: the server refused the {settings.policy} {self.security.mode.name} connection: {status}")


def _environment_value(name: str, *, field: str, what: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ConfigError(f"{field}: the environment variable {name} is not set (it should hold {what}; see docs/opcua-security.md)")
    if not value:
        raise ConfigError(f"{field}: the environment variable {name} is empty (it should hold {what})")
    return value


def _password_from_file(path: Path) -> str:
    """The first line of the password file (a trailing newline is not part of the password)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"security.password_file: {path}: file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"security.password_file: {path}: not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(f"security.password_file: {path}: cannot read it ({error.strerror})") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigError(f"security.password_file: {path}: the first line is empty (it should hold the OPC UA password)")
    return lines[0]


def _warn_if_readable_by_others(path: Path, *, field: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # reading it reports the problem
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("opcua_secret_file_readable", field=field, path=str(path), mode=oct(stat.S_IMODE(mode)), advice="chmod 600")


def _reading(tag: OpcUaTag, name: str, data: ua.DataValue) -> Reading:
    good = data.StatusCode is None or data.StatusCode.is_good()
    raw: Any = data.Value.Value if data.Value is not None else None
    if raw is None:
        return Reading(math.nan if SIGNALS[name].kind is Kind.REAL else 0, False, data.SourceTimestamp)
    return Reading(tag.to_engineering(raw), good, data.SourceTimestamp)


def _raw_value(tag: OpcUaTag, name: str, value: Value) -> Any:
    kind = SIGNALS[name].kind
    if kind is Kind.BOOLEAN:
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a boolean, got {value!r}")
        return value
    if isinstance(value, bool | str):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: {value!r} is not finite; nothing written")
    if kind is Kind.REAL:
        raw = tag.to_raw(number)
        return raw if tag.type in ("double", "float") else round(raw)
    return int(number)


def _same(tag: OpcUaTag, name: str, written: Value, data: ua.DataValue) -> bool:
    """Whether a read-back equals what was written (floats to the precision of their type)."""
    if data.Value is None or (data.StatusCode is not None and not data.StatusCode.is_good()):
        return False
    expected = _raw_value(tag, name, written)
    if tag.type in _FLOAT_READBACK_REL:
        return math.isclose(float(data.Value.Value), float(expected), rel_tol=_FLOAT_READBACK_REL[tag.type], abs_tol=1e-9)
    return bool(data.Value.Value == expected)


async def _disconnect_quietly(client: Client) -> None:
    try:
        await asyncio.wait_for(client.disconnect(), 2.0)
    except Exception as error:  # noqa: BLE001 - a broken link may fail in any way while closing; it is dropped either way
        log.debug("opcua_disconnect_failed", error=repr(error))
