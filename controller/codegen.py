"""Compile an NLP's CasADi functions to C once and cache the shared library on disk.

Evaluating the Hessian of a long RK4 chain dominates the solve time of the
MPC when CasADi interprets it; compiled, the NLP callbacks are several times
faster (see ``shared/solver-notes.md``). The library's file name is a hash
of the serialised NLP (:func:`nlp_digest`), so a change of model or horizon
produces a new library and a stale one is never loaded; on a cache hit
nothing is generated or built beyond loading the library. (What the NLP takes
as parameters, a site's equipment and limits for the MPC, is not in the code
and so not in the key: see docs/solver.md.)

On a cache miss the compile can run in the background
(:func:`nlpsols_compiling_in_background`): the solvers start on interpreted
functions while the C compiler, a child process, builds the library, with
its progress logged (``mpc_compile_started``, ``mpc_compile_progress``,
``mpc_compile_ready``); :class:`BackgroundCompile` says when the compiled
solvers can take over.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import casadi as ca
import structlog

from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)

COMPILE_FLAGS = ("-O1", "-shared", "-fPIC")
"""-O1: the default NLP compiled in 64 s where -O2 took 266 s (4x), and -O2 solved a batch only 5-10 % faster (docs/solver.md, measured side by side).

The flags are part of the cache key (:func:`nlp_digest`): a library built with other flags is not reused.
"""
COMPILE_TIMEOUT_S = 900
PROGRESS_EVERY_S = 15.0
"""How often a background compile logs ``mpc_compile_progress``."""


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


def library_path(name: str, plugin: str, nlp: dict, options: dict, cache_dir: Path | None = None) -> Path:
    """Where the compiled library of this NLP lives (or will): its name holds :func:`nlp_digest`, the cache key."""
    return (cache_dir or default_cache_dir()) / f"{name}-{plugin}-{nlp_digest(plugin, nlp, options)}.so"


def compiled_nlpsol(name: str, plugin: str, nlp: dict, options: dict, *, compile_code: bool = True, cache_dir: Path | None = None) -> ca.Function:
    """``casadi.nlpsol`` whose NLP functions run from a cached, compiled library."""
    return compiled_nlpsols(name, plugin, nlp, [options], compile_code=compile_code, cache_dir=cache_dir)[0]


def compiled_nlpsols(name: str, plugin: str, nlp: dict, option_sets: Sequence[dict], *, compile_code: bool = True, cache_dir: Path | None = None) -> list[ca.Function]:
    """One solver per option set (for example cold and warm start), all on one generated and compiled library."""
    compiler = _compiler() if compile_code else None
    if compiler is None:
        return [ca.nlpsol(name, plugin, nlp, options) for options in option_sets]
    library = library_path(name, plugin, nlp, option_sets[0], cache_dir)
    library.parent.mkdir(parents=True, exist_ok=True)
    if not library.exists():
        _compile(ca.nlpsol(name, plugin, nlp, option_sets[0]), compiler, library)
    return load_compiled(name, plugin, library, option_sets)


def _compiler() -> str | None:
    """The C compiler (``$CC``, else gcc) on the path; None, with a warning that the NLP runs interpreted, when there is none."""
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        log.warning("codegen_unavailable", reason="no C compiler found; solving with interpreted functions")
    return compiler


def _compile(solver: ca.Function, compiler: str, library: Path) -> None:
    """Generate the C of ``solver``'s NLP functions and compile it to ``library`` (a cache miss only), waiting for it, its progress logged."""
    job = BackgroundCompile(solver, compiler, library)
    if not job.wait(COMPILE_TIMEOUT_S + 60.0):
        job.cancel()
        raise CodegenError(f"compiling {library.name} failed: {job.error or 'timed out'}")


def nlpsols_compiling_in_background(
    name: str, plugin: str, nlp: dict, option_sets: Sequence[dict], *, cache_dir: Path | None = None, progress_every_s: float | None = None
) -> tuple[list[ca.Function], BackgroundCompile | None]:
    """Solvers for the NLP at once: compiled when the cache has its library; else interpreted, with the library's compile started in the background.

    The second item is the compile to wait for (None when there is none: a
    cache hit, or no C compiler). Once it is :attr:`BackgroundCompile.ready`,
    :func:`load_compiled` gives the compiled solvers; they solve as the
    interpreted ones do, several times faster.
    """
    compiler = _compiler()
    if compiler is None:
        return [ca.nlpsol(name, plugin, nlp, options) for options in option_sets], None
    library = library_path(name, plugin, nlp, option_sets[0], cache_dir)
    library.parent.mkdir(parents=True, exist_ok=True)
    if library.exists():
        return load_compiled(name, plugin, library, option_sets), None
    interpreted = [ca.nlpsol(name, plugin, nlp, options) for options in option_sets]
    return interpreted, BackgroundCompile(interpreted[0], compiler, library, progress_every_s=progress_every_s or PROGRESS_EVERY_S)


def nlpsols(
    name: str, plugin: str, nlp: dict, option_sets: Sequence[dict], *, compile_code: bool = True, background: bool = False
) -> tuple[list[ca.Function], BackgroundCompile | None]:
    """One solver per option set, and the compile to switch after (None: the solvers are final).

    Compiled from the cache, or compiled now (waiting for it) on a cache miss;
    with ``background`` a cache miss starts on interpreted solvers instead
    (:func:`nlpsols_compiling_in_background`; :func:`solvers_once_compiled`
    hands over to the compiled ones). ``compile_code`` False: interpreted.
    """
    if compile_code and background:
        return nlpsols_compiling_in_background(name, plugin, nlp, option_sets)
    return compiled_nlpsols(name, plugin, nlp, option_sets, compile_code=compile_code), None


