"""Compile an NLP's CasADi functions to C once and cache the shared library on disk.

Evaluating the Hessian of a long RK4 chain dominates the solve time of the
MPC when CasADi interprets it; compiled, the NLP callbacks are several times
faster (see ``shared/solver-notes.md``). The library's file name is a hash
of the serialised NLP (:func:`nlp_digest`), so a change of model, horizon or
tuning produces a new library and a stale one is never loaded; on a cache hit
nothing is generated or built beyond loading the library.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import casadi as ca
import structlog

from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)

COMPILE_FLAGS = ("-O2", "-shared", "-fPIC")
"""-O2: three times -O1's compile time (once per machine and problem), 10 % faster solves (see docs/solver.md)."""
COMPILE_TIMEOUT_S = 900


class CodegenError(RuntimeError, BioreactorMPCError):
    """Generating or compiling the NLP's C code failed."""


def default_cache_dir() -> Path:
    """``$BIOREACTOR_MPC_CACHE`` or ``~/.cache/bioreactor-mpc``."""
    configured = os.environ.get("BIOREACTOR_MPC_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "bioreactor-mpc"


def nlp_digest(plugin: str, nlp: dict, options: dict) -> str:
    """What the generated code depends on: the NLP's expressions (serialised), the solver plugin and options, CasADi's version, the compiler flags.

    Serialising the NLP takes milliseconds where generating its C takes about
    a second, so a cached library is found without generating anything.
    """
    expressions = ca.Function("nlp_digest", [nlp["x"], nlp["p"]], [nlp["f"], nlp["g"]]).serialize()
    # The plugin's own options (tolerances, iteration limits, warm start) do not change the generated functions, except
    # whether an exact Hessian is needed at all; CasADi's nlpsol options (expand, …) may, so they all count.
    generic = {key: value for key, value in options.items() if key != plugin}
    hessian = options.get(plugin, {}).get("hessian_approximation", "exact")
    context = json.dumps({"plugin": plugin, "options": generic, "hessian": hessian, "casadi": ca.CasadiMeta.version(), "flags": COMPILE_FLAGS}, sort_keys=True, default=str)
    return hashlib.sha256(expressions.encode() + context.encode()).hexdigest()[:16]


def compiled_nlpsol(name: str, plugin: str, nlp: dict, options: dict, *, compile_code: bool = True, cache_dir: Path | None = None) -> ca.Function:
    """``casadi.nlpsol`` whose NLP functions run from a cached, compiled library."""
    return compiled_nlpsols(name, plugin, nlp, [options], compile_code=compile_code, cache_dir=cache_dir)[0]


def compiled_nlpsols(name: str, plugin: str, nlp: dict, option_sets: Sequence[dict], *, compile_code: bool = True, cache_dir: Path | None = None) -> list[ca.Function]:
    """One solver per option set (for example cold and warm start), all on one generated and compiled library."""
    compiler = shutil.which(os.environ.get("CC", "gcc")) if compile_code else None
    if compiler is None:
        if compile_code:
            log.warning("codegen_unavailable", reason="no C compiler found; solving with interpreted functions")
        return [ca.nlpsol(name, plugin, nlp, options) for options in option_sets]
    cache = cache_dir or default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    library = cache / f"{name}-{plugin}-{nlp_digest(plugin, nlp, option_sets[0])}.so"
    if not library.exists():
        _compile(ca.nlpsol(name, plugin, nlp, option_sets[0]), compiler, library)
    return [ca.nlpsol(name, plugin, str(library), options) for options in option_sets]


def _compile(solver: ca.Function, compiler: str, library: Path) -> None:
    """Generate the C of ``solver``'s NLP functions and compile it to ``library`` (a cache miss only)."""
    with tempfile.TemporaryDirectory(prefix="bioreactor-mpc-codegen-") as scratch, contextlib.chdir(scratch):
        source = Path(scratch) / f"{solver.name()}.c"
        solver.generate_dependencies(source.name)
        if library.exists():  # another process compiled it meanwhile
            return
        log.info("codegen_compiling", library=str(library), source_kib=source.stat().st_size // 1024)
        partial = library.with_suffix(f".so.{os.getpid()}.tmp")
        try:
            subprocess.run([compiler, *COMPILE_FLAGS, str(source), "-o", str(partial)], check=True, capture_output=True, timeout=COMPILE_TIMEOUT_S)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            partial.unlink(missing_ok=True)
            stderr = getattr(error, "stderr", b"") or b""
            raise CodegenError(f"compiling {source.name} failed: {stderr.decode(errors='replace')[-2000:] or error}") from error
        partial.replace(library)  # atomic: a concurrent reader never sees half a library
