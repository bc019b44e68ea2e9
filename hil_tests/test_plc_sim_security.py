"""`bioreactor-mpc plc-sim --security sign|sign-encrypt` serves the simulated PLC secured: its endpoints offer that mode and nothing else."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import IO

import pytest
from asyncua import Client, ua
from opcua_pki import make_site_pki

pytestmark = pytest.mark.hil

BASIC256SHA256 = "http://opcfoundation.org/UA/SecurityPolicy#Basic256Sha256"


def _offered(command: list[str], endpoint: str, log_path: Path) -> set[tuple[str, ua.MessageSecurityMode]]:
    """What plc-sim's endpoints offer (its log in the failure message if it offers nothing)."""
    with log_path.open("wb") as log:
        offered = asyncio.run(asyncio.wait_for(_ask(command, endpoint, log), 60))
    if offered is None:
        raise AssertionError(f"plc-sim did not serve {endpoint}: {log_path.read_text(encoding='utf-8', errors='replace')}")
    return offered


async def _ask(command: list[str], endpoint: str, log: IO[bytes]) -> set[tuple[str, ua.MessageSecurityMode]] | None:
    """Start plc-sim, ask it for its endpoints (discovery needs no security), stop it; None if it never answers."""
    process = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        for _ in range(400):
            await asyncio.sleep(0.05)
            if process.returncode is not None:
                return None
            try:
                endpoints = await Client(endpoint, timeout=2).connect_and_get_server_endpoints()
            except (OSError, TimeoutError, ua.UaError):
                continue
            return {(e.SecurityPolicyUri, e.SecurityMode) for e in endpoints}
        return None
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 20)


@pytest.mark.parametrize(
    ("security", "expected"),
    [
        (["--security", "sign"], {(BASIC256SHA256, ua.MessageSecurityMode.Sign)}),
        (["--security", "sign-encrypt"], {(BASIC256SHA256, ua.MessageSecurityMode.SignAndEncrypt)}),
        ([], {(BASIC256SHA256, ua.MessageSecurityMode.SignAndEncrypt)}),  # the certificate options alone: sign-encrypt
    ],
)
def test_plc_sim_serves_the_security_mode_it_is_asked_for(opcua_endpoint, tmp_path, security, expected):
    pki = make_site_pki(tmp_path / "pki")
    command = [
        sys.executable, "-m", "bioreactor_mpc", "plc-sim", "--endpoint", opcua_endpoint,
        "--certificate", str(pki.plc_cert), "--private-key", str(pki.plc_key), "--trusted-clients", str(pki.plc_trusts),
        *security,
    ]  # fmt: skip
    assert _offered(command, opcua_endpoint, tmp_path / "plc-sim.log") == expected


def test_plc_sim_security_none_offers_only_none(opcua_endpoint, tmp_path):
    command = [sys.executable, "-m", "bioreactor_mpc", "plc-sim", "--endpoint", opcua_endpoint, "--security", "none"]
    offered = _offered(command, opcua_endpoint, tmp_path / "plc-sim.log")
    assert offered == {("http://opcfoundation.org/UA/SecurityPolicy#None", ua.MessageSecurityMode.None_)}
