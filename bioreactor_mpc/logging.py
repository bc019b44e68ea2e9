"""structlog set-up: readable lines in a terminal, JSON lines otherwise, the libraries' log records (asyncua, pymodbus, uvicorn) included.

Our own events go through structlog's processors; the libraries log through
the standard library, whose root logger gets one handler with structlog's
:class:`~structlog.stdlib.ProcessorFormatter`, so their records come out in
the same form (one JSON object a line, with ``logger`` naming the library).
The libraries have their own level, never below ours (their info lines are
mostly connection chatter).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

HANDLER_NAME = "bioreactor_mpc"
"""The root handler this module installs (replaced, not added again, when logging is configured anew)."""


class _StandardErrorHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a record comes (as :data:`logging.lastResort` does): a test framework replaces it, and closes the old one."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # under the handler's lock (Handler.handle)
        super().emit(record)


def level_number(level: int | str) -> int:
    """A level given by number or by name (``"debug"``, ``"INFO"``) as the standard library's number; ValueError for an unknown name."""
    if isinstance(level, int):
        return level
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(f"unknown log level {level!r}: expected debug, info, warning, error or critical")
    return number


def configure_logging(*, json: bool | None = None, level: int | str = logging.INFO, libraries_level: int | str = logging.WARNING, stream: TextIO | None = None) -> None:
    """Log at ``level`` and above to ``stream`` (standard error): JSON lines when ``json`` (default: when the stream is not a terminal).

    The libraries' records (the standard library's loggers) are written from
    ``libraries_level``, or from ``level`` when that is more severe.

    Calling it again (a config file's level after the command line's) takes
    effect for every logger, including those already used.
    """
    if json is None:
        json = not (stream or sys.stderr).isatty()
    number = level_number(level)
    libraries = max(number, level_number(libraries_level))
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    renderer: structlog.types.Processor = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=True)
    tracebacks: list[structlog.types.Processor] = [structlog.processors.format_exc_info] if json else []
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, timestamper, *tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,  # a logger used before a second configure_logging would keep the first level
    )
    handler = logging.StreamHandler(stream) if stream is not None else _StandardErrorHandler()
    handler.set_name(HANDLER_NAME)
    handler.setLevel(libraries)  # also for libraries that give their loggers levels of their own (distributed, uvicorn)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, timestamper],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tracebacks, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(libraries)
