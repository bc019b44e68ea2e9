"""The PLC port over OPC UA (asyncua client).

- The index of each of the tag map's namespaces (``namespace_uri`` and the
  named ``namespaces``) is resolved from its URI at every connect, never
  assumed. A tag is a string or numeric node id in its namespace, or a browse
  path from the Objects folder, which the server resolves at every connect
  (:func:`resolve_nodes`, one TranslateBrowsePathsToNodeIds request for all);
  reads and writes then use the node ids.
- At every connect, before the port counts as connected, every mapped node is
  checked in one Read request of its attributes (:func:`mapping_problems`):
  it exists, is a Variable holding one value of the tag map's type (or, for a
  signal that is only read, a type the declared one holds exactly), is
  readable, and, if the runtime writes it, writable by this session's user.
  Every problem is collected and raised together as
  :class:`~controller.ports.PlcMappingError`: the tag map does not fit this PLC.
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

Errors: everything that goes wrong in :meth:`OpcUaPort.connect`,
:meth:`OpcUaPort.read` and :meth:`OpcUaPort.write` on the link or in the
server's answer is a :class:`~controller.ports.PlcLinkError`. When it is about
who the runtime is (the server refuses the credentials or this client's
certificate, the server's certificate is not trusted, the runtime's own
certificate, key, trust store or credentials cannot be used now, the
server gives this session no write rights) it is a
:class:`~controller.ports.PlcAuthError` whose ``retry_after_s`` is how long to
wait before the next attempt: retrying a wrong password every few seconds
locks the PLC's account, and nothing changes on its own. The wait backs off
exponentially: ``auth_retry_after_s`` (5 minutes by default) after the first
refusal, doubled after each further one, capped at ``auth_retry_max_s`` (30
minutes by default); it starts again from the first wait once the PLC lets
the runtime write (after a refused write: a connect does not prove write
rights), or connect (when only connects were refused). Each refusal is
logged once, as one line without a traceback (``opcua_access_refused``),
and asyncua's own warnings about the refusal
(the service fault, the closed channel) are not logged again.

Write rights: a PLC gives write rights to the runtime's identity (its
certificate or its user) and none to other clients (docs/opcua-security.md).
A session without them is refused before anything is written: at connect,
when the PLC reports a written signal's ``UserAccessLevel`` without
CurrentWrite for this session; at a write, when the PLC answers the request
with a ``BadUserAccessDenied`` (or another access) service fault, or answers
``BadUserAccessDenied`` for a signal other than ``SP.*`` (the reference PLC
refuses only ``SP.*`` writes while remote is disabled, with that status;
``MPC.*`` always accepts the runtime's writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from asyncua import Client, ua
from asyncua.common.ua_utils import data_type_to_variant_type
from asyncua.common.utils import ServiceError
from asyncua.crypto import security_policies
from asyncua.crypto.uacrypto import x509_from_der
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from controller.ports import PlcAuthError, PlcLinkError, PlcMappingError, PlcWriteMismatchError, PlcWriteRefusedError, Reading, Value
from interfaces.opcua_certificates import (
    application_uri,
    certificate_validator,
    describe,
    fingerprint,
    load_trust_store,
    read_certificate,
    read_private_key,
    trusted_certificates,
    validity_problem,
)
from interfaces.signals import SIGNALS, Kind
from interfaces.tagmap import OpcUaSecurity, OpcUaTag, OpcUaTagMap, check_endpoint_has_no_credentials, split_browse_path
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
_LINK_ERRORS = (OSError, TimeoutError, asyncio.TimeoutError, ConnectionError, ua.UaError, ValueError)
"""What a failed link or a broken answer raises in asyncua (a ValueError: a value it could not decode)."""
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
DEFAULT_AUTH_RETRY_AFTER_S = 300.0
"""How long to wait after the PLC first refused the runtime's credentials or certificate: minutes, so that a PLC does not lock the account."""
DEFAULT_AUTH_RETRY_MAX_S = 1800.0
"""The longest wait between attempts while the PLC goes on refusing the runtime: the back-off doubles up to here."""
_ACCESS_REFUSED = _CREDENTIALS_REFUSED | {"BadSecurityChecksFailed", "BadNoValidCertificates", "BadApplicationSignatureInvalid"}
"""Service faults that mean the PLC refuses this session's identity or rights, not the link."""
_ASYNCUA_CLIENT_LOGGERS = ("asyncua.client.ua_client.UASocketProtocol", "asyncua.client.ua_client.UaClient")

READABLE_AS: dict[str, frozenset[ua.VariantType]] = {
    "double": frozenset({ua.VariantType.Double, ua.VariantType.Float}),
    "float": frozenset({ua.VariantType.Float}),
    "int32": frozenset({ua.VariantType.Int32, ua.VariantType.Int16, ua.VariantType.UInt16, ua.VariantType.SByte, ua.VariantType.Byte}),
    "uint32": frozenset({ua.VariantType.UInt32, ua.VariantType.UInt16, ua.VariantType.Byte}),
    "int16": frozenset({ua.VariantType.Int16, ua.VariantType.SByte, ua.VariantType.Byte}),
    "uint16": frozenset({ua.VariantType.UInt16, ua.VariantType.Byte}),
    "boolean": frozenset({ua.VariantType.Boolean}),
    "string": frozenset({ua.VariantType.String}),
}
"""The node DataTypes a signal the runtime only reads may have, for each tag map type: those whose every value the declared type holds exactly.

A written signal's node must have the declared type itself: the write carries
it as the explicit variant type, and a server answers another with
BadTypeMismatch.
"""
_CHECKED_ATTRIBUTES = (ua.AttributeIds.NodeClass, ua.AttributeIds.DataType, ua.AttributeIds.ValueRank, ua.AttributeIds.AccessLevel, ua.AttributeIds.UserAccessLevel)
_ABSTRACT_TYPE = ua.VariantType.Variant
"""asyncua's answer for a node declared with an abstract DataType (BaseDataType, Number, Integer, UInteger): any value of a subtype."""
_MAX_SCALAR_VALUE_RANK = -1
"""ValueRank -1 (scalar), -2 (any), -3 (scalar or one dimension) can hold one value; 0 and above are arrays."""