def solvers_once_compiled(job: BackgroundCompile | None, name: str, plugin: str, option_sets: Sequence[dict]) -> tuple[BackgroundCompile | None, list[ca.Function] | None]:
    """Whether to switch after a background compile: (the compile still to wait for, the compiled solvers to switch to).

    While ``job`` runs: ``(job, None)``. Once it has ended: ``(None, solvers
    on its library)`` (``mpc_switched_to_compiled`` logged), or ``(None,
    None)`` when it failed (``mpc_staying_interpreted``): the interpreted
    solvers stay.
    """
    if job is None or not job.done:
        return job, None
    if not job.ready:
        log.warning("mpc_staying_interpreted", library=job.library.name, reason=job.error)
        return None, None
    solvers = load_compiled(name, plugin, job.library, option_sets)
    log.info("mpc_switched_to_compiled", library=str(job.library), compile_s=round(job.elapsed_s, 1))
    return None, solvers


def load_compiled(name: str, plugin: str, library: Path, option_sets: Sequence[dict]) -> list[ca.Function]:
    """One solver per option set on a compiled library (:func:`library_path`)."""
    return [ca.nlpsol(name, plugin, str(library), options) for options in option_sets]


class BackgroundCompile:
    """The C compiler building one NLP's library in a child process, while the caller solves on interpreted functions.

    The C is generated here (seconds); the compiler runs as a child process,
    and a thread waits for it, logging ``mpc_compile_progress`` with the
    elapsed time every ``progress_every_s`` and ``mpc_compile_ready`` (or
    ``mpc_compile_failed``) at the end. The library appears in the cache
    atomically, as with :func:`compiled_nlpsols`.
    """

    def __init__(self, solver: ca.Function, compiler: str, library: Path, *, progress_every_s: float = PROGRESS_EVERY_S) -> None:
        self.library = library
        self.error: str | None = None
        """Why the compile failed; None while it runs and once it succeeded."""
        self.elapsed_s = math.nan
        """How long the compile took, once it ended."""
        self._scratch = tempfile.TemporaryDirectory(prefix="bioreactor-mpc-codegen-")
        source = Path(self._scratch.name) / f"{solver.name()}.c"
        with contextlib.chdir(self._scratch.name):
            solver.generate_dependencies(source.name)
        self._partial = library.with_suffix(f".so.{os.getpid()}-{id(self)}.tmp")
        self._done = threading.Event()
        self._started = time.monotonic()
        log.info("mpc_compile_started", library=str(library), source_kib=source.stat().st_size // 1024)
        self._process = subprocess.Popen([compiler, *COMPILE_FLAGS, str(source), "-o", str(self._partial)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._thread = threading.Thread(target=self._wait, args=(progress_every_s,), name=f"compile-{library.stem}", daemon=True)
        self._thread.start()
        atexit.register(self._stop_compiler)  # a process that ends (or is interrupted) takes its compiler with it

    def _stop_compiler(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
            self._partial.unlink(missing_ok=True)

    @property
    def done(self) -> bool:
        """The compiler has ended (successfully or not)."""
        return self._done.is_set()

    @property
    def ready(self) -> bool:
        """The library is built and can be loaded (:func:`load_compiled`)."""
        return self._done.is_set() and self.error is None

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the compiler to end (at most ``timeout_s``); whether the library is ready."""
        self._done.wait(timeout_s)
        return self.ready

    def cancel(self) -> None:
        """Stop the compiler (nothing is left in the cache)."""
        if self._process.poll() is None:
            self._process.kill()
        self._done.wait()

    def _wait(self, progress_every_s: float) -> None:
        stderr = b""
        try:
            while True:
                try:
                    _, stderr = self._process.communicate(timeout=progress_every_s)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.monotonic() - self._started
                    if elapsed > COMPILE_TIMEOUT_S:
                        self._process.kill()
                        continue
                    if self.library.exists():  # another process compiled it meanwhile
                        self._process.kill()
                        self._process.communicate()
                        self.elapsed_s = elapsed
                        log.info("mpc_compile_ready", library=str(self.library), elapsed_s=round(elapsed, 1), compiled_by="another process")
                        return
                    log.info("mpc_compile_progress", library=self.library.name, elapsed_s=round(elapsed, 1))
            self.elapsed_s = time.monotonic() - self._started
            if self._process.returncode == 0:
                self._partial.replace(self.library)  # atomic: a concurrent reader never sees half a library
                log.info("mpc_compile_ready", library=str(self.library), elapsed_s=round(self.elapsed_s, 1))
            else:
                self.error = f"the C compiler ended with status {self._process.returncode}: {stderr.decode(errors='replace')[-2000:]}"
        except OSError as error:
            self.error = f"the compiled library could not be stored: {error}"
        finally:
            if self.error is not None:
                log.error("mpc_compile_failed", library=str(self.library), elapsed_s=round(time.monotonic() - self._started, 1), error=self.error)
            self._partial.unlink(missing_ok=True)
            self._scratch.cleanup()
            atexit.unregister(self._stop_compiler)
            self._done.set()
