"""The systemd unit and the container image definition say what docs/deployment.md says: a dedicated user, a hardened service, the wheel with the validated versions.

Neither podman/docker (with a daemon) nor hadolint is assumed, so the
Containerfile is checked for its structure; the unit is also checked by
``systemd-analyze verify`` where systemd is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "bioreactor-mpc.service"
CONTAINERFILE = REPO / "Containerfile"
SERVICE_USER = "bioreactor-mpc"
HISTORY_DIR = "/var/lib/bioreactor-mpc"


def _unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: sections, and keys that may repeat (comments and blank lines skipped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], defaultdict(list))
            continue
        key, separator, value = line.partition("=")
        assert separator and current is not None, f"{UNIT.name}:{number}: not 'Key=value' in a section: {raw!r}"
        current[key.strip()].append(value.strip())
    return sections


def test_the_unit_runs_the_runtime_as_a_dedicated_user_hardened():
    unit = _unit_sections(UNIT.read_text(encoding="utf-8"))
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["User"] == [SERVICE_USER] and service["Group"] == [SERVICE_USER]
    (exec_start,) = service["ExecStart"]
    assert re.fullmatch(r"/\S+/bioreactor-mpc( --log-json)? run --config /etc/bioreactor-mpc/\S+\.yaml", exec_start), exec_start
    assert service["Restart"] == ["on-failure"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes", "CapabilityBoundingSet": ""}.items():
        assert service[key] == [value], key
    writable = " ".join(service["ReadWritePaths"]).split()
    assert HISTORY_DIR in writable, "the history is the one place the runtime must write"
    assert "/etc/bioreactor-mpc" not in writable, "the config stays read-only to the service"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path):
    """``systemd-analyze verify``, with ExecStart's program replaced by a stub: the install path does not exist here; the rest is verified as written."""
    text = UNIT.read_text(encoding="utf-8")
    (exec_start,) = _unit_sections(text)["Service"]["ExecStart"]
    program = exec_start.split()[0]
    stub = tmp_path / "bioreactor-mpc"
    stub.write_text("#!/bin/sh\n", encoding="utf-8")
    stub.chmod(0o755)
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace(program, str(stub)), encoding="utf-8")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    # verify exits 0 on a value it ignores (an unknown key, a misspelt setting) but says so: both must be clean.
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result.stdout + result.stderr


def _instructions(text: str) -> list[tuple[str, str]]:
    """The Containerfile's instructions (continuation lines joined, comments skipped), as (INSTRUCTION, arguments)."""
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "") for line in logical.splitlines() if line.strip()]


def test_the_image_installs_the_wheel_with_the_validated_versions_as_a_service_user():
    text = CONTAINERFILE.read_text(encoding="utf-8")
    instructions = _instructions(text)
    stages = [args for kind, args in instructions if kind == "FROM"]
    assert stages and all(args.split()[0] == "python:3.11-slim" for args in stages), stages
    final = instructions[max(i for i, (kind, _) in enumerate(instructions) if kind == "FROM") :]
    runs = " ".join(args for kind, args in final if kind == "RUN")
    assert re.search(r"pip install .*--constraint \S*constraints\.txt \S*\.whl", runs), "the final image installs the wheel under constraints.txt"
    assert re.search(rf"useradd .*--system .*{SERVICE_USER}", runs)
    users = [args for kind, args in final if kind == "USER"]
    assert users and users[-1] not in {"root", "0"} and users[-1].split(":")[0] == SERVICE_USER
    volumes = " ".join(args for kind, args in final if kind == "VOLUME")
    assert "/etc/bioreactor-mpc" in volumes and HISTORY_DIR in volumes, "the config set is mounted; the history persists"
    (entrypoint,) = [args for kind, args in final if kind == "ENTRYPOINT"]
    assert entrypoint.startswith('["bioreactor-mpc"')
    (healthcheck,) = [args for kind, args in final if kind == "HEALTHCHECK"]
    assert "http://127.0.0.1:9108/healthz" in healthcheck, "the runtime's monitoring port on its default address"


def test_the_image_is_built_from_every_package():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    needed = {name.split(".")[0] for name in pyproject["packages"]} | set(pyproject.get("package-dir", {}).values()) | {"pyproject.toml", "README.md", "LICENSE"}
    copied = set()
    for kind, args in _instructions(CONTAINERFILE.read_text(encoding="utf-8")):
        if kind == "COPY" and not args.startswith("--from"):
            copied |= {source.rstrip("/") for source in args.split()[:-1]}
    assert needed <= copied, f"not copied into the build stage: {sorted(needed - copied)}"
