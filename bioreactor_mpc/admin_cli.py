"""``bioreactor-mpc audit``, ``users`` and ``model``: check the audit trail, manage the operator screen's users, approve a model.

All work on the history file (``--history``), where the runtime keeps its
records, the audit trail and the users (docs/audit-and-users.md):

- ``audit verify --history PATH --key KEYS [--checkpoints FILE]``: checks
  every record, its MAC and the chain, the process history's rows, and the
  checkpoints exported outside, opening the file read-only; exit status 0
  when intact, 1 when something was altered, deleted, inserted or reordered
  (one line per problem). ``--without-key`` checks what can be checked
  without the key, and says what was not.
- ``audit key create PATH``, ``audit key rotate --key PATH --history H``,
  ``audit key replace --key NEW --history H --reason "…"``: the audit key's
  lifecycle (docs/audit-and-users.md, section 2).
- ``audit checkpoint --history PATH --to FILE``: record a history checkpoint
  and export the head now (a daily timer, before an archive).
- ``users add NAME --full-name "…" --role operator --history PATH``,
  ``users list``, ``users passwd NAME``, ``users role NAME --role engineer``,
  ``users disable NAME``. A password is typed twice at the terminal, or, for
  automation, read from the environment variable that ``--password-env``
  names; never from an argument (arguments are visible to every user of the
  machine). Every change is an audit record (actor ``admin-cli``), written
  before the change is made: when it cannot be written, nothing changes.
- ``model approve PARAMS --history PATH --user ENGINEER --reason "…"``: an
  engineer's signature (the password re-entered) on a calibrated parameter
  file, recorded as ``model_approved`` with the file's sha256 and a summary
  of its provenance. ``run`` refuses a calibrated file without one in its
  history (docs/calibration.md, "Approving a model").

:func:`add_parsers` adds the commands to the CLI's sub-parsers and
:func:`dispatch` runs them.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from controller.advisory import Signer
from controller.takeover import TakeoverApproval
from interfaces.audit import (
    DEFAULT_CHECKERS,
    AuditRecord,
    AuditTrail,
    AuditVerification,
    Checker,
    Findings,
    VerifyContext,
    check_chain,
    checkpoints_checker,
    record_mac_matches,
)
from interfaces.audit_export import CheckpointSink, FileSink, HttpSink, SyslogSink, read_checkpoints
from interfaces.audit_keys import KEY_ENV, KEY_SUFFIX, AuditKey, AuditKeyring, create_key_file, generate_key, load_key_file, load_keys
from interfaces.passwords import PasswordPolicy, load_password_policy
from interfaces.users import LoginPurpose, Role, UnknownUserError, User, UserStore, UserStoreError, check_user_name, parse_role, user_store_problems
from plant_models.errors import BioreactorMPCError
from plant_models.parameters import CultureParameters

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

ACTOR = "admin-cli"
"""The actor of the audit records the ``users`` commands write (a signed action's actor is its signer)."""
MODEL_APPROVED = "model_approved"
"""The audit action of an engineer's approval of a calibrated parameter file."""


class AdminCommandError(BioreactorMPCError, ValueError):
    """An ``audit`` or ``users`` command cannot run as given (no such file, no password, passwords that differ)."""


def add_parsers(subparsers: SubParsers) -> None:
    """Add ``audit``, ``users`` and ``model`` to the CLI's sub-parsers (``dest="command"``)."""
    history_help = "the history file (SQLite) that holds the audit trail and the users"

    audit = subparsers.add_parser("audit", help="check the audit trail in a history file (docs/audit-and-users.md)")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="check every record, its MAC, the chain, the history's rows and the exported checkpoints: exit 0 when intact, 1 when something was altered or removed"
    )
    verify.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)
    verify.add_argument(
        "--key",
        type=Path,
        action="append",
        default=[],
        metavar="KEY",
        help=f"an audit key file, or a directory of them (*{KEY_SUFFIX}: the current key and the retired ones); repeatable; default: ${KEY_ENV}",
    )
    verify.add_argument("--without-key", action="store_true", help="no key at hand: check the hash chain, the history's digests and the checkpoints, and say what was not checked")
    verify.add_argument(
        "--checkpoints", type=Path, action="append", default=[], metavar="FILE", help="checkpoints exported outside the history (a checkpoint file, or a syslog file); repeatable"
    )

    key = audit_commands.add_parser("key", help="create, rotate or replace the audit key (docs/audit-and-users.md, section 2)")
    key_commands = key.add_subparsers(dest="key_command", required=True)
    create = key_commands.add_parser("create", help="create a new audit key file, mode 0600 (never overwrites one)")
    create.add_argument("path", type=Path, metavar="PATH", help="the key file to create, outside the history's directory (e.g. /etc/bioreactor-mpc/audit-keys/audit.key)")
    rotate = key_commands.add_parser("rotate", help="a new key at PATH; the old one kept beside it as <key id>.key; the rotation recorded in the history, MAC'd by the old key")
    rotate.add_argument("--key", type=Path, required=True, metavar="PATH", help="the current key file (replaced by the new key)")
    rotate.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)
    replace = key_commands.add_parser("replace", help="the key was lost: start MAC'ing with a new key, recorded with the reason (the old records keep their chain and checkpoints)")
    replace.add_argument("--key", type=Path, required=True, metavar="PATH", help="the new key file (created if missing)")
    replace.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)
    replace.add_argument("--reason", required=True, help="what happened to the old key; recorded in the audit trail")

    checkpoint = audit_commands.add_parser("checkpoint", help="record a history checkpoint and export the trail's head now")
    checkpoint.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)
    checkpoint.add_argument("--to", type=Path, action="append", default=[], metavar="FILE", help="append the checkpoint to this file (JSON lines); repeatable")
    checkpoint.add_argument("--syslog", default=None, metavar="ADDRESS", help="send it to syslog: /dev/log, or host:port (UDP)")
    checkpoint.add_argument("--http", default=None, metavar="URL", help="POST it to this http(s) endpoint")
    checkpoint.add_argument("--audit-key", type=Path, default=None, metavar="PATH", help=f"the audit key file (default: ${KEY_ENV})")

    users = subparsers.add_parser("users", help="manage the users of the operator screen (docs/audit-and-users.md)")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    password_env_help = "read the password from this environment variable (for automation) instead of the terminal"
    audit_key_help = f"the audit key file that MACs the records this command writes (default: ${KEY_ENV})"
    policy_help = "the site's password policy, a YAML file of PasswordPolicy fields (docs/audit-and-users.md, section 4); default: NIST SP 800-63B's, no ageing, no lock"

    add = user_commands.add_parser("add", help="add a user; the password is asked twice (or --password-env)")
    add.add_argument("name", help="the log-in name: 2-32 characters, a-z, 0-9, '_', '.', '-', starting with a letter")
    add.add_argument("--full-name", required=True, help="the printed name on the user's electronic signatures")
    add.add_argument(
        "--role", required=True, choices=[r.value for r in Role], help="viewer sees; operator also signs; engineer also changes the mode, reads the audit; qa sees, reads the audit"
    )
    add.add_argument("--history", type=Path, required=True, metavar="PATH", help=f"{history_help} (created if missing)")
    add.add_argument("--password-env", metavar="VAR", default=None, help=password_env_help)
    add.add_argument("--audit-key", type=Path, default=None, metavar="PATH", help=audit_key_help)
    add.add_argument("--password-policy", type=Path, default=None, metavar="FILE", help=policy_help)

    listing = user_commands.add_parser("list", help="list the users with their roles and states (active, disabled, locked, password expired)")
    listing.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)
    listing.add_argument("--password-policy", type=Path, default=None, metavar="FILE", help=f"{policy_help}: shows whose password has aged out")

    passwd = user_commands.add_parser("passwd", help="set a user's password (ends the user's sessions)")
    passwd.add_argument("name")
    passwd.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)
    passwd.add_argument("--password-env", metavar="VAR", default=None, help=password_env_help)
    passwd.add_argument("--audit-key", type=Path, default=None, metavar="PATH", help=audit_key_help)
    passwd.add_argument("--password-policy", type=Path, default=None, metavar="FILE", help=policy_help)

    role = user_commands.add_parser("role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("--role", required=True, choices=[r.value for r in Role], help="the new role")
    role.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)
    role.add_argument("--audit-key", type=Path, default=None, metavar="PATH", help=audit_key_help)

    disable = user_commands.add_parser("disable", help="disable a user: log-ins fail and sessions end; the user stays on record")
    disable.add_argument("name")
    disable.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)
    disable.add_argument("--audit-key", type=Path, default=None, metavar="PATH", help=audit_key_help)

    model = subparsers.add_parser("model", help="approve a calibrated model before the runtime may use it (docs/calibration.md)")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    approve = model_commands.add_parser(
        "approve", help="an engineer's signed approval of a calibrated parameter file, recorded in the history's audit trail with the file's sha256"
    )
    approve.add_argument("parameters", type=Path, metavar="PARAMS", help="the calibrated parameter file (written by bioreactor-mpc calibrate)")
    approve.add_argument("--history", type=Path, required=True, metavar="PATH", help=f"{history_help}: the runtime that will use the model reads its approval there")
    approve.add_argument("--user", required=True, metavar="ENGINEER", help="the approving engineer's user name (the password is asked)")
    approve.add_argument("--reason", required=True, help="why the model may be used (what was reviewed); recorded in the audit trail")
    approve.add_argument("--password-env", metavar="VAR", default=None, help=password_env_help)
    approve.add_argument("--audit-key", type=Path, default=None, metavar="PATH", help=audit_key_help)


