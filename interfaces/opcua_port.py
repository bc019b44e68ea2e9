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

Security: this version connects with security mode None only, and only when
the caller opts in (``allow_insecure=True``), which logs a warning at every
connect. SignAndEncrypt with a client certificate and a trust store is the
next step (docs/plc-interface.md).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any

import structlog
from asyncua import Client, ua

from controller.ports import PlcLinkError, PlcWriteMismatchError, PlcWriteRefusedError, Reading, Value
from interfaces.signals import SIGNALS, Kind
from interfaces.tagmap import OpcUaTag, OpcUaTagMap
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
_FLOAT_READBACK_REL = {"double": 1e-12, "float": 1e-6}
_LINK_ERRORS = (OSError, TimeoutError, asyncio.TimeoutError, ua.UaError, ConnectionError)


class OpcUaPort:
    """:class:`~controller.ports.PlcPort` over OPC UA."""

    def __init__(self, tag_map: OpcUaTagMap, *, endpoint: str | None = None, timeout_s: float = 5.0, allow_insecure: bool = False) -> None:
        if not allow_insecure:
            raise ConfigError(
                "OPC UA SignAndEncrypt is not available in this version of the port; connecting with security mode None "
                "needs an explicit opt-in (allow_insecure=True), and only belongs on 127.0.0.1 or an isolated cell network"
            )
        self.tag_map = tag_map
        self.endpoint = endpoint or tag_map.endpoint
        self.timeout_s = timeout_s
        self._client: Client | None = None
        self._nodes: dict[str, ua.NodeId] = {}

    @property
    def connected(self) -> bool:
        return self._client is not None

    async def connect(self) -> None:
        """Connect with a new client (a failed one is never reused) and resolve the namespace index."""
        await self.close()
        log.warning("opcua_security_none", endpoint=self.endpoint, reason="security mode None by explicit opt-in")
        client = Client(self.endpoint, timeout=self.timeout_s)
        try:
            await asyncio.wait_for(client.connect(), self.timeout_s)
            index = await asyncio.wait_for(client.get_namespace_index(self.tag_map.namespace_uri), self.timeout_s)
        except _LINK_ERRORS as error:
            await _disconnect_quietly(client)
            raise PlcLinkError(f"{self.endpoint}: cannot connect or resolve namespace {self.tag_map.namespace_uri!r}: {error!r}") from error
        except ValueError as error:  # the namespace URI is not in the server's array
            await _disconnect_quietly(client)
            raise PlcLinkError(f"{self.endpoint}: the server has no namespace {self.tag_map.namespace_uri!r}") from error
        self._client = client
        self._nodes = {name: ua.NodeId(tag.node, index) for name, tag in self.tag_map.tags.items()}
        log.info("opcua_connected", endpoint=self.endpoint, namespace_index=index)

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
