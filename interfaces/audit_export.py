"""Checkpoints of the audit trail's head, exported outside the history, and their check against the trail.

A :class:`Checkpoint` says "the trail of history file NAME had, at seq N, the
record hash H, written at T", MAC'd with the audit key. The runtime exports
one every N records and at shutdown to every configured sink:

- :class:`FileSink`: one JSON line appended per checkpoint to a file on
  another path (ideally another volume or a host that only appends);
- :class:`SyslogSink`: one line ``bioreactor-mpc-audit-checkpoint {json}`` to
  syslog (:class:`logging.handlers.SysLogHandler`: the local ``/dev/log``, or a
  log server over UDP), which a central log server keeps out of the edge
  controller's reach;
- :class:`HttpSink`: a JSON POST to an HTTP(S) endpoint, with a timeout.

A sink that fails is logged (``audit_checkpoint_export_failed``) and tried
again at the next checkpoint: the record itself is already written.

:func:`check_checkpoints` compares the checkpoints read back
(:func:`read_checkpoints`: the file sink's lines, or a syslog file, anything
with one checkpoint's JSON per line) with the trail: records missing beyond
the trail's end (truncated, head rewound), records whose hash differs from
the checkpoint's (altered and re-chained, forged anew), a checkpoint altered
(its MAC).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import logging.handlers
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from interfaces.audit_keys import AuditKey, AuditKeyring
from plant_models.errors import BioreactorMPCError

log = structlog.get_logger(__name__)

CHECKPOINT_FORMAT = "bioreactor-mpc-audit-checkpoint"
"""The ``format`` of a checkpoint's JSON, and the tag that starts its syslog line."""
_MAC_PURPOSE = "audit-checkpoint"


class CheckpointExportError(BioreactorMPCError, OSError):
    """A checkpoint could not be exported to one sink (the message names the sink and why)."""


class CheckpointFileError(BioreactorMPCError, ValueError):
    """A checkpoints file cannot be read (no such file); the message names it."""


@dataclass(frozen=True)
class Checkpoint:
    """The trail's head at one moment, as exported."""

    history: str
    """The history file's name (not its directory: an archived copy keeps its name)."""
    seq: int
    hash: str
    """The hash of record ``seq``."""
    wall_utc: str
    """When record ``seq`` was written."""
    exported_utc: str
    reason: str
    """``every 100 records``, ``shutdown``, ``requested``."""
    key_id: str | None
    mac: str | None
    """HMAC-SHA256 by ``key_id`` over the fields above; None when the trail has no key."""

    def content(self) -> list[Any]:
        return [self.history, self.seq, self.hash, self.wall_utc, self.exported_utc, self.reason, self.key_id]

    def to_json(self) -> str:
        return json.dumps({"format": CHECKPOINT_FORMAT, **asdict(self)}, sort_keys=True, separators=(",", ":"))


def make_checkpoint(*, history: str, seq: int, hash: str, wall_utc: str, reason: str, key: AuditKey | None) -> Checkpoint:
    """A checkpoint of record ``seq``, MAC'd by ``key`` when there is one."""
    unsigned = Checkpoint(history, seq, hash, wall_utc, datetime.now(UTC).isoformat(timespec="microseconds"), reason, key.key_id if key else None, None)
    if key is None:
        return unsigned
    return dataclasses.replace(unsigned, mac=key.mac(_MAC_PURPOSE, unsigned.content()))


class CheckpointSink(Protocol):
    """Somewhere outside the history that keeps checkpoints."""

    def describe(self) -> str:
        """Where, for messages: ``file /mnt/audit/h.jsonl``."""
        ...

    def export(self, checkpoint: Checkpoint) -> None:
        """Send one checkpoint; raises :class:`CheckpointExportError` when it could not."""
        ...

    def close(self) -> None: ...