def dispatch(args: argparse.Namespace, console: Console) -> int | None:
    """Run an ``audit``, ``users`` or ``model`` command and return its exit status; None when ``args.command`` is none of them.

    Raises :class:`~plant_models.errors.BioreactorMPCError` subclasses whose
    message says what is wrong (the CLI prints it and exits with status 2).
    """
    if args.command == "audit":
        if args.audit_command == "key":
            keys: dict[str, Callable[[argparse.Namespace, Console], int]] = {"create": _audit_key_create, "rotate": _audit_key_rotate, "replace": _audit_key_replace}
            return keys[args.key_command](args, console)
        if args.audit_command == "checkpoint":
            return _audit_checkpoint(args, console)
        return _audit_verify(args, console)
    if args.command == "users":
        commands: dict[str, Callable[[argparse.Namespace, Console], int]] = {
            "add": _users_add,
            "list": _users_list,
            "passwd": _users_passwd,
            "role": _users_role,
            "disable": _users_disable,
        }
        return commands[args.users_command](args, console)
    if args.command == "model":
        return _model_approve(args, console)
    return None


# --------------------------------------------------------------------------- audit


NO_CHECKPOINTS_NOTE = (
    "no exported checkpoints compared (--checkpoints FILE): a trail truncated with its head rewound, "
    "a history emptied whole, or records added by someone holding the key are found only by them"
)
"""What ``audit verify`` says when it was given no checkpoints: without them, 'intact' cannot cover those."""


