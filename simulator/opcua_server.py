"""The simulated PLC served over OPC UA (asyncua), exactly as the tag map and the reference interface say.

Every mapped signal is a variable ``ns=<idx>;s=<node>`` in the map's
namespace, with the map's data type. :meth:`OpcUaPlcServer.publish` scans the
PLC and writes every value with its status (Good, or Bad for a failed probe or
an unmeasured lab field) and a wall-clock UTC source timestamp. A client's
write to a writable variable goes through the PLC's own logic: refused with
``BadUserAccessDenied`` while remote is disabled, ``BadOutOfRange`` outside the
equipment's range, and the old value stays.

The clocks (lockstep and free-running) are :class:`~simulator.clocks.PlcServerClocks`.

Security: this first version serves security mode None only, for 127.0.0.1;
the SignAndEncrypt endpoint comes with the runtime's OPC UA port.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import structlog
from asyncua import Server, ua
from asyncua.server.address_space import NodeData

from interfaces.opcua_port import VARIANT_TYPES
from interfaces.signals import SIGNALS
from interfaces.tagmap import OpcUaTagMap
from plant_models.errors import RemoteDisabledError, SetpointOutOfRangeError
from simulator.clocks import PlcServerClocks
from simulator.plc import SimulatedPlc

log = structlog.get_logger(__name__)

_DEFAULTS: dict[str, Any] = {"double": 0.0, "float": 0.0, "boolean": False, "string": ""}


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

    def __init__(self, plc: SimulatedPlc, tag_map: OpcUaTagMap, *, endpoint: str | None = None) -> None:
        super().__init__(plc)
        self.tag_map = tag_map
        self.endpoint = endpoint or tag_map.endpoint
        self._server = Server()
        self._nodes: dict[str, ua.NodeId] = {}
        self._publishing = False
        self._scans: dict[str, tuple[float, datetime]] = {}

    async def start(self) -> None:
        server = self._server
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("bioreactor-mpc simulated reference PLC")
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self._answer_writes_per_node()
        index = await server.register_namespace(self.tag_map.namespace_uri)
        folder = await server.nodes.objects.add_object(ua.NodeId("BR01", index), ua.QualifiedName("BR01", index))
        snapshot = self.plc.snapshot()
        for name, tag in self.tag_map.tags.items():
            reading = snapshot.get(name)
            initial = _raw(tag.to_raw(reading.value), tag.type) if reading is not None else _DEFAULTS.get(tag.type, 0)
            node = await folder.add_variable(ua.NodeId(tag.node, index), ua.QualifiedName(name, index), ua.Variant(initial, VARIANT_TYPES[tag.type]))
            if SIGNALS[name].writable:
                await node.set_writable()
                server.set_attribute_value_setter(node.nodeid, self._setter(name))
            self._nodes[name] = node.nodeid
        await server.start()
        await self.publish()
        log.info("opcua_plc_started", endpoint=self.endpoint, namespace_index=index, variables=len(self._nodes))

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
                status = ua.StatusCode(ua.StatusCodes.Good if reading.good else ua.StatusCodes.Bad)
                variant = ua.Variant(_raw(tag.to_raw(reading.value), tag.type), VARIANT_TYPES[tag.type])
                scanned = self._source_time(name, reading.scanned_at_h, now)
                await self._server.write_attribute_value(self._nodes[name], ua.DataValue(variant, StatusCode=status, SourceTimestamp=scanned, ServerTimestamp=now))
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
            attribute.value = ua.DataValue(value.Value, SourceTimestamp=now, ServerTimestamp=now)
            if self.plc.heartbeat != before:
                self.heartbeat_moved.set()

        return setter

