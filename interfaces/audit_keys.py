"""The audit key: a secret kept outside the history, that MACs the audit records, the history's rows and the exported checkpoints.

A key is 32 random bytes (:func:`secrets.token_bytes`) in a small JSON file
readable by its owner only (mode 0600, :func:`create_key_file`). A key file
that the group or others can read is refused with an error naming the file
and its mode (:func:`load_key_file`): a key that others could have read
proves nothing. So is a key file in a directory the group or others may write
(or a key directory such): whoever can write there can put a key of their own
beside the site's (a verifier given the directory trusts every ``*.key`` in
it) or replace the site's, and a record of a key replacement then makes a
forged trail verify. Its **key id** (16 hex digits) is derived from the secret,
so a record names the key that MAC'd it without revealing it, and a damaged
key file (an id that does not match its secret) is found at load.

MACs are HMAC-SHA256 (stdlib :mod:`hmac`) over :func:`canonical_json` of
``[purpose, content]``: the purpose (``audit-record``, ``history-row``,
``audit-checkpoint``) keeps a MAC made for one kind of thing from being
valid for another.

:func:`row_digest` is the plain SHA-256 a record carries of a stored row (a
user, a session, a history row), for anyone who checks without the key.

The key's lifecycle (creation, storage, rotation, backup, loss) is in
docs/audit-and-users.md, section 2.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from plant_models.errors import BioreactorMPCError

KEY_ENV = "BIOREACTOR_MPC_AUDIT_KEY"
"""The environment variable that names the audit key file (over a configuration's ``audit.key_file``, under a command's ``--key``)."""
KEY_FORMAT = "bioreactor-mpc-audit-key"
KEY_SUFFIX = ".key"
"""The suffix of key files in a key directory (:func:`load_keys`)."""
_KEY_BYTES = 32
_KEY_ID_CONTEXT = b"bioreactor-mpc audit key id\x00"


class AuditKeyError(BioreactorMPCError, ValueError):
    """An audit key file cannot be created or used: missing, readable by others, damaged; the message names the file."""


def canonical_json(value: Any) -> str:
    """The JSON the hashes and MACs are computed over: sorted keys, no whitespace, UTF-8 text, NaN and ±Inf as null.

    Raises :class:`TypeError` for a value JSON cannot represent.
    """
    return json.dumps(plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def plain(value: Any) -> Any:
    """``value`` as JSON types: non-finite floats to None, tuples to lists, enums to their values, numpy scalars to Python's."""
    if isinstance(value, Enum):
        return plain(value.value)
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {(str(k.value) if isinstance(k, Enum) else str(k)): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return plain(item())
    raise TypeError(f"a value of type {type(value).__name__} cannot be recorded as JSON")


def row_digest(*parts: Any) -> str:
    """SHA-256 (hex) of :func:`canonical_json` of ``parts``: what an audit record carries of a stored row.

    Give the table, the row's key and its values in a fixed order, e.g.
    ``row_digest("users", name, full_name, role, password_hash, disabled)``;
    the same values in the same order give the same digest in any process,
    so a checker recomputes it from the row as stored. Values are JSON types
    (str, int, float, bool, None, lists, dicts); floats as SQLite returns them.
    """
    return hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()


def key_id_of(secret: bytes) -> str:
    """The 16-hex-digit id of a key: names it in every record it MACs, without revealing it."""
    return hashlib.sha256(_KEY_ID_CONTEXT + secret).hexdigest()[:16]


@dataclass(frozen=True)
class AuditKey:
    """One audit key: its id, its secret, and the file it came from (None for one made in memory)."""

    key_id: str
    secret: bytes = field(repr=False)
    path: Path | None = None

    def mac(self, purpose: str, content: Any) -> str:
        """HMAC-SHA256 (hex) over the canonical JSON of ``[purpose, content]``."""
        return hmac.new(self.secret, canonical_json([purpose, content]).encode("utf-8"), hashlib.sha256).hexdigest()

    def matches(self, purpose: str, content: Any, mac: str) -> bool:
        """Whether ``mac`` is this key's MAC of ``content`` for ``purpose`` (compared in constant time)."""
        return hmac.compare_digest(self.mac(purpose, content), str(mac))


def generate_key() -> AuditKey:
    """A new key from the operating system's random source, in memory (:func:`create_key_file` stores one)."""
    secret = secrets.token_bytes(_KEY_BYTES)
    return AuditKey(key_id_of(secret), secret)


def create_key_file(path: str | Path, key: AuditKey | None = None) -> AuditKey:
    """Write a new key (or ``key``) to ``path``, mode 0600, refusing to overwrite a file; its directory is created mode 0700 if missing.

    Raises :class:`AuditKeyError` naming the path when the file exists or
    cannot be written.
    """
    path = Path(path)
    key = key or generate_key()
    content = {"format": KEY_FORMAT, "version": 1, "key_id": key.key_id, "secret_hex": key.secret.hex(), "created_utc": datetime.now(UTC).isoformat(timespec="seconds")}
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise AuditKeyError(f"{path}: a file exists there already; an audit key is never overwritten (rotate with bioreactor-mpc audit key rotate)") from None
    except OSError as error:
        raise AuditKeyError(f"{path}: cannot create the audit key file: {error.strerror or error}") from error
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (json.dumps(content) + "\n").encode("ascii"))
        os.fsync(fd)
    except OSError as error:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise AuditKeyError(f"{path}: cannot write the audit key file: {error.strerror or error}") from error
    os.close(fd)
    return AuditKey(key.key_id, key.secret, path)