def _audit_verify(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    keys = _verifying_keys(args)
    checkers: list[Checker] = list(DEFAULT_CHECKERS)
    for file in args.checkpoints:
        read, damaged = read_checkpoints(file)
        checkers.append(checkpoints_checker(read, damaged))
    checkers.append(_users_checker)
    with AuditTrail(path, read_only=True) as trail:
        result = trail.verify(keys=keys, checkers=checkers)
    _say(console, _describe(path, result, keys))
    for problem in result.problems:
        _say(console, problem)
    notes = list(result.notes)
    if not args.checkpoints:
        notes.append(NO_CHECKPOINTS_NOTE)
    for note in notes:
        _say(console, f"note: {note}")
    return 0 if result.ok else 1


def _users_checker(context: VerifyContext) -> Findings:
    """The users and sessions tables against the records that account for them (:func:`interfaces.users.user_store_problems`)."""
    try:
        return Findings(user_store_problems(context.path, context.audit_records()), [])
    except UserStoreError as error:
        return Findings([f"users and sessions: cannot be checked: {error}"], [])


def _verifying_keys(args: argparse.Namespace) -> AuditKeyring | None:
    """The keys ``--key`` names (files or directories), else the one ``$BIOREACTOR_MPC_AUDIT_KEY`` names; None with ``--without-key``."""
    if args.without_key:
        if args.key:
            raise AdminCommandError("--key and --without-key: give one or the other")
        return None
    given = args.key or ([Path(os.environ[KEY_ENV])] if os.environ.get(KEY_ENV) else [])
    if not given:
        raise AdminCommandError(
            f"no audit key to check the MACs with: give --key FILE or --key DIR (or set {KEY_ENV}), "
            "or --without-key to check only what can be checked without it (the hash chain, the history's digests, the checkpoints)"
        )
    return load_keys(given)


def _describe(path: Path, result: AuditVerification, keys: AuditKeyring | None) -> str:
    if result.ok and result.records == 0:
        return f"{path}: no audit records"
    head = f"; head seq {result.head.seq}, sha256 {result.head.hash}" if result.head is not None else "; no head"
    records = _count(result.records, "record")
    how = f"MACs checked with key {', '.join(keys)}" if keys else "WITHOUT the key: MACs not checked"
    if result.ok:
        return f"{path}: audit trail intact: {records}, {how}{head}"
    return f"{path}: audit trail NOT intact: {_count(len(result.problems), 'problem')} in {records}, {how}{head}"


def _audit_key_create(args: argparse.Namespace, console: Console) -> int:
    key = create_key_file(args.path)
    _say(console, f"created audit key {key.key_id} in {args.path} (mode 0600); back it up now, to a place only the quality unit can read (docs/audit-and-users.md)")
    return 0


def _audit_key_rotate(args: argparse.Namespace, console: Console) -> int:
    """Record first, then act: the new key is written beside the old, the rotation recorded with the old key, then the old key kept as ``<id>.key`` and the new one moved in."""
    path = _existing(args.history)
    key_path: Path = args.key
    old = load_key_file(key_path)
    pending = key_path.with_name(key_path.name + ".new")
    if pending.exists():
        raise AdminCommandError(
            f"{pending}: left by a rotation that did not finish. If the history's last audit_key_rotated record names its key id, "
            f"keep {key_path} as <its key id>.key beside it and move {pending.name} to {key_path.name}; if no record names it, delete it; then rotate again if needed"
        )
    new = create_key_file(pending, generate_key())
    try:
        with AuditTrail(path, key=old) as trail:
            record = trail.rotate_key(new, actor=ACTOR)
    except BioreactorMPCError:
        pending.unlink()
        raise
    retired = key_path.with_name(f"{old.key_id}{KEY_SUFFIX}")
    if not retired.exists():
        create_key_file(retired, old)
    os.replace(pending, key_path)
    _say(console, f"rotated the audit key of {path}: {old.key_id} -> {new.key_id} (audit record {record.seq}); {key_path} holds the new key, {retired} the old one")
    _say(console, f"verify with --key {key_path.parent}; back up the new key now")
    for line in _approvals_under(path, old.key_id):
        _say(console, line)
    return 0


def _approvals_under(history_path: Path, key_id: str) -> list[str]:
    """What to tell whoever rotated the key: the model approvals MAC'd by the key retired, which a runtime with the new key no longer
    trusts (:func:`model_approval`), so that they are renewed before a runtime's next start refuses its model."""
    with AuditTrail(history_path, read_only=True) as trail:
        latest = {str(record.details.get("sha256")): record for record in trail.records(action=MODEL_APPROVED)}
    retired = [record for record in latest.values() if record.key_id == key_id]
    if not retired:
        return []
    lines = [
        f"{len(retired)} model approval(s) were MAC'd by the retired key {key_id}: a runtime with the new key refuses those models at its next start. "
        "If a runtime still uses one, an engineer approves it again now (bioreactor-mpc model approve FILE --history ... --user ...):"
    ]
    return lines + [
        f"  {record.details.get('file', record.subject)} (sha256 {record.details.get('sha256')}, approved by {record.actor}, audit record {record.seq})" for record in retired
    ]


def _audit_key_replace(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    reason = args.reason.strip()
    if not reason:
        raise AdminCommandError("--reason: say what happened to the old key; it goes in the audit trail")
    key_path: Path = args.key
    new = load_key_file(key_path) if key_path.exists() else create_key_file(key_path)
    with AuditTrail(path) as trail:
        record = trail.replace_key(new, actor=ACTOR, reason=reason)
    lost = record.details.get("lost_key_id")
    _say(console, f"{path}: the audit key {lost} replaced by {new.key_id} (audit record {record.seq}); records before it keep their hash chain and checkpoints")
    return 0


def _audit_checkpoint(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    sinks: list[CheckpointSink] = [FileSink(file) for file in args.to]
    if args.syslog is not None:
        sinks.append(SyslogSink(args.syslog))
    if args.http is not None:
        sinks.append(HttpSink(args.http))
    if not sinks:
        raise AdminCommandError("nowhere to export the checkpoint to: give --to FILE, --syslog ADDRESS or --http URL")
    with AuditTrail(path, key=_writing_key(args), sinks=sinks) as trail:
        checkpoint = trail.checkpoint("requested", actor=ACTOR)
    _say(console, f"{path}: checkpoint of seq {checkpoint.seq} (sha256 {checkpoint.hash}) exported to {', '.join(s.describe() for s in sinks)}")
    return 0


def _writing_key(args: argparse.Namespace) -> AuditKey | None:
    """The key that MACs the records a command writes: ``--audit-key``, else the file ``$BIOREACTOR_MPC_AUDIT_KEY`` names, else none (refused by a MAC'd trail)."""
    given = getattr(args, "audit_key", None) or (Path(os.environ[KEY_ENV]) if os.environ.get(KEY_ENV) else None)
    return load_key_file(given) if given is not None else None


def _writer(path: Path, args: argparse.Namespace) -> AuditTrail:
    """The trail a command appends to, with its audit key."""
    return AuditTrail(path, key=_writing_key(args))


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


# --------------------------------------------------------------------------- users


def _users_add(args: argparse.Namespace, console: Console) -> int:
    check_user_name(args.name)
    policy = _password_policy(args)
    password = _password(args, f"password for {args.name}: ")
    with _writer(args.history, args) as trail, UserStore(args.history, audit=trail, actor=ACTOR, policy=policy) as store:
        user = store.add_user(args.name, full_name=args.full_name, role=args.role, password=password)
    _say(console, f"added {user.name} ({user.full_name}) as {user.role.value} to {args.history}")
    return 0


def _users_list(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    with UserStore(path, policy=_password_policy(args)) as store:
        users = store.users()
        expired = {user.name for user in users if store.password_expired(user.name)}
    if not users:
        _say(console, f"{path}: no users")
        return 0
    width = max(len(u.name) for u in users)
    for user in users:
        state = "disabled" if user.disabled else "locked" if user.locked else "expired" if user.name in expired else "active"
        _say(console, f"{user.name:<{width}}  {user.role.value:<8}  {state:<8}  {user.full_name}")
    return 0


def _users_passwd(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    policy = _password_policy(args)
    with _writer(path, args) as trail, UserStore(path, audit=trail, actor=ACTOR, policy=policy) as store:
        _known(store, args.name)
        password = _password(args, f"new password for {args.name}: ")
        store.set_password(args.name, password)
    _say(console, f"password of {args.name} changed (a locked account is unlocked); the user's sessions ended")
    return 0


def _users_role(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    role = parse_role(args.role)
    with _writer(path, args) as trail, UserStore(path, audit=trail, actor=ACTOR) as store:
        user = _known(store, args.name)
        if user.role is role:
            _say(console, f"{user.name} is {role.value} already; nothing changed")
            return 0
        store.set_role(user.name, role)
    _say(console, f"{user.name}: {user.role.value} -> {role.value}")
    return 0


def _users_disable(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    with _writer(path, args) as trail, UserStore(path, audit=trail, actor=ACTOR) as store:
        user = _known(store, args.name)
        if user.disabled:
            _say(console, f"{user.name} is disabled already; nothing changed")
            return 0
        store.disable(user.name)
    _say(console, f"{user.name} disabled; the user's sessions ended")
    return 0


def _password_policy(args: argparse.Namespace) -> PasswordPolicy | None:
    """The policy ``--password-policy`` names, validated (a ConfigError naming the file and field otherwise); None for the default."""
    return load_password_policy(args.password_policy) if args.password_policy is not None else None


# --------------------------------------------------------------------------- models


def _model_approve(args: argparse.Namespace, console: Console) -> int:
    reason = args.reason.strip()
    if not reason:
        raise AdminCommandError("--reason: say why the model may be used (what was reviewed); it goes in the audit trail")
    path = _existing(args.history)
    parameters_path: Path = args.parameters
    if not parameters_path.is_file():
        raise AdminCommandError(f"{parameters_path}: no such parameter file")
    parameters, digest = read_parameter_file(parameters_path)
    if parameters.provenance is None:
        raise AdminCommandError(f"{parameters_path}: no provenance, so not a calibrated model (bioreactor-mpc calibrate writes one); the nominal kinetics need no approval")
    signer = _engineer(args, path, args.user, action="approve a model", refused="nothing approved")
    signature = {"signer": signer.name, "printed_name": signer.full_name, "role": signer.role, "reason": reason, "signed_utc": datetime.now(UTC).isoformat()}
    details = {"file": str(parameters_path.resolve()), "sha256": digest, "signature": signature, "provenance": provenance_summary(parameters)}
    earlier = model_approval(path, digest)
    with _writer(path, args) as trail:
        record = trail.append(actor=signer.name, action=MODEL_APPROVED, subject=f"model {parameters_path.name}", details=details)
    _say(console, f"approved {parameters_path} (sha256 {digest}) as {signer.name}: audit record {record.seq} in {path}")
    if earlier is not None:
        _say(console, f"(approved before by {earlier.actor}, audit record {earlier.seq})")
    for warning in parameters.provenance.warnings:
        _say(console, f"the calibration asked the reviewer to look at: {warning}")
    return 0


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes: what an approval signs, and what the runtime checks at start."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise AdminCommandError(f"{path}: cannot read: {error.strerror or error}") from error


def read_parameter_file(path: Path) -> tuple[CultureParameters, str]:
    """A parameter file and the sha256 of the very bytes it was read from (refused when the file changes meanwhile)."""
    digest = file_sha256(path)
    parameters = CultureParameters.from_yaml(path)
    if file_sha256(path) != digest:
        raise AdminCommandError(f"{path}: the file changed while it was read; try again once nobody writes it")
    return parameters, digest


class UntrustedApprovalError(AdminCommandError):
    """A model approval the audit key cannot vouch for: not MAC'd by it, or in a trail whose hash chain is broken."""


def model_approval(history_path: Path, sha256: str, *, key: AuditKey | None = None) -> AuditRecord | None:
    """The latest ``model_approved`` record of a parameter file with this sha256 in the history's audit trail (read-only); None when there is none.

    With ``key`` (the runtime's audit key) only an approval that key MAC'd, in a trail whose hash chain is intact, counts: a record
    inserted or edited by someone without the key, or one approved under a key retired since, raises :class:`UntrustedApprovalError`
    naming the record and what to do. Without a key the trail is not MAC'd, and the runtime says so at every start (``audit_unkeyed``).
    """
    if not history_path.is_file():
        return None
    with AuditTrail(history_path, read_only=True) as trail:
        approvals = [record for record in trail.records(action=MODEL_APPROVED) if record.details.get("sha256") == sha256]
        chain = trail.verify(checkers=(check_chain,)) if key is not None and approvals else None
    if not approvals or key is None or chain is None:
        return approvals[-1] if approvals else None
    if not chain.ok:
        raise UntrustedApprovalError(
            f"{history_path}: the audit trail's hash chain is broken ({chain.problems[0]}), so the approval of sha256 {sha256} cannot be trusted; "
            f"bioreactor-mpc audit verify --history {history_path} lists every problem"
        )
    trusted = [record for record in approvals if record_mac_matches(record, key)]
    if not trusted:
        last = approvals[-1]
        if last.key_id == key.key_id:
            why = f"carries a MAC by the runtime's audit key {key.key_id} that does not match its content: altered by someone without the key"
        else:
            signed = f"MAC'd by key {last.key_id}" if last.key_id else "not MAC'd"
            why = f"is {signed}, not by the runtime's audit key {key.key_id}: written without that key (or under a key retired since)"
        raise UntrustedApprovalError(
            f"{history_path}: the approval of sha256 {sha256} (audit record {last.seq}, by {last.actor}) {why}, so it is not trusted. "
            "An engineer approves the model again with the key in use (bioreactor-mpc model approve ... --audit-key FILE, or $BIOREACTOR_MPC_AUDIT_KEY)"
        )
    return trusted[-1]


def provenance_summary(parameters: CultureParameters) -> dict[str, Any]:
    """What an approval records of a calibrated file: where it came from, what was fitted and how, how well, what a reviewer was asked to look at, the envelope."""
    provenance = parameters.provenance
    if provenance is None:
        return {}
    return {
        "created_utc": provenance.created_utc,
        "tool": provenance.tool,
        "tool_version": provenance.tool_version,
        "based_on": provenance.based_on,
        "settings": dict(provenance.settings),
        "batches": list(provenance.batches),
        "inputs": [[name, digest] for name, digest in provenance.inputs],
        "fitted": {
            name: {"nominal": estimate.nominal, "value": estimate.value, "ci95": [estimate.ci95_low, estimate.ci95_high]}
            for name, estimate in provenance.parameters.items()
            if estimate.identifiable
        },
        "not_identifiable": list(provenance.not_identifiable),
        "fit_statistics": dict(provenance.fit_statistics),
        "cross_validation": dict(provenance.cross_validation),
        "warnings": list(provenance.warnings),
        "envelope": [{"phase": phase.phase, "start_h": phase.start_h, "end_h": phase.end_h, "batches": phase.batches} for phase in parameters.envelope],
    }


# --------------------------------------------------------------------------- helpers


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise AdminCommandError(f"{path}: no such history file")
    return path


def _known(store: UserStore, name: str) -> User:
    user = store.user(name)
    if user is None:
        raise UnknownUserError(f"{store.path}: no user {name!r}")
    return user


def takeover_signature(args: argparse.Namespace, history_path: Path, key: AuditKey | None = None) -> TakeoverApproval:
    """``run --take-over-as NAME --reason TEXT``: the engineer's signature, checked against the history's user store (password re-entered).

    ``key``: the runtime's audit key (its config's), which MACs the records the check writes; else the one ``$BIOREACTOR_MPC_AUDIT_KEY`` names.
    """
    reason = (args.reason or "").strip()
    if not reason:
        raise AdminCommandError("--take-over-as needs --reason: why the batch is taken over without its history (it goes in the audit trail)")
    if not history_path.exists():
        raise AdminCommandError(f"{history_path}: no history file, so no users to sign with; add an engineer first (bioreactor-mpc users add --history ...)")
    signer = _engineer(args, history_path, args.take_over_as, action="take over a batch without its history", refused="nothing taken over", key=key)
    return TakeoverApproval(signer, reason, datetime.now(UTC).isoformat())


def _engineer(args: argparse.Namespace, history_path: Path, name: str, *, action: str, refused: str, key: AuditKey | None = None) -> Signer:
    """An engineer's signature: the password re-entered (or from ``--password-env``) and checked against the history's user store (a wrong one is recorded)."""
    password = _password(args, f"password for {name}: ", confirm=False)
    trail = AuditTrail(history_path, key=key) if key is not None else _writer(history_path, args)
    with trail, UserStore(history_path, audit=trail, actor=name) as store:
        user = store.authenticate(name, password, purpose=LoginPurpose.SIGNATURE)
    if user is None:
        raise AdminCommandError(f"{name}: wrong user name or password; {refused}")
    if not user.role.allows(Role.ENGINEER):
        raise AdminCommandError(f"{user.name} is {user.role.value}: only an engineer can {action}")
    return Signer(user.name, user.full_name, user.role.value)


def _password(args: argparse.Namespace, prompt: str, *, confirm: bool = True) -> str:
    """The password from the variable ``--password-env`` names, or typed at the terminal (twice when ``confirm``)."""
    if args.password_env is not None:
        password = os.environ.get(args.password_env)
        if password is None:
            raise AdminCommandError(f"--password-env {args.password_env}: the environment variable is not set")
        return password
    if not sys.stdin.isatty():
        raise AdminCommandError("no terminal to type the password at; for automation, put it in an environment variable and name it with --password-env")
    first = getpass.getpass(prompt)
    if not confirm:
        return first
    if getpass.getpass("the same again: ") != first:
        raise AdminCommandError("the two passwords differ; nothing changed")
    return first


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)