class OpcUaPort:
    """:class:`~controller.ports.PlcPort` over OPC UA.

    The tag map's ``security`` section decides how the port connects; the
    certificate, key, trust store and credentials it names are checked here,
    when the port is built (:class:`ConfigError` naming the field and the file
    or variable), and again at every connect (then a
    :class:`~controller.ports.PlcAuthError`: an operator can renew them without
    a restart). ``allow_insecure`` only permits security mode None where the
    map asks for no security; it never weakens a configured security section.
    ``auth_retry_after_s`` is the wait a :class:`~controller.ports.PlcAuthError`
    asks for.
    """

    def __init__(
        self,
        tag_map: OpcUaTagMap,
        *,
        endpoint: str | None = None,
        timeout_s: float = 5.0,
        allow_insecure: bool = False,
        auth_retry_after_s: float = DEFAULT_AUTH_RETRY_AFTER_S,
        auth_retry_max_s: float | None = None,
    ) -> None:
        if not timeout_s > 0.0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if not (auth_retry_after_s >= 0.0 and math.isfinite(auth_retry_after_s)):
            raise ValueError(f"auth_retry_after_s must be a finite number of seconds, not negative; got {auth_retry_after_s}")
        if auth_retry_max_s is None:
            auth_retry_max_s = max(DEFAULT_AUTH_RETRY_MAX_S, auth_retry_after_s)
        if not (auth_retry_max_s >= auth_retry_after_s and math.isfinite(auth_retry_max_s)):
            raise ValueError(f"auth_retry_max_s must be finite and at least auth_retry_after_s ({auth_retry_after_s}); got {auth_retry_max_s}")
        self.tag_map = tag_map
        self.endpoint = endpoint or tag_map.endpoint
        _check_endpoint(self.endpoint)
        self.timeout_s = timeout_s
        self.auth_retry_after_s = auth_retry_after_s
        self.auth_retry_max_s = auth_retry_max_s
        self._auth_refusals = 0
        """Refusals of this runtime's identity or rights in a row: the exponent of the back-off."""
        self._refused_writing = False
        """Whether a write was refused since the back-off last started (then only a write that goes through starts it again)."""
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
        self._misread: set[str] = set()
        """Signals whose value came with a type they cannot have, already logged since the connect."""

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def auth_refusals(self) -> int:
        """How many times in a row the PLC refused this runtime's identity or rights (0 once it accepts them)."""
        return self._auth_refusals

    def next_auth_wait_s(self) -> float:
        """The wait the next refusal asks for: ``auth_retry_after_s`` doubled for each refusal in a row before it, at most ``auth_retry_max_s``."""
        return min(self.auth_retry_after_s * 2.0 ** min(self._auth_refusals, 60), self.auth_retry_max_s)

    @property
    def security_policy_uri(self) -> str | None:
        """The security policy URI of the open channel (``...#None`` without security); None while not connected."""
        return self._client.security_policy.URI if self._client is not None else None

    @property
    def security_mode(self) -> ua.MessageSecurityMode | None:
        """The message security mode of the open channel; None while not connected."""
        return self._client.security_policy.Mode if self._client is not None else None

    async def connect(self) -> None:
        """Connect with a new client (a failed one is never reused), resolve the namespace index and check the tag map against the server.

        Raises :class:`PlcAuthError` when the server refuses this client's
        certificate or credentials, presents a certificate the trust store does
        not trust, or the runtime's own certificate, key, trust store or
        credentials cannot be used now (expired, not yet valid, unreadable);
        :class:`PlcMappingError` naming every mapped signal the server does not
        hold as mapped (and the namespace, if the server has none of that URI);
        :class:`PlcLinkError` for anything else: the server cannot be reached,
        does not answer in time, answers nonsense, or offers no endpoint with
        the configured policy and mode. Each says what it is in its message.
        After any of them the port is not connected. A :class:`PlcAuthError`
        asks for the back-off's next wait (:meth:`next_auth_wait_s`) and is
        logged once here (``opcua_access_refused``).
        """
        await self.close()
        client = Client(self.endpoint, timeout=self.timeout_s)
        connected = False
        wait_s = self.next_auth_wait_s()
        try:
            attempt: _SecureAttempt | None = None
            if self._security is None:
                log.warning("opcua_security_none", endpoint=self.endpoint, reason="security mode None by explicit opt-in; a test-only mode")
            else:
                attempt = await self._security.prepare(client, self.timeout_s, retry_after_s=wait_s)
            with _asyncua_refusals_quiet():
                await self._open_session(client, attempt, retry_after_s=wait_s)
            indices = await self._namespace_indices(client)
            try:
                nodes, unresolved = await resolve_nodes(client, self.tag_map, indices, timeout_s=self.timeout_s)
                check = await check_nodes(client, self.tag_map, nodes, timeout_s=self.timeout_s)
            except _LINK_ERRORS as error:
                raise PlcLinkError(f"{self.endpoint}: checking the tag map's nodes failed: {error!r}") from error
            if check.problems or unresolved:
                raise PlcMappingError({**unresolved, **check.all_problems()})
            if check.not_writable_by_user:
                raise PlcAuthError(
                    f"{self.endpoint}: the PLC gives this session no write rights on {', '.join(check.not_writable_by_user)} "
                    f"(their UserAccessLevel lacks CurrentWrite for {self._identity_text()}); {self._rights_advice()}",
                    retry_after_s=wait_s,
                )
            connected = True
        except PlcAuthError as error:
            self._auth_refused(error, writing=False)
            raise
        finally:
            if not connected:
                await _disconnect_quietly(client)
        self._client, self._nodes = client, nodes
        self._misread.clear()
        if not self._refused_writing:
            self._auth_refusals = 0
        policy = client.security_policy
        log.info(
            "opcua_connected",
            endpoint=self.endpoint,
            namespace_indices=indices,
            signals_checked=len(nodes),
            by_browse_path=sum(tag.browse_path is not None for tag in self.tag_map.tags.values()),
            security_policy=policy.URI.rpartition("#")[2],
            security_mode=policy.Mode.name,
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _disconnect_quietly(client)

    async def read(self) -> dict[str, Reading]:
        names = list(self._nodes)
        values = await self._read_nodes(names)
        readings = {}
        for name, value in zip(names, values, strict=True):
            reading, unexpected = _reading(self.tag_map.tags[name], name, value)
            if unexpected is not None and name not in self._misread:
                self._misread.add(name)
                log.warning("opcua_value_type_unexpected", signal=name, value_type=unexpected, detail="read as Bad until the next connect checks the node again")
            readings[name] = reading
        return readings

    async def write(self, values: Mapping[str, Value]) -> None:
        client = self._require_client()
        names = list(values)
        for name in names:
            if name not in self._nodes or not SIGNALS[name].writable:
                raise KeyError(f"{name} is not a writable signal of this tag map")
        data = [ua.DataValue(ua.Variant(_raw_value(self.tag_map.tags[name], name, values[name]), VARIANT_TYPES[self.tag_map.tags[name].type])) for name in names]
        wait_s = self.next_auth_wait_s()
        try:
            with _asyncua_refusals_quiet():
                statuses = await asyncio.wait_for(client.uaclient.write_attributes([self._nodes[n] for n in names], data), self.timeout_s)
        except ua.UaStatusCodeError as error:
            status = ua.StatusCode(ua.UInt32(error.code)).name
            await self.close()
            if status in _ACCESS_REFUSED or _is_certificate_problem(status):
                refused = PlcAuthError(
                    f"{self.endpoint}: the PLC refused the write of {', '.join(names)} as a whole ({status}): {self._identity_text()} has no write rights; "
                    f"nothing of it was applied; {self._rights_advice()}",
                    retry_after_s=wait_s,
                )
                self._auth_refused(refused, writing=True)
                raise refused from None
            raise PlcLinkError(f"{self.endpoint}: the PLC refused the write of {', '.join(names)} as a whole ({status}); state unknown, read again") from error
        except _LINK_ERRORS as error:
            await self.close()
            raise PlcLinkError(f"{self.endpoint}: write of {', '.join(names)} failed on the link: {error!r}; state unknown, read again") from error
        if len(statuses) != len(names):
            await self.close()
            raise PlcLinkError(f"{self.endpoint}: the server answered a write of {len(names)} values with {len(statuses)} statuses; state unknown, read again")
        refusals = {name: status.name for name, status in zip(names, statuses, strict=True) if not status.is_good()}
        accepted = [name for name in names if name not in refusals]
        if accepted:
            back = dict(zip(accepted, await self._read_nodes(accepted), strict=True))
            mismatched = {n: (values[n], _value_of(back[n])) for n in accepted if not _same(self.tag_map.tags[n], n, values[n], back[n])}
            if mismatched:
                raise PlcWriteMismatchError(f"{self.endpoint}: written values read back differently: {mismatched}")
        denied = [name for name, status in refusals.items() if status == "BadUserAccessDenied" and not name.startswith("SP.")]
        if denied:  # the reference PLC refuses only SP.* with this status (remote disabled): anything else is this session's rights
            await self.close()
            written = f"; written: {', '.join(accepted)}" if accepted else "; nothing written"
            refused = PlcAuthError(
                f"{self.endpoint}: the PLC refused writes of {', '.join(denied)} (BadUserAccessDenied): {self._identity_text()} has no write rights on them"
                f"{written}; {self._rights_advice()}",
                retry_after_s=wait_s,
            )
            self._auth_refused(refused, writing=True)
            raise refused
        if refusals:
            raise PlcWriteRefusedError(refusals)
        self._refused_writing, self._auth_refusals = False, 0

    # ------------------------------------------------------------------ helpers

    def _require_client(self) -> Client:
        if self._client is None:
            raise PlcLinkError(f"{self.endpoint}: not connected")
        return self._client

    def _auth_refused(self, error: PlcAuthError, *, writing: bool) -> None:
        """Count a refusal for the back-off and log it: one line, no traceback."""
        self._auth_refusals += 1
        self._refused_writing = self._refused_writing or writing
        log.error("opcua_access_refused", endpoint=self.endpoint, refusals_in_a_row=self._auth_refusals, retry_after_s=error.retry_after_s, reason=str(error))

    def _identity_text(self) -> str:
        """Who this session is to the PLC, as an operator compares it with the PLC's user management."""
        if self._security is None:
            return "an anonymous session with security mode None"
        return self._security.identity_text()

    def _rights_advice(self) -> str:
        if self._security is None:
            return "a PLC that restricts writes needs a security section with the runtime's certificate (docs/opcua-security.md)"
        return self._security.rights_advice()

    async def _open_session(self, client: Client, attempt: _SecureAttempt | None, *, retry_after_s: float) -> None:
        try:
            await asyncio.wait_for(client.connect(), self.timeout_s)
        except ua.UaStatusCodeError as error:
            if attempt is not None:
                raise attempt.refusal(error) from error
            raise _insecure_refusal(self.endpoint, error, retry_after_s=retry_after_s) from error
        except _LINK_ERRORS as error:
            raise PlcLinkError(f"{self.endpoint}: cannot connect: {error!r}") from error

    async def _namespace_indices(self, client: Client) -> dict[str, int]:
        """The index of every namespace of the tag map, by URI, from the server's namespace array (a missing one is a :class:`PlcMappingError`)."""
        try:
            namespaces = await asyncio.wait_for(client.get_namespace_array(), self.timeout_s)
        except _LINK_ERRORS as error:
            raise PlcLinkError(f"{self.endpoint}: cannot read the server's namespace array: {error!r}") from error
        if not isinstance(namespaces, list) or not all(isinstance(namespace, str) for namespace in namespaces):
            raise PlcLinkError(f"{self.endpoint}: the server's namespace array is not a list of strings: {namespaces!r}")
        fields = {"namespace_uri": self.tag_map.namespace_uri, **{f"namespaces.{name}": uri for name, uri in self.tag_map.namespaces.items()}}
        missing = {field: f"the server has no namespace {uri!r}; it has: {', '.join(namespaces)}" for field, uri in fields.items() if uri not in namespaces}
        if missing:
            raise PlcMappingError(missing)
        return {uri: namespaces.index(uri) for uri in fields.values()}

    async def _read_nodes(self, names: list[str]) -> list[ua.DataValue]:
        client = self._require_client()
        parameters = ua.ReadParameters()
        parameters.NodesToRead = [ua.ReadValueId(NodeId=self._nodes[name], AttributeId=ua.AttributeIds.Value) for name in names]
        parameters.TimestampsToReturn = ua.TimestampsToReturn.Both
        try:
            values = await asyncio.wait_for(client.uaclient.read(parameters), self.timeout_s)
        except _LINK_ERRORS as error:
            await self.close()
            raise PlcLinkError(f"{self.endpoint}: read failed: {error!r}") from error
        if len(values) != len(names):
            await self.close()
            raise PlcLinkError(f"{self.endpoint}: the server answered a read of {len(names)} values with {len(values)}")
        return values


def _check_endpoint(endpoint: str) -> None:
    """An endpoint the client can connect to: opc.tcp://host[:port][/path], without credentials (:class:`ConfigError` otherwise)."""
    try:
        check_endpoint_has_no_credentials(endpoint)
        parts = urlsplit(endpoint)
        port = parts.port  # a port that is not a number raises here
    except ValueError as error:
        raise ConfigError(f"endpoint {endpoint.split('@')[-1]!r}: {error}") from None
    if parts.scheme != "opc.tcp" or not parts.hostname:
        raise ConfigError(f"endpoint {endpoint!r}: expected opc.tcp://host:port/path, e.g. opc.tcp://10.20.0.5:4840/")
    if port == 0:
        raise ConfigError(f"endpoint {endpoint!r}: port 0 is not a port to connect to")


def _insecure_refusal(endpoint: str, error: ua.UaStatusCodeError, *, retry_after_s: float) -> PlcLinkError:
    """A refused session without security: the server wants a user (or a certificate), which mode None cannot give."""
    status = ua.StatusCode(ua.UInt32(error.code)).name
    if status in _CREDENTIALS_REFUSED or _is_certificate_problem(status):
        return PlcAuthError(
            f"{endpoint}: the server refused an anonymous session with security mode None ({status}); "
            "it needs a security section with a certificate and credentials (docs/opcua-security.md)",
            retry_after_s=retry_after_s,
        )
    return PlcLinkError(f"{endpoint}: the server refused the connection: {status}")


def _is_certificate_problem(status: str) -> bool:
    return status.startswith("BadCertificate") or status in _CERTIFICATE_PROBLEMS or status in ("BadApplicationSignatureInvalid", "BadNoValidCertificates")


class _RefusalNoise(logging.Filter):
    """Drops asyncua's client warnings about a refusal the port reports itself: the service fault, and closing a channel the server closed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "close_secure_channel was called but connection is closed":
            return False
        if isinstance(record.msg, str) and record.msg.startswith("ServiceFault (") and record.args:
            status = record.args[0] if isinstance(record.args, tuple) else None
            return not (isinstance(status, str) and (status in _ACCESS_REFUSED or _is_certificate_problem(status)))
        return True


_REFUSAL_NOISE = _RefusalNoise()


@contextlib.contextmanager
def _asyncua_refusals_quiet() -> Iterator[None]:
    """While a connect or write runs: asyncua does not log again the refusals the port turns into one ``opcua_access_refused`` line."""
    loggers = [logging.getLogger(name) for name in _ASYNCUA_CLIENT_LOGGERS]
    for logger in loggers:
        logger.addFilter(_REFUSAL_NOISE)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_REFUSAL_NOISE)


# --------------------------------------------------------------------------- the tag map against the server


@dataclass(frozen=True)
class NodeCheck:
    """What :func:`check_nodes` found: the tag map's problems, and the written signals this session's user may not write."""

    problems: dict[str, str]
    """Signal: what does not fit (the node is missing, of another type, not writable at all, ...)."""
    not_writable_by_user: tuple[str, ...]
    """Written signals whose UserAccessLevel lacks CurrentWrite for this session: the PLC withholds write rights from this identity."""

    def all_problems(self) -> dict[str, str]:
        """Every problem, the missing write rights included, as :class:`~controller.ports.PlcMappingError` lists them."""
        denied = {name: f"may not be written by this session's user (its UserAccessLevel lacks CurrentWrite), and the runtime writes {name}" for name in self.not_writable_by_user}
        return {**denied, **self.problems}


_NO_REMAINING_PATH = 0xFFFFFFFF
"""A BrowsePathTarget's RemainingPathIndex when the whole path was followed on this server."""


def browse_path_of(tag_map: OpcUaTagMap, tag: OpcUaTag, indices: Mapping[str, int]) -> ua.BrowsePath:
    """A tag's browse path as the TranslateBrowsePathsToNodeIds request carries it: from the Objects folder along hierarchical references."""
    if tag.browse_path is None:
        raise ValueError("the tag has a node id, not a browse path")
    default = indices[tag_map.namespace_of(tag)]
    elements = [
        ua.RelativePathElement(
            ReferenceTypeId=ua.NodeId(ua.Int32(ua.ObjectIds.HierarchicalReferences)),
            IsInverse=False,  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values
            IncludeSubtypes=True,  # type: ignore[arg-type]  # asyncua's annotations name its scalar classes; it takes plain values
            TargetName=ua.QualifiedName(ua.String(name), ua.UInt16(indices[tag_map.namespaces[namespace]] if namespace is not None else default)),
        )
        for namespace, name in split_browse_path(tag.browse_path)
    ]
    return ua.BrowsePath(StartingNode=ua.NodeId(ua.Int32(ua.ObjectIds.ObjectsFolder)), RelativePath=ua.RelativePath(Elements=elements))


async def resolve_nodes(client: Client, tag_map: OpcUaTagMap, indices: Mapping[str, int], *, timeout_s: float) -> tuple[dict[str, ua.NodeId], dict[str, str]]:
    """The node id of every mapped signal, and what is wrong with those whose browse path leads nowhere.

    A node id (string or numeric) is taken as it is, in its namespace's index
    on this server; the browse paths are resolved together by the server in
    one TranslateBrowsePathsToNodeIds request. A path must lead to exactly one
    node on this server. Raises what asyncua raises when the link fails.
    """
    nodes: dict[str, ua.NodeId] = {}
    by_path: list[str] = []
    for name, tag in tag_map.tags.items():
        if tag.node is None:
            by_path.append(name)
            continue
        identifier = ua.Int32(tag.node) if isinstance(tag.node, int) else ua.String(tag.node)  # a numeric identifier is a UInt32; asyncua annotates it Int32
        nodes[name] = ua.NodeId(identifier, ua.Int16(indices[tag_map.namespace_of(tag)]))
    if not by_path:
        return nodes, {}
    paths = [browse_path_of(tag_map, tag_map.tags[name], indices) for name in by_path]
    results = await asyncio.wait_for(client.uaclient.translate_browsepaths_to_nodeids(paths), timeout_s)
    if len(results) != len(paths):
        raise ua.UaError(f"the server answered {len(paths)} browse paths with {len(results)} results")
    problems: dict[str, str] = {}
    for name, result in zip(by_path, results, strict=True):
        where = f"browse path {tag_map.tags[name].browse_path!r} (from the Objects folder)"
        status = result.StatusCode
        complete = [
            target for target in result.Targets if target.RemainingPathIndex == _NO_REMAINING_PATH and getattr(target.TargetId, "ServerIndex", 0) == 0
        ]  # asyncua decodes a local target as a plain NodeId
        if status is not None and not status.is_good():
            problems[name] = f"{where} leads to no node ({status.name})"
        elif len(complete) != 1:
            found = ", ".join(target.TargetId.to_string() for target in result.Targets) or "none"
            problems[name] = f"{where} leads to {len(complete)} nodes on this server, not one (targets: {found}); give the node id instead"
        else:
            target = complete[0].TargetId
            nodes[name] = ua.NodeId(target.Identifier, target.NamespaceIndex, target.NodeIdType)
    return nodes, problems


async def mapping_problems(client: Client, tag_map: OpcUaTagMap, nodes: Mapping[str, ua.NodeId], *, timeout_s: float) -> dict[str, str]:
    """What is wrong with each mapped signal on this server (empty when the tag map fits), write rights included (:func:`check_nodes`)."""
    return (await check_nodes(client, tag_map, nodes, timeout_s=timeout_s)).all_problems()


async def check_nodes(client: Client, tag_map: OpcUaTagMap, nodes: Mapping[str, ua.NodeId], *, timeout_s: float) -> NodeCheck:
    """What is wrong with each mapped signal on this server, and which written ones this session may not write, from one Read request.

    For each node: NodeClass, DataType, ValueRank, AccessLevel and
    UserAccessLevel. A node must exist, be a Variable holding a single value,
    be readable, have the declared type (a signal the runtime only reads may
    have any type in :data:`READABLE_AS`; a DataType derived from a built-in
    one, such as Duration or an enumeration, counts as its base type), and, if
    the runtime writes it, be writable by this session's user. Raises what
    asyncua raises when the link fails.
    """
    names = list(nodes)
    requested = [(name, attribute) for name in names for attribute in _CHECKED_ATTRIBUTES]
    answers = await _read_attributes(client, [ua.ReadValueId(NodeId=nodes[name], AttributeId=attribute) for name, attribute in requested], timeout_s=timeout_s)
    attributes: dict[str, dict[ua.AttributeIds, ua.DataValue]] = {name: {} for name in names}
    for (name, attribute), answer in zip(requested, answers, strict=True):
        attributes[name][attribute] = answer
    base_types = await _base_types(client, [_attribute_value(attributes[name][ua.AttributeIds.DataType]) for name in names], timeout_s=timeout_s)
    problems: dict[str, str] = {}
    not_writable_by_user: list[str] = []
    unchecked: list[str] = []
    for name in names:
        tag, found = tag_map.tags[name], attributes[name]
        where = f"node {nodes[name].to_string()!r}" + (f" (browse path {tag.browse_path!r})" if tag.browse_path is not None else "")
        node_class = found[ua.AttributeIds.NodeClass]
        if not _good(node_class):
            status = node_class.StatusCode.name if node_class.StatusCode is not None else "no answer"
            problems[name] = f"{where} does not exist ({status})" if status == "BadNodeIdUnknown" else f"{where} cannot be read ({status})"
            continue
        if _attribute_value(node_class) != ua.NodeClass.Variable:
            problems[name] = f"{where} is not a Variable (NodeClass {_node_class_name(_attribute_value(node_class))})"
            continue
        found_problems = []
        data_type = _attribute_value(found[ua.AttributeIds.DataType])
        base = base_types.get(data_type) if isinstance(data_type, ua.NodeId) else None
        if base is _ABSTRACT_TYPE:
            unchecked.append(name)
        elif (type_problem := _type_problem(tag, name, data_type, base)) is not None:
            found_problems.append(f"{where} {type_problem}")
        value_rank = _attribute_value(found[ua.AttributeIds.ValueRank])
        if isinstance(value_rank, int) and value_rank > _MAX_SCALAR_VALUE_RANK and value_rank not in (-2, -3):
            found_problems.append(f"{where} holds an array (ValueRank {value_rank}); a signal is one value")
        access = _attribute_value(found[ua.AttributeIds.AccessLevel])
        user_access = _attribute_value(found[ua.AttributeIds.UserAccessLevel])  # optional on some servers: checked only when answered
        if isinstance(access, int) and not access & ua.AccessLevel.CurrentRead.mask:
            found_problems.append(f"{where} is not readable (its AccessLevel lacks CurrentRead)")
        if SIGNALS[name].writable:
            if isinstance(access, int) and not access & ua.AccessLevel.CurrentWrite.mask:
                found_problems.append(f"{where} is not writable (its AccessLevel lacks CurrentWrite), and the runtime writes {name}")
            elif isinstance(user_access, int) and not user_access & ua.AccessLevel.CurrentWrite.mask:
                not_writable_by_user.append(name)
        if found_problems:
            problems[name] = "; ".join(found_problems)
    if unchecked:
        log.warning("opcua_node_type_abstract", signals=unchecked, detail="declared with an abstract DataType (BaseDataType, Number, ...): its values' types are not checked")
    return NodeCheck(problems, tuple(not_writable_by_user))


async def _read_attributes(client: Client, items: list[ua.ReadValueId], *, timeout_s: float) -> list[ua.DataValue]:
    """Read ``items`` in one request; in several if the server says that is too many (BadTooManyOperations) and what it allows."""
    try:
        return await _read_request(client, items, timeout_s=timeout_s)
    except ua.UaStatusCodeError as error:
        if error.code != ua.StatusCodes.BadTooManyOperations:
            raise
    limit_node = client.get_node(ua.NodeId(ua.Int32(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)))
    limit = await asyncio.wait_for(limit_node.read_value(), timeout_s)
    if not isinstance(limit, int) or limit < 1:
        raise ua.UaError(f"the server refuses {len(items)} attributes in one read (BadTooManyOperations) and gives MaxNodesPerRead {limit!r}")
    answers: list[ua.DataValue] = []
    for start in range(0, len(items), limit):
        answers.extend(await _read_request(client, items[start : start + limit], timeout_s=timeout_s))
    return answers


async def _read_request(client: Client, items: list[ua.ReadValueId], *, timeout_s: float) -> list[ua.DataValue]:
    parameters = ua.ReadParameters()
    parameters.NodesToRead = items
    answers = await asyncio.wait_for(client.uaclient.read(parameters), timeout_s)
    if len(answers) != len(items):
        raise ua.UaError(f"the server answered a read of {len(items)} attributes with {len(answers)}")
    return answers


async def _base_types(client: Client, data_types: list[Any], *, timeout_s: float) -> dict[ua.NodeId, ua.VariantType | None]:
    """The built-in type of each DataType (a few browse requests for each one that is not built in; None where it has none)."""
    bases: dict[ua.NodeId, ua.VariantType | None] = {}
    for data_type in data_types:
        if not isinstance(data_type, ua.NodeId) or data_type in bases:
            continue
        builtin = _builtin_type(data_type)
        if builtin is not None:
            bases[data_type] = builtin
            continue
        try:
            bases[data_type] = await asyncio.wait_for(data_type_to_variant_type(client.get_node(data_type)), timeout_s)
        except ua.UaStatusCodeError:  # the server failed the browse: a link problem, not the map's
            raise
        except ua.UaError as error:  # asyncua: not derived from a built-in type
            log.debug("opcua_data_type_unresolved", data_type=data_type.to_string(), reason=str(error))
            bases[data_type] = None
    return bases


def _builtin_type(data_type: ua.NodeId) -> ua.VariantType | None:
    identifier = data_type.Identifier
    if data_type.NamespaceIndex != 0 or not isinstance(identifier, int) or isinstance(identifier, bool) or not 1 <= identifier <= 25:
        return None
    return ua.VariantType(identifier)


def _type_problem(tag: OpcUaTag, name: str, data_type: Any, base: ua.VariantType | None) -> str | None:
    """Why a node of ``data_type`` (built-in type ``base``) cannot carry the signal as the tag map declares it; None when it can."""
    declared = VARIANT_TYPES[tag.type]
    if base is None:
        shown = data_type.to_string() if isinstance(data_type, ua.NodeId) else repr(data_type)
        return f"has the DataType {shown}, which is not derived from a built-in type; the map declares {tag.type}"
    if SIGNALS[name].writable:
        if base is declared:
            return None
        fitting = [type_name for type_name, variant in VARIANT_TYPES.items() if variant is base]
        hint = f" (declare {fitting[0]})" if fitting else ""
        return f"holds {base.name}; the map declares {tag.type}, and a written signal needs the node's own type, which the write carries{hint}"
    if base in READABLE_AS[tag.type]:
        return None
    allowed = ", ".join(sorted(variant.name for variant in READABLE_AS[tag.type]))
    return f"holds {base.name}; the map declares {tag.type} (a node of {allowed})"


def _good(data: ua.DataValue) -> bool:
    return data.StatusCode is None or data.StatusCode.is_good()


def _attribute_value(data: ua.DataValue) -> Any:
    return data.Value.Value if _good(data) and data.Value is not None else None


def _value_of(data: ua.DataValue) -> Any:
    return data.Value.Value if data.Value is not None else None


def _node_class_name(value: Any) -> str:
    try:
        return ua.NodeClass(value).name
    except ValueError:
        return repr(value)


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
    A problem found when the port is built is a :class:`ConfigError` (the
    runtime does not start); the same problem found at a connect is a
    :class:`PlcAuthError` (the runtime waits and tries again).
    """

    def __init__(self, settings: OpcUaSecurity, endpoint: str) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.policy = SECURITY_POLICIES[settings.policy]
        self.mode = SECURITY_MODES[settings.mode]
        self._certificate = self._identity().certificate
        """The runtime's certificate as last read: what the PLC is told to trust or give write rights to."""
        self._username: str | None = None
        """The user name of the last connect (None: anonymous)."""
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
        invalid = validity_problem(certificate, now=dt.datetime.now(dt.UTC))
        if invalid is not None:
            raise ConfigError(f"{where}: {invalid}; the PLC would refuse it: make a new one (`bioreactor-mpc certs`) and have the PLC trust it")
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

    async def prepare(self, client: Client, timeout_s: float, *, retry_after_s: float) -> _SecureAttempt:
        """Give ``client`` the policy, the certificates and the credentials, after checking the server's certificate.

        The runtime's own certificate, key, trust store and credentials are
        read again first; one that cannot be used now (expired, not yet valid,
        unreadable, a variable unset) is a :class:`PlcAuthError` naming the
        file or variable, and nothing is sent. The server's endpoints are
        asked for over an unsecured channel (OPC UA discovery); the endpoint
        with the configured policy and mode gives the server's certificate,
        which must pass the trust store (:class:`PlcAuthError` otherwise)
        before anything else is sent. asyncua checks again, when the session
        is created, that the server signs with the same certificate.
        """
        try:
            identity = self._identity()
            self._certificate = identity.certificate
            store = await load_trust_store(self._path("trust_store"), field="security.trust_store")
            credentials = self._credentials()
            self._username = credentials[0] if credentials is not None else None
        except ConfigError as error:  # names the field and the file or variable
            raise PlcAuthError(f"{self.endpoint}: not connecting: {error}", retry_after_s=retry_after_s) from None
        except (OSError, ValueError) as error:  # a trusted certificate changed between the check and asyncua's loading it
            raise PlcAuthError(
                f"{self.endpoint}: not connecting: security.trust_store: {self.settings.trust_store}: cannot be loaded ({error})", retry_after_s=retry_after_s
            ) from None
        validator = certificate_validator(store, peer="server")
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
        try:
            server_certificate = x509_from_der(endpoint.ServerCertificate)
        except ValueError as error:
            raise PlcAuthError(f"{self.endpoint}: the server's {wanted} endpoint comes with a certificate that cannot be read: {error}", retry_after_s=retry_after_s) from None
        if server_certificate is None:
            raise PlcLinkError(f"{self.endpoint}: the server's {wanted} endpoint comes without a certificate")
        try:
            await validator(server_certificate, endpoint.Server)
        except ServiceError as error:
            raise PlcAuthError(self.server_refused(server_certificate, ua.StatusCode(ua.UInt32(error.code)).name), retry_after_s=retry_after_s) from None
        except ValueError as error:  # an extension cryptography cannot parse
            raise PlcAuthError(self.server_refused(server_certificate, f"BadCertificateInvalid ({error})"), retry_after_s=retry_after_s) from None
        client.application_uri = identity.application_uri
        client.name = client.description = "bioreactor-mpc runtime"
        client.certificate_validator = validator
        try:
            await client.set_security(
                self.policy,
                certificate=identity.certificate_der,
                private_key=identity.private_key_der,
                server_certificate=server_certificate.public_bytes(serialization.Encoding.DER),
                mode=self.mode,
            )
        except (ValueError, TypeError, ua.UaError) as error:  # asyncua could not use a certificate or the key for this policy
            raise PlcAuthError(
                f"{self.endpoint}: the {wanted} channel cannot be set up with {self.settings.certificate} and the server's certificate: {error!r}", retry_after_s=retry_after_s
            ) from None
        if credentials is not None:
            client.set_user(credentials[0])
            client.set_password(credentials[1])
        return _SecureAttempt(self, identity, server_certificate, credentials[0] if credentials is not None else None, retry_after_s)

    def identity_text(self) -> str:
        """This runtime's identity as the PLC sees it: its certificate (file and fingerprint) and its user, if any."""
        user = f" and user {self._username!r} (from ${self.settings.username_env})" if self._username is not None else ""
        return f"this runtime's identity (certificate {self.settings.certificate}, SHA-256 {fingerprint(self._certificate)}{user})"

    def rights_advice(self) -> str:
        """What the PLC's administrator does so that the runtime may write."""
        who = "the runtime's user, or its certificate," if self.settings.username_env is not None else "the runtime's certificate"
        return f"on the PLC, give {who} write rights on the runtime's signals (SP.*, MPC.*); other clients stay read-only (docs/opcua-security.md)"

    def server_refused(self, certificate: x509.Certificate, status: str) -> str:
        """Why the server's certificate is refused, and what the operator does about it."""
        problem = _CERTIFICATE_PROBLEMS.get(status.partition(" ")[0], "it failed the checks")
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
    retry_after_s: float

    def refusal(self, error: ua.UaStatusCodeError) -> PlcLinkError:
        """The refusal, saying whose fault it is (never with the password).

        A :class:`PlcAuthError` when the server refused the credentials or this
        client's certificate, or asyncua's second check of the server's
        certificate failed; a :class:`PlcLinkError` otherwise.
        """
        status = ua.StatusCode(ua.UInt32(error.code)).name
        endpoint, settings = self.security.endpoint, self.security.settings
        if isinstance(error.__cause__, ServiceError):  # asyncua's client ran our validator again when creating the session
            return PlcAuthError(self.security.server_refused(self.server_certificate, status), retry_after_s=self.retry_after_s)
        if status in _CREDENTIALS_REFUSED:
            if self.username is None:
                return PlcAuthError(
                    f"{endpoint}: the server refused an anonymous session ({status}); it needs a user name and password (docs/opcua-security.md)",
                    retry_after_s=self.retry_after_s,
                )
            source = f"${settings.password_env}" if settings.password_env is not None else str(settings.password_file)
            return PlcAuthError(
                f"{endpoint}: the server refused the credentials ({status}) of user {self.username!r} (from ${settings.username_env}, password from {source})",
                retry_after_s=self.retry_after_s,
            )
        if status in ("BadCertificateUntrusted", "BadSecurityChecksFailed"):
            why = "" if status == "BadCertificateUntrusted" else ", which PLCs answer for a client certificate they do not trust"
            return PlcAuthError(
                f"{endpoint}: the PLC does not trust this runtime's certificate ({status}{why}), SHA-256 {fingerprint(self.identity.certificate)}: "
                f"add {settings.certificate} to the PLC's trusted client certificates and compare the fingerprint it shows "
                f"({describe(self.identity.certificate)})",
                retry_after_s=self.retry_after_s,
            )
        if _is_certificate_problem(status):
            return PlcAuthError(
                f"{endpoint}: the PLC refused this runtime's certificate ({status}; {_CERTIFICATE_PROBLEMS.get(status, 'it failed the PLC checks')}): "
                f"{describe(self.identity.certificate)}; make one that passes (bioreactor-mpc certs) and add it to the PLC's trusted client certificates",
                retry_after_s=self.retry_after_s,
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


_PYTHON_TYPES: dict[Kind, tuple[type, ...]] = {Kind.REAL: (float, int), Kind.UNSIGNED: (int,), Kind.INTEGER: (int,), Kind.BOOLEAN: (bool,), Kind.TEXT: (str,)}


def _reading(tag: OpcUaTag, name: str, data: ua.DataValue) -> tuple[Reading, str | None]:
    """The reading of one value, and the name of its type if it is not one the signal can have (then it reads Bad)."""
    good = data.StatusCode is None or data.StatusCode.is_good()
    raw: Any = data.Value.Value if data.Value is not None else None
    kind = SIGNALS[name].kind
    no_value = math.nan if kind is Kind.REAL else "" if kind is Kind.TEXT else False if kind is Kind.BOOLEAN else 0
    if raw is None:
        return Reading(no_value, False, data.SourceTimestamp), None
    if not isinstance(raw, _PYTHON_TYPES[kind]) or (isinstance(raw, bool) and kind is not Kind.BOOLEAN):
        return Reading(no_value, False, data.SourceTimestamp), type(raw).__name__
    return Reading(tag.to_engineering(raw), good, data.SourceTimestamp), None


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
        with _asyncua_refusals_quiet():  # closing a channel the server already closed is no news
            await asyncio.wait_for(client.disconnect(), 2.0)
    except Exception as error:  # noqa: BLE001 - a broken link may fail in any way while closing; it is dropped either way
        log.debug("opcua_disconnect_failed", error=repr(error))