def load_key_file(path: str | Path) -> AuditKey:
    """The key in ``path``; refuses a file the group or others may read or write, naming its mode, and a damaged one."""
    path = Path(path)
    try:
        found = os.stat(path)
    except FileNotFoundError:
        raise AuditKeyError(f"{path}: no such audit key file (create one with: bioreactor-mpc audit key create {path})") from None
    except OSError as error:
        raise AuditKeyError(f"{path}: cannot read the audit key file: {error.strerror or error}") from error
    if not stat.S_ISREG(found.st_mode):
        raise AuditKeyError(f"{path}: not a regular file, so not an audit key file")
    mode = stat.S_IMODE(found.st_mode)
    if mode & 0o077:
        raise AuditKeyError(f"{path}: mode {mode:04o}: an audit key file must be readable by its owner only (the service user); chmod 600 {path}, and treat the key as exposed")
    _refuse_a_shared_directory(path.parent)
    try:
        content = json.loads(path.read_text(encoding="ascii"))
    except (OSError, ValueError) as error:
        raise AuditKeyError(f"{path}: not an audit key file ({error})") from error
    if not isinstance(content, dict) or content.get("format") != KEY_FORMAT or content.get("version") != 1:
        raise AuditKeyError(f"{path}: not an audit key file (format {KEY_FORMAT!r}, version 1 expected)")
    try:
        secret = bytes.fromhex(str(content.get("secret_hex")))
    except ValueError:
        raise AuditKeyError(f"{path}: damaged audit key file: secret_hex is not hexadecimal") from None
    if len(secret) != _KEY_BYTES:
        raise AuditKeyError(f"{path}: damaged audit key file: the secret has {len(secret)} bytes, {_KEY_BYTES} expected")
    if content.get("key_id") != key_id_of(secret):
        raise AuditKeyError(f"{path}: damaged audit key file: its key_id {content.get('key_id')!r} does not match its secret")
    return AuditKey(key_id_of(secret), secret, path)


class AuditKeyring(Mapping[str, AuditKey]):
    """The keys a verifier trusts, by key id: the current key and the retired ones."""

    def __init__(self, keys: Iterable[AuditKey] = ()) -> None:
        self._keys = {key.key_id: key for key in keys}

    def __getitem__(self, key_id: str) -> AuditKey:
        return self._keys[key_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def describe(self) -> str:
        """The keys' ids and files, for messages."""
        if not self._keys:
            return "no keys"
        return ", ".join(f"{k.key_id} ({k.path})" if k.path is not None else k.key_id for k in self._keys.values())


def load_keys(paths: Iterable[str | Path]) -> AuditKeyring:
    """The keys in ``paths``: key files, and directories whose ``*.key`` files are read (an empty directory is an error)."""
    keys: dict[str, AuditKey] = {}
    for given in paths:
        path = Path(given)
        if path.is_dir():
            _refuse_a_shared_directory(path)
            files = sorted(p for p in path.iterdir() if p.name.endswith(KEY_SUFFIX))
            if not files:
                raise AuditKeyError(f"{path}: no audit key files (*{KEY_SUFFIX}) in this directory")
        else:
            files = [path]
        for file in files:
            key = load_key_file(file)
            keys.setdefault(key.key_id, key)
    return AuditKeyring(keys.values())


def _refuse_a_shared_directory(directory: Path) -> None:
    """Raise :class:`AuditKeyError` when the group or others may write in ``directory`` (they could add or replace key files)."""
    try:
        mode = stat.S_IMODE(os.stat(directory).st_mode)
    except OSError as error:
        raise AuditKeyError(f"{directory}: cannot check the audit key directory: {error.strerror or error}") from error
    if mode & 0o022:
        raise AuditKeyError(
            f"{directory}: mode {mode:04o}: the group or others may write in this audit key directory, so anyone could have put a key of their own in it "
            f"or replaced one; chmod go-w {directory} (0700 as created), check its *{KEY_SUFFIX} files against the key ids you backed up, and treat the keys as exposed"
        )
