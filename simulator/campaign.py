"""Campaigns of independent batches, run in local processes or on a Dask cluster, their results in one table.

A campaign is a module-level function and the list of arguments it is called
with, one job per argument (seeds × plants × controllers × scenarios, say).
The jobs run in local processes by default, or with ``engine=Engine.DASK`` on
an existing Dask distributed cluster (or a local one started for the
campaign): Dask schedules them and moves their arguments and results; nothing
here does either. The results come back in the order the arguments were
given, whatever order the jobs finished in, and :func:`write_table` writes
them as a CSV table. docs/campaigns.md says how to run one on a cluster.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import functools
import itertools
import multiprocessing
import reprlib
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from controller.calibration import CalibrationSettings
from plant_models.config_loading import load_yaml_model
from plant_models.errors import BioreactorMPCError, ConfigError

Argument = TypeVar("Argument")
Row = TypeVar("Row")

ARGUMENT_REPR_CHARS = 120
"""How much of a failed job's argument its error shows."""


class Engine(str, Enum):
    """Where a campaign's jobs run."""

    LOCAL = "local"
    """Processes on this machine (``concurrent.futures.ProcessPoolExecutor``)."""
    DASK = "dask"
    """A Dask distributed cluster: an existing one by its scheduler's address, or a local one started for the campaign."""


class CampaignJobError(RuntimeError, BioreactorMPCError):
    """A job raised, and the campaign stopped. The job's own error is the cause (``__cause__``).

    ``completed`` holds the results of the jobs that had finished by then, by
    job index, so that a long campaign's finished batches are not lost with it.
    """

    def __init__(self, message: str, *, index: int, argument: str, completed: Mapping[int, Any]) -> None:
        super().__init__(message)
        self.index = index
        self.argument = argument
        """A short repr of the failed job's argument."""
        self.completed = dict(completed)


def run_campaign(
    function: Callable[[Argument], Row],
    arguments: Iterable[Argument],
    *,
    engine: Engine = Engine.LOCAL,
    jobs: int = 2,
    address: str | None = None,
    progress: bool = True,
    initializer: Callable[[], None] | None = None,
    label: str = "batches",
) -> list[Row]:
    """``[function(argument) for argument in arguments]``, each call a job in a worker process, the results in the arguments' order.

    ``function``, each argument, each result and ``initializer`` must pickle:
    module-level functions, dataclasses. ``jobs`` is the number of local
    processes, or of workers of the Dask cluster started when ``engine`` is
    Dask and ``address`` is None; with an ``address`` (``tcp://host:8786``),
    the cluster's own workers run the jobs. ``initializer`` is called in the
    worker before each job (configure logging there: spawned or remote workers
    do not inherit this process's set-up); it must be cheap and idempotent.

    ``progress`` shows the jobs done, of all, and the time left on stderr: a
    bar on a terminal, otherwise one line per finished job.

    The first job to raise stops the campaign: the jobs not started are
    cancelled (running ones too on Dask; a local process runs its job to the
    end) and :class:`CampaignJobError` names the job, with the results finished
    by then.
    """
    arguments = list(arguments)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if address is not None and engine is not Engine.DASK:
        raise ValueError(f"address {address!r} names a Dask scheduler: it needs engine {Engine.DASK.value!r}, not {engine.value!r}")
    if not arguments:
        return []
    job = functools.partial(_run_job, function, initializer)
    workers = _dask(jobs, address, _name(function)) if engine is Engine.DASK else _local_processes(jobs)
    with workers as pool, _ProgressReport(len(arguments), label, enabled=progress) as report:
        futures = {pool.submit(job, argument): index for index, argument in enumerate(arguments)}
        results: dict[int, Row] = {}
        for future in pool.as_completed(list(futures)):
            index = futures[future]
            try:
                results[index] = future.result()
            except Exception as error:
                pool.cancel([f for f in futures if not f.done()])  # not the finished ones: Dask would drop their results
                finished = {i: f.result() for f, i in futures.items() if i != index and f.done() and not f.cancelled() and f.exception() is None}
                argument = _short_repr(arguments[index])
                message = f"job {index} of {len(arguments)} {label}, {_name(function)}({argument}), failed: {type(error).__name__}: {error}"
                raise CampaignJobError(message, index=index, argument=argument, completed=finished) from error
            report.job_done()
    return [results[index] for index in range(len(arguments))]


