"""Certificates, tag maps and a secured simulated PLC for the OPC UA access tests, all on 127.0.0.1 in a temporary directory.

Every certificate is made with the operator's function,
:func:`interfaces.opcua_certificates.create_certificate`: the runtime's, the
PLC's, an operator's HMI (trusted by the PLC, not a writer) and a stranger's
(trusted by nobody).
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from interfaces.opcua_certificates import create_certificate
from interfaces.tagmap import OpcUaTagMap, load_tag_map
from simulator.batch import build_simulated_plc
from simulator.config import load_simulation
from simulator.opcua_server import OpcUaPlcServer, OpcUaServerSecurity
from simulator.plc import SimulatedPlc

REPO = Path(__file__).resolve().parent.parent
REFERENCE_MAP = REPO / "configs" / "plc" / "reference-opcua.yaml"
PLATFORM = REPO / "configs" / "simulate" / "platform.yaml"


@dataclass(frozen=True)
class SitePki:
    """The files of a site: each application's certificate and key, and the PLC's and the runtime's trusted directories."""

    root: Path
    runtime_cert: Path
    runtime_key: Path
    runtime_trusts: Path
    plc_cert: Path
    plc_key: Path
    plc_trusts: Path
    operator_cert: Path
    operator_key: Path
    stranger_cert: Path
    stranger_key: Path


def _certificate(directory: Path, name: str, uri: str, hosts: list[str]) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.der", directory / f"{name}.pem"
    create_certificate(cert, key, common_name=f"bioreactor-mpc test {name}", application_uri=uri, hostnames=hosts, days=2)
    return cert, key


def make_site_pki(root: Path) -> SitePki:
    """The PLC trusts the runtime and the operator's HMI; the runtime trusts the PLC; nobody trusts the stranger."""
    runtime_cert, runtime_key = _certificate(root / "runtime" / "own", "runtime", "urn:test:bioreactor-mpc:runtime", [socket.gethostname()])
    plc_cert, plc_key = _certificate(root / "plc" / "own", "plc", "urn:test:bioreactor-mpc:plc", ["127.0.0.1", "localhost", socket.gethostname()])
    operator_cert, operator_key = _certificate(root / "operator", "operator", "urn:test:operator-hmi", [socket.gethostname()])
    stranger_cert, stranger_key = _certificate(root / "stranger", "stranger", "urn:test:stranger", [socket.gethostname()])
    for trusts in ("runtime/trusted", "plc/trusted"):
        (root / trusts).mkdir(parents=True)
    shutil.copy(plc_cert, root / "runtime" / "trusted" / "plc.der")
    shutil.copy(runtime_cert, root / "plc" / "trusted" / "runtime.der")
    shutil.copy(operator_cert, root / "plc" / "trusted" / "operator.der")
    return SitePki(
        root=root,
        runtime_cert=runtime_cert,
        runtime_key=runtime_key,
        runtime_trusts=root / "runtime" / "trusted",
        plc_cert=plc_cert,
        plc_key=plc_key,
        plc_trusts=root / "plc" / "trusted",
        operator_cert=operator_cert,
        operator_key=operator_key,
        stranger_cert=stranger_cert,
        stranger_key=stranger_key,
    )


def secured_tag_map(pki: SitePki, *, certificate: Path, private_key: Path, name: str = "plc-map", **security: Any) -> OpcUaTagMap:
    """The reference map with a security section naming ``certificate`` and ``private_key`` (the runtime trusts the PLC), loaded."""
    data = yaml.safe_load(REFERENCE_MAP.read_text(encoding="utf-8"))
    data["security"] = {"certificate": str(certificate), "private_key": str(private_key), "trust_store": str(pki.runtime_trusts), **security}
    path = pki.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    tag_map = load_tag_map(path)
    if not isinstance(tag_map, OpcUaTagMap):
        raise TypeError(f"{path}: not an OPC UA tag map")
    return tag_map


def plc_security(pki: SitePki, **overrides: Any) -> OpcUaServerSecurity:
    """The PLC's security: its certificate, the trusted directory, and the runtime's certificate as the writer."""
    settings: dict[str, Any] = {
        "certificate": pki.plc_cert,
        "private_key": pki.plc_key,
        "trusted_clients": pki.plc_trusts,
        "writer_certificates": (pki.plc_trusts / "runtime.der",),
    }
    return OpcUaServerSecurity(**{**settings, **overrides})


@asynccontextmanager
async def serving_server(tag_map: OpcUaTagMap, endpoint: str, security: OpcUaServerSecurity | None) -> AsyncIterator[OpcUaPlcServer]:
    """The simulated platform PLC served on ``endpoint`` while the block runs, remote enabled; the server (its PLC is ``.plc``)."""
    plc, _ = build_simulated_plc(load_simulation(PLATFORM))
    plc.set_operator_remote(True)
    server = OpcUaPlcServer(plc, tag_map, endpoint=endpoint, security=security)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def serving(tag_map: OpcUaTagMap, endpoint: str, security: OpcUaServerSecurity | None) -> AsyncIterator[SimulatedPlc]:
    """As :func:`serving_server`, giving the simulated PLC."""
    async with serving_server(tag_map, endpoint, security) as server:
        yield server.plc
