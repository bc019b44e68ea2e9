"""The simulated PLC seen by an OPC UA client that is not asyncua: node-opcua's, as many SCADA and edge tools use.

`hil_tests/node_opcua/client.js` browses the folders, follows a browse path,
reads the analog items' type, EURange and EngineeringUnits and the server's
BuildInfo, subscribes to a probe, and writes: accepted, out of range, of the
wrong type, to a read-only value, several values with a status each, and a
setpoint while the operator holds the PLC in local. This test serves the PLC
and judges what the client printed.

node-opcua-client is installed once with `npm ci` from the committed lock
file into a cache directory outside the checkout
(``$XDG_CACHE_HOME/bioreactor-mpc/node-opcua-<digest>``); the test is skipped
when node or npm is missing or the registry cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from interfaces.tagmap import OpcUaTagMap, load_tag_map
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.opcua_server import OpcUaPlcServer

pytestmark = pytest.mark.hil

REPO = Path(__file__).resolve().parent.parent
CLIENT = Path(__file__).resolve().parent / "node_opcua"
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"
REFERENCE_MAP = REPO / "configs" / "plc" / "reference-opcua.yaml"
CELSIUS, LITRE, LITRE_PER_HOUR, MILLIMOLE_PER_LITRE = 4408652, 5002322, 4535090, 5059379
"""UNECE CEL, LTR, E32, M33 as OPC UA UnitIds."""


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """node-opcua-client installed from the lock file, in a cache directory keyed by the lock's digest."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        pytest.skip("node and npm are needed to run node-opcua's client")
    manifest, lock = (CLIENT / "package.json").read_bytes(), (CLIENT / "package-lock.json").read_bytes()
    digest = hashlib.sha256(manifest + lock).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bioreactor-mpc" / f"node-opcua-{digest}"
    if not (cache / "node_modules" / "node-opcua-client" / "package.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copy(CLIENT / "package.json", cache / "package.json")
        shutil.copy(CLIENT / "package-lock.json", cache / "package-lock.json")
        installed = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=cache, capture_output=True, text=True, timeout=600, check=False)
        if installed.returncode != 0:
            pytest.skip(f"npm ci of node-opcua-client failed (registry unreachable?): {installed.stderr[-600:]}")
    return cache / "node_modules"


async def _node_client(node_modules: Path, home: Path, endpoint: str, step: str) -> dict[str, Any]:
    """Run client.js and return the JSON object it prints last (node-opcua logs to stdout too)."""
    environment = {**os.environ, "NODE_PATH": str(node_modules), "HOME": str(home)}  # node-opcua keeps its own certificate under HOME
    process = await asyncio.create_subprocess_exec(
        "node", str(CLIENT / "client.js"), endpoint, step, cwd=home, env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode(errors="replace")[-2000:]
    lines = [line for line in stdout.decode().splitlines() if line.startswith("{")]
    assert lines, stdout.decode(errors="replace")[-2000:]
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def test_node_opcua_browses_reads_units_subscribes_and_is_refused_per_value(node_modules, opcua_endpoint, tmp_path):
    tag_map = load_tag_map(REFERENCE_MAP)
    assert isinstance(tag_map, OpcUaTagMap)
    loaded = load_simulation(PLATFORM)
    equipment = loaded.batch.equipment

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], float, int]:
        plc, _ = build_simulated_plc(loaded)
        plc.set_operator_remote(True)
        server = OpcUaPlcServer(plc, tag_map, endpoint=opcua_endpoint, batch=loaded.batch)
        await server.start()

        async def scanning() -> None:  # the PLC scans on, a plant minute a scan, while the client subscribes
            while True:
                await asyncio.sleep(0.1)
                plc.advance_to(plc.process_time_h + 1.0 / 60.0)
                await server.publish()

        scanner = asyncio.create_task(scanning())
        try:
            inspected = await _node_client(node_modules, tmp_path, opcua_endpoint, "inspect")
            feed_rate = float(plc.snapshot()["SP.FeedRate"].value)
            plc.set_operator_remote(False)
            await server.publish()
            refused = await _node_client(node_modules, tmp_path, opcua_endpoint, "refused")
            return inspected, refused, feed_rate, plc.heartbeat
        finally:
            scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scanner
            await server.stop()

    inspected, refused, feed_rate, heartbeat = asyncio.run(asyncio.wait_for(scenario(), 180))

    folders = inspected["folders"]
    assert set(folders) == {"PV", "SP", "Sample", "Status", "MPC", "Sim"}
    assert folders["SP"] == ["FeedRate", "GlucoseRate", "HarvestRequest", "Temperature"]
    assert folders["MPC"] == ["Heartbeat", "Mode", "Pred", "Rec"]
    assert inspected["temperatureByPath"] == [f"ns={inspected['namespaceIndex']};s=BR01.PV.Temperature"]

    types, properties = inspected["typeDefinitions"], inspected["properties"]
    assert types["PV.Temperature"] == types["SP.FeedRate"] == types["PV.OUR"] == ["ns=0;i=2368"]  # AnalogItemType
    assert types["Status.Phase"] == ["ns=0;i=63"] and properties["Status.Phase"] == {}  # an enumeration: no unit, no range
    assert properties["SP.FeedRate"]["EURange"] == {"low": 0, "high": equipment.feed_rate_max_lph}
    assert properties["SP.Temperature"]["EURange"] == {"low": equipment.temperature_min_degc, "high": equipment.temperature_max_degc}
    assert properties["PV.Volume"]["EURange"] == {"low": 0, "high": equipment.max_working_volume_l}
    units = {name: (found["EngineeringUnits"]["unitId"], found["EngineeringUnits"]["displayName"]) for name, found in properties.items() if found}
    assert units["PV.Temperature"] == (CELSIUS, "°C") and units["SP.Temperature"][0] == CELSIUS
    assert units["PV.Volume"] == (LITRE, "L") and units["SP.FeedRate"] == (LITRE_PER_HOUR, "L/h")
    assert units["Sample.Glutamine"][0] == MILLIMOLE_PER_LITRE
    assert units["PV.OUR"][0] == -1  # no UNECE code for mmol/(L·h)
    assert {found["EngineeringUnits"]["namespaceUri"] for found in properties.values() if found} == {"http://www.opcfoundation.org/UA/units/un/cefact"}

    product_uri, manufacturer, product, version, server_array = inspected["build"]
    assert (product_uri, manufacturer, product) == ("urn:bioreactor-mpc:plc-sim", "bioreactor-mpc project", "bioreactor-mpc simulated reference PLC")
    assert version and server_array[0].endswith(":bioreactor-mpc:plc-sim")

    changes = inspected["changes"]
    assert len(changes) >= 3 and {change["status"] for change in changes} == {"Good"}
    stamps = [datetime.fromisoformat(change["source"].replace("Z", "+00:00")) for change in changes]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)  # each new value with its own, later timestamp
    assert len({change["value"] for change in changes}) == len(changes)

    writes = inspected["writes"]
    assert writes["good"] == ["Good"]
    assert writes["outOfRange"] == ["BadOutOfRange"]
    assert writes["typeMismatch"] == ["BadTypeMismatch"]
    assert writes["notWritable"] == ["BadNotWritable"]
    assert writes["perValue"] == ["Good", "BadOutOfRange", "Good"]  # one status per value; the refused one changed nothing
    assert inspected["feedRateAfter"] == feed_rate == 2.0
    assert refused["writes"] == {"remoteDisabled": ["BadUserAccessDenied"], "heartbeat": ["Good"]}
    assert heartbeat == 6