def write_table(rows: Sequence[object], path: Path | str) -> None:
    """Write a campaign's rows (dataclasses, all with the same fields) as CSV, one row per job, one column per field.

    Nested dataclasses and mappings become dotted columns (``nominal.score``,
    ``nominal.lab_coverage.titer``); numbers are written in full precision.
    """
    if not rows:
        raise ValueError("no rows to write: the columns come from the rows")
    table = [dict(_cells(row)) for row in rows]
    columns = list(table[0])
    for index, cells in enumerate(table):
        if list(cells) != columns:
            raise ValueError(f"row {index} has columns {list(cells)}, row 0 has {columns}: a table's rows must have the same fields")
    with Path(path).open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows([_cell(value) for value in cells.values()] for cells in table)


def add_campaign_options(parser: argparse.ArgumentParser) -> None:
    """``--engine``, ``--address``, ``--jobs`` and ``--csv``, as every campaign script takes them."""
    group = parser.add_argument_group("where the batches run (docs/campaigns.md)")
    group.add_argument("--engine", type=Engine, choices=list(Engine), default=Engine.LOCAL, metavar="{local,dask}", help="local processes (default) or a Dask cluster")
    group.add_argument("--address", help="scheduler of an existing Dask cluster, e.g. tcp://10.0.0.5:8786 (with --engine dask; without it, a local Dask cluster of --jobs workers)")
    group.add_argument("--jobs", type=int, default=2, help="batches run in parallel: local processes, or the workers of a local Dask cluster (default 2)")
    group.add_argument("--csv", type=Path, metavar="PATH", help="also write the table of batches to this CSV file")


def add_settings_option(parser: argparse.ArgumentParser) -> None:
    """``--settings``: the calibration settings a learning campaign calibrates with, as ``bioreactor-mpc calibrate --settings`` takes them."""
    parser.add_argument(
        "--settings",
        type=Path,
        metavar="PATH",
        help="calibration settings (YAML, docs/calibration.md), e.g. configs/calibration/corrections.yaml; default: the calibration's defaults",
    )


def load_settings(parser: argparse.ArgumentParser, path: Path | None) -> CalibrationSettings:
    """The settings file ``--settings`` names, validated, or the defaults; a file that is missing or wrong exits with the parser's usage and the error naming the file and the field."""
    try:
        return load_yaml_model(path, CalibrationSettings) if path is not None else CalibrationSettings()
    except ConfigError as error:
        parser.error(f"--settings: {error}")


def _run_job(function: Callable[[Argument], Row], initializer: Callable[[], None] | None, argument: Argument) -> Row:
    """One job, in a worker."""
    if initializer is not None:
        initializer()
    return function(argument)


class _Future(Protocol):
    """What the campaign needs of a job's future: ``concurrent.futures.Future`` and ``distributed.Future`` both are."""

    def result(self) -> Any: ...
    def done(self) -> bool: ...
    def cancelled(self) -> bool: ...
    def exception(self) -> BaseException | None: ...


@dataclasses.dataclass(frozen=True)
class _Workers:
    """An engine's own submit, as-completed and cancel."""

    submit: Callable[[Callable[[Any], Any], Any], _Future]
    as_completed: Callable[[list[_Future]], Iterator[_Future]]
    cancel: Callable[[list[_Future]], None]


