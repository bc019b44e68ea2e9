"""Where the reference configs are, installed or in a checkout.

The repository's ``configs/`` is their only source. The wheel carries them as
``bioreactor_mpc/configs`` (pyproject maps the folder there); a checkout, or
an editable install of one (``pip install -e .``, what ``dev.sh`` does), reads
the repository's ``configs/`` itself, so an edit there counts at once.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CANDIDATES = (_PACKAGE / "configs", _PACKAGE.parent / "configs")
"""Installed from a wheel or an sdist; then a checkout."""
_MARKER = Path("simulate") / "platform.yaml"


def reference_configs() -> Path:
    """The folder of the reference configs (``batch/``, ``model/``, ``plc/``, ``runtime/``, ``simulate/``).

    In a broken install, where neither exists, the installed one: a command
    that reads a file in it then fails naming where it looked.
    """
    for candidate in _CANDIDATES:
        if (candidate / _MARKER).is_file():
            return candidate
    return _CANDIDATES[0]


def reference_config(*parts: str) -> Path:
    """A reference config file, e.g. ``reference_config("runtime", "reference-opcua.yaml")``."""
    return reference_configs().joinpath(*parts)