class FileSink:
    """Appends one JSON line per checkpoint to ``path`` (created mode 0640, never truncated), synced to disk."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return f"file {self.path}"

    def export(self, checkpoint: Checkpoint) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, (checkpoint.to_json() + "\n").encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            raise CheckpointExportError(f"{self.describe()}: cannot append the checkpoint of seq {checkpoint.seq}: {error.strerror or error}") from error

    def close(self) -> None:
        pass


class SyslogSink:
    """One syslog message per checkpoint: ``/dev/log`` (the default), a Unix socket path, or ``host:port`` (UDP)."""

    def __init__(self, address: str = "/dev/log", *, facility: int = logging.handlers.SysLogHandler.LOG_AUTH) -> None:
        self.address = address
        target: str | tuple[str, int]
        if address.startswith("/"):
            target = address
        else:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise CheckpointExportError(f"syslog {address!r}: expected /path/to/socket or host:port")
            target = (host, int(port))
        self._target = target
        self._facility = facility
        self._handler: logging.handlers.SysLogHandler | None = None

    def describe(self) -> str:
        return f"syslog {self.address}"

    def export(self, checkpoint: Checkpoint) -> None:
        try:
            if self._handler is None:
                self._handler = _RaisingSysLogHandler(address=self._target, facility=self._facility, socktype=socket.SOCK_DGRAM)
                self._handler.ident = "bioreactor-mpc: "
                self._handler.append_nul = False  # a plain line in the log server's files
            record = logging.LogRecord("bioreactor_mpc.audit", logging.INFO, __file__, 0, "%s %s", None, None)
            record.args = (CHECKPOINT_FORMAT, checkpoint.to_json())
            self._handler.emit(record)
        except OSError as error:
            self.close()
            raise CheckpointExportError(f"{self.describe()}: cannot send the checkpoint of seq {checkpoint.seq}: {error.strerror or error}") from error

    def close(self) -> None:
        if self._handler is not None:
            self._handler.close()
            self._handler = None


class _RaisingSysLogHandler(logging.handlers.SysLogHandler):
    """A syslog handler whose failures raise (the stdlib's print a traceback to stderr and go on), so the sink can report them."""

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # the error being handled, from within emit's except block


class HttpSink:
    """POSTs each checkpoint as JSON to ``url`` (http or https), waiting at most ``timeout_s``; any status but 2xx is a failure."""

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise CheckpointExportError(f"http {url!r}: only http:// and https:// endpoints")
        self.url = url
        self.timeout_s = timeout_s

    def describe(self) -> str:
        return f"http {self.url}"

    def export(self, checkpoint: Checkpoint) -> None:
        request = urllib.request.Request(self.url, data=checkpoint.to_json().encode("utf-8"), method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # the scheme is checked above
                status = response.status
        except urllib.error.HTTPError as error:
            raise CheckpointExportError(f"{self.describe()}: the endpoint answered {error.code} {error.reason} to the checkpoint of seq {checkpoint.seq}") from error
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise CheckpointExportError(f"{self.describe()}: cannot send the checkpoint of seq {checkpoint.seq}: {reason}") from error
        if not 200 <= status < 300:
            raise CheckpointExportError(f"{self.describe()}: the endpoint answered {status} to the checkpoint of seq {checkpoint.seq}")

    def close(self) -> None:
        pass


def export_checkpoint(checkpoint: Checkpoint, sinks: Sequence[CheckpointSink]) -> list[str]:
    """Send ``checkpoint`` to every sink; the sinks that failed, each with why (also logged as ``audit_checkpoint_export_failed``)."""
    failures = []
    for sink in sinks:
        try:
            sink.export(checkpoint)
        except CheckpointExportError as error:
            log.warning("audit_checkpoint_export_failed", sink=sink.describe(), seq=checkpoint.seq, error=str(error))
            failures.append(str(error))
    return failures


# --------------------------------------------------------------------------- reading and checking


@dataclass(frozen=True)
class ReadCheckpoint:
    """One checkpoint read back, with where it was read."""

    where: str
    """``FILE line N``."""
    checkpoint: Checkpoint


def read_checkpoints(path: str | Path) -> tuple[list[ReadCheckpoint], list[str]]:
    """The checkpoints in ``path`` (one per line, its JSON starting at the line's first ``{``: a sink's file or a syslog file), and a problem per damaged line.

    Lines without ``bioreactor-mpc-audit-checkpoint`` are other log lines and skipped.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        raise CheckpointFileError(f"{path}: no such checkpoints file") from None
    except OSError as error:
        raise CheckpointFileError(f"{path}: cannot read the checkpoints file: {error.strerror or error}") from error
    found: list[ReadCheckpoint] = []
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if CHECKPOINT_FORMAT not in line:
            continue
        where = f"{path} line {number}"
        try:
            content = json.loads(line[line.index("{") :])
            if not isinstance(content, dict) or content.pop("format", None) != CHECKPOINT_FORMAT:
                raise ValueError(f"not a {CHECKPOINT_FORMAT} object")
            checkpoint = Checkpoint(**content)
            if not isinstance(checkpoint.seq, int) or not isinstance(checkpoint.hash, str):
                raise ValueError("seq must be a number and hash a string")
        except (ValueError, TypeError) as error:
            problems.append(f"{where}: damaged checkpoint, not read ({error})")
            continue
        found.append(ReadCheckpoint(where, checkpoint))
    return found, problems


@dataclass(frozen=True)
class CheckpointFindings:
    problems: list[str]
    notes: list[str]


def check_checkpoints(read: Sequence[ReadCheckpoint], *, history: str, hashes: Mapping[int, str], keys: AuditKeyring | None) -> CheckpointFindings:
    """Compare checkpoints with a trail's record hashes (``hashes``: seq to hash), for the checkpoints of the history named ``history``.

    Reports records missing beyond the trail's end, records whose hash
    differs from a checkpoint's (naming the range between the last
    checkpoint that matches and the first that does not), a record missing
    where a checkpoint has one, and checkpoints whose MAC does not match.
    """
    problems: list[str] = []
    notes: list[str] = []
    mine = [r for r in read if r.checkpoint.history == history]
    others = sorted({r.checkpoint.history for r in read} - {history})
    if others:
        notes.append(f"checkpoints of other histories skipped: {', '.join(others)}")
    if not mine:
        problems.append(f"no checkpoint of {history} to check against" + (f" (the file holds checkpoints of {', '.join(others)})" if others else ""))
        return CheckpointFindings(problems, notes)
    trusted: list[ReadCheckpoint] = []
    unchecked = 0
    for item in mine:
        cp = item.checkpoint
        if cp.mac is None:
            unchecked += cp.key_id is not None
            trusted.append(item)
            continue
        key = keys.get(cp.key_id) if keys is not None and cp.key_id is not None else None
        if key is None:
            unchecked += 1
            trusted.append(item)
        elif key.matches(_MAC_PURPOSE, cp.content(), cp.mac):
            trusted.append(item)
        else:
            problems.append(f"{item.where}: the checkpoint of seq {cp.seq} was altered: its MAC does not match (key {cp.key_id}); not used")
    if unchecked:
        notes.append(f"{unchecked} checkpoint MACs not checked (" + ("no key given" if keys is None else "their key is not among the keys given") + ")")
    last = max(hashes, default=0)
    trusted.sort(key=lambda r: r.checkpoint.seq)
    beyond = [r.checkpoint for r in trusted if r.checkpoint.seq > last]
    if beyond:
        far = beyond[-1]
        span = f"record {last + 1}" if far.seq == last + 1 else f"records {last + 1}–{far.seq}"
        problems.append(f"{span} missing: the checkpoint at seq {far.seq} ({far.wall_utc}, exported {far.exported_utc}) is beyond the history's last record {last}")
    matched_up_to = 0
    mismatches: list[Checkpoint] = []
    for item in trusted:
        cp = item.checkpoint
        if cp.seq > last:
            break
        found = hashes.get(cp.seq)
        if found == cp.hash:
            if not mismatches:
                matched_up_to = cp.seq
            continue
        if found is None:
            problems.append(f"record {cp.seq} missing: the checkpoint at seq {cp.seq} ({cp.wall_utc}) has it, the history has no record {cp.seq}")
            continue
        mismatches.append(cp)
    if mismatches:
        first = mismatches[0]
        span = f"record {first.seq}" if matched_up_to + 1 == first.seq else f"records {matched_up_to + 1}–{first.seq}"
        since = f"the checkpoint at seq {matched_up_to} still matches" if matched_up_to else "no earlier checkpoint matches"
        problems.append(
            f"{span} altered or replaced: the checkpoint at seq {first.seq} ({first.wall_utc}) has hash {first.hash[:16]}…, "
            f"the history's record {first.seq} has {hashes[first.seq][:16]}… ({since})"
            + (f"; {len(mismatches) - 1} later checkpoints do not match either" if len(mismatches) > 1 else "")
        )
    notes.append(f"{len(trusted)} checkpoints of {history} compared, up to seq {trusted[-1].checkpoint.seq}" if trusted else f"no usable checkpoint of {history}")
    return CheckpointFindings(problems, notes)