@contextlib.contextmanager
def _local_processes(jobs: int) -> Iterator[_Workers]:
    # Spawned, not forked: this process has threads (the progress bar's, a Dask client's), and forking one with threads can deadlock the child.
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))

    def cancel(_: list[_Future]) -> None:
        pool.shutdown(wait=True, cancel_futures=True)  # the running jobs cannot be interrupted: they finish, and count as finished

    def as_completed(futures: list[_Future]) -> Iterator[_Future]:
        return concurrent.futures.as_completed(cast("list[concurrent.futures.Future[Any]]", futures))

    try:
        yield _Workers(submit=pool.submit, as_completed=as_completed, cancel=cancel)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _dask(jobs: int, address: str | None, name: str) -> Iterator[_Workers]:
    try:
        import distributed
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"engine 'dask' needs Dask distributed: pip install 'bioreactor-mpc[cluster]' ({error})", name=error.name) from error
    campaign = uuid.uuid4().hex  # the tasks' keys: unique on a cluster that other campaigns share, grouped by function name on its dashboard
    with contextlib.ExitStack() as stack:
        if address is None:
            cluster = stack.enter_context(distributed.LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"))
            address = cluster.scheduler_address
        client = stack.enter_context(distributed.Client(address))
        counter = itertools.count()

        def submit(job: Callable[[Any], Any], argument: Any) -> _Future:
            return client.submit(job, argument, key=f"{name}-{campaign}-{next(counter)}")

        yield _Workers(submit=submit, as_completed=distributed.as_completed, cancel=client.cancel)


class _ProgressReport:
    """Jobs done of all and the time left, on stderr: a rich bar on a terminal, one line per finished job otherwise."""

    def __init__(self, total: int, label: str, *, enabled: bool) -> None:
        self._total = total
        self._label = label
        self._done = 0
        self._console = Console(stderr=True)
        self._enabled = enabled
        self._bar: Progress | None = None
        self._task = TaskID(0)
        self._started = 0.0

    def __enter__(self) -> _ProgressReport:
        self._started = time.monotonic()
        if self._enabled and self._console.is_terminal:
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), _TimeLeftColumn(), console=self._console, redirect_stdout=False
            )
            self._task = self._bar.add_task(self._label, total=self._total, finish_s=None)
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def job_done(self) -> None:
        self._done += 1
        elapsed_s = time.monotonic() - self._started
        finish_s = _estimated_finish_s(elapsed_s, self._done, self._total)
        if self._bar is not None:
            self._bar.update(self._task, advance=1, finish_s=finish_s)
        elif self._enabled:
            print(f"{self._label}: {self._done}/{self._total} done, {_clock(elapsed_s)} elapsed, about {_clock(finish_s - elapsed_s)} left", file=sys.stderr, flush=True)


class _TimeLeftColumn(ProgressColumn):
    """The time left, counting down from the estimate made when the last job finished."""

    def render(self, task: Task) -> Text:
        finish_s = task.fields.get("finish_s")
        if finish_s is None or task.elapsed is None:
            return Text("-:--:-- left", style="progress.remaining")
        return Text(f"{_clock(max(0.0, finish_s - task.elapsed))} left", style="progress.remaining")


def _estimated_finish_s(elapsed_s: float, done: int, total: int) -> float:
    """When the campaign should end, in seconds from its start, if the remaining jobs go at the pace of the finished ones."""
    return elapsed_s * total / done


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _name(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", type(function).__name__)


def _short_repr(argument: object) -> str:
    text = reprlib.repr(argument)
    return text if len(text) <= ARGUMENT_REPR_CHARS else text[: ARGUMENT_REPR_CHARS - 1] + "…"


def _cells(value: object, prefix: str = "") -> Iterator[tuple[str, object]]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _cells(getattr(value, field.name), f"{prefix}{field.name}.")
    elif isinstance(value, Mapping) and prefix:
        for key in sorted(value, key=str):
            yield from _cells(value[key], f"{prefix}{key}.")
    elif not prefix:
        raise TypeError(f"a table row is a dataclass, not {type(value).__name__}")
    else:
        yield prefix.removesuffix("."), value


def _cell(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    return "" if value is None else value
