"""The wheel carries everything the commands read at run time, and the validated versions pin every runtime dependency.

The wheel is built here from a copy of the sources (the checkout stays
clean), or taken from ``$BIOREACTOR_MPC_WHEEL`` when a build step made one.
.ci/packaging installs it into a fresh venv and runs the commands from there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGES: list[str] = PYPROJECT["tool"]["setuptools"]["packages"]
MAPPED: dict[str, str] = PYPROJECT["tool"]["setuptools"].get("package-dir", {})
ROOTS = sorted({name.split(".")[0] for name in PACKAGES})
"""The top-level packages, each a folder of the repository."""


def _build_inputs() -> list[str]:
    return ["pyproject.toml", "README.md", "LICENSE", *MAPPED.values(), *ROOTS]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    given = os.environ.get("BIOREACTOR_MPC_WHEEL")
    if given:
        path = Path(given)
    else:
        source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
        for name in _build_inputs():
            for path in _source_files(REPO / name) if (REPO / name).is_dir() else [REPO / name]:
                (source / path.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, source / path.relative_to(REPO))
        command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps", "--wheel-dir", str(dist), str(source)]
        subprocess.run(command, check=True, capture_output=True, timeout=240)
        (path,) = dist.glob("bioreactor_mpc-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def _source_files(folder: Path) -> list[Path]:
    """The files of ``folder`` a commit would hold: tracked, or new and not ignored (outside a git checkout, all but bytecode)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", str(folder)], cwd=REPO, capture_output=True, check=True, timeout=60
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    return sorted(path for name in listed.split("\0") if name and (path := REPO / name).is_file())


def test_every_package_folder_is_in_the_wheel_whole(wheel):
    """Code, templates, static files, data, py.typed: what a package folder holds, the wheel holds (a new subpackage must be listed in pyproject)."""
    names = set(wheel.namelist())
    for root in ROOTS:
        files = _source_files(REPO / root)
        missing = [str(p.relative_to(REPO)) for p in files if p.relative_to(REPO).as_posix() not in names]
        assert not missing, f"not in the wheel: {missing}"
        assert f"{root}/py.typed" in names


def test_the_screen_and_the_password_list_are_in_the_wheel(wheel):
    names = set(wheel.namelist())
    for name in ("templates/base.html", "templates/login.html", "templates/screen.html", "static/screen.css", "static/screen.js"):
        assert f"interfaces/web/{name}" in names
    assert "interfaces/data/common-passwords.txt" in names


def test_the_reference_configs_are_in_the_wheel_as_they_are_in_the_repository(wheel):
    configs = _source_files(REPO / "configs")
    assert {p.parent.name for p in configs} >= {"batch", "model", "plc", "runtime", "simulate"}
    for path in configs:
        packaged = f"bioreactor_mpc/configs/{path.relative_to(REPO / 'configs').as_posix()}"
        assert wheel.read(packaged) == path.read_bytes(), packaged
    assert not [n for n in wheel.namelist() if n.startswith("configs/")], "the configs only inside the package, not as a top-level folder"


def test_the_wheel_declares_its_command_and_licence(wheel):
    names = wheel.namelist()
    (info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    assert "bioreactor-mpc = bioreactor_mpc.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()
    metadata = Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
    assert metadata["License"] == "Apache-2.0" or metadata["License-Expression"] == "Apache-2.0"
    licence = [n for n in names if n.startswith(f"{info}/") and Path(n).name == "LICENSE"]
    assert licence and wheel.read(licence[0]) == (REPO / "LICENSE").read_bytes()


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        assert separator and version, f"constraints.txt: {line!r} is not pinned with =="
        pins[canonicalize_name(name)] = version
    return pins


def test_the_constraints_pin_every_runtime_dependency_within_its_range():
    pins = _constraints()
    assert "bioreactor-mpc" not in pins, "the project itself is installed from its wheel, not pinned"
    for line in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} (pyproject) is not pinned in constraints.txt: run deploy/update-constraints"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
