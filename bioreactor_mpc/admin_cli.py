"""``bioreactor-mpc audit``, ``users`` and ``model``: check the audit trail, manage the operator screen's users, approve a model.

All work on the history file (``--history``), where the runtime keeps its
records, the audit trail and the users (docs/audit-and-users.md):

- ``audit verify --history PATH``: checks every record and the chain, opening
  the file read-only; exit status 0 when intact, 1 when records were altered,
  deleted or reordered (one line per problem).
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
from interfaces.audit import AuditRecord, AuditTrail, AuditVerification
from interfaces.users import Role, UnknownUserError, User, UserStore, check_user_name, parse_role
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
    verify = audit_commands.add_parser("verify", help="check every record and the chain: exit 0 when intact, 1 when records were altered, deleted or reordered")
    verify.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)

    users = subparsers.add_parser("users", help="manage the users of the operator screen (docs/audit-and-users.md)")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    password_env_help = "read the password from this environment variable (for automation) instead of the terminal"

    add = user_commands.add_parser("add", help="add a user; the password is asked twice (or --password-env)")
    add.add_argument("name", help="the log-in name: 2-32 characters, a-z, 0-9, '_', '.', '-', starting with a letter")
    add.add_argument("--full-name", required=True, help="the printed name on the user's electronic signatures")
    add.add_argument(
        "--role", required=True, choices=[r.value for r in Role], help="viewer sees; operator also signs; engineer also changes the mode, reads the audit; qa sees, reads the audit"
    )
    add.add_argument("--history", type=Path, required=True, metavar="PATH", help=f"{history_help} (created if missing)")
    add.add_argument("--password-env", metavar="VAR", default=None, help=password_env_help)

    listing = user_commands.add_parser("list", help="list the users with their roles")
    listing.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)

    passwd = user_commands.add_parser("passwd", help="set a user's password (ends the user's sessions)")
    passwd.add_argument("name")
    passwd.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)
    passwd.add_argument("--password-env", metavar="VAR", default=None, help=password_env_help)

    role = user_commands.add_parser("role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("--role", required=True, choices=[r.value for r in Role], help="the new role")
    role.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)

    disable = user_commands.add_parser("disable", help="disable a user: log-ins fail and sessions end; the user stays on record")
    disable.add_argument("name")
    disable.add_argument("--history", type=Path, required=True, metavar="PATH", help=history_help)

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


def dispatch(args: argparse.Namespace, console: Console) -> int | None:
    """Run an ``audit``, ``users`` or ``model`` command and return its exit status; None when ``args.command`` is none of them.

    Raises :class:`~plant_models.errors.BioreactorMPCError` subclasses whose
    message says what is wrong (the CLI prints it and exits with status 2).
    """
    if args.command == "audit":
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


def _audit_verify(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    with AuditTrail(path, read_only=True) as trail:
        result = trail.verify()
    _say(console, _describe(path, result))
    for problem in result.problems:
        _say(console, problem)
    return 0 if result.ok else 1


def _describe(path: Path, result: AuditVerification) -> str:
    if result.ok and result.records == 0:
        return f"{path}: no audit records"
    head = f"; head seq {result.head.seq}, sha256 {result.head.hash}" if result.head is not None else "; no head"
    records = _count(result.records, "record")
    if result.ok:
        return f"{path}: audit trail intact: {records}{head}"
    return f"{path}: audit trail NOT intact: {_count(len(result.problems), 'problem')} in {records}{head}"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


# --------------------------------------------------------------------------- users


def _users_add(args: argparse.Namespace, console: Console) -> int:
    check_user_name(args.name)
    password = _password(args, f"password for {args.name}: ")
    with AuditTrail(args.history) as trail, UserStore(args.history, audit=trail, actor=ACTOR) as store:
        user = store.add_user(args.name, full_name=args.full_name, role=args.role, password=password)
    _say(console, f"added {user.name} ({user.full_name}) as {user.role.value} to {args.history}")
    return 0


def _users_list(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    with UserStore(path) as store:
        users = store.users()
    if not users:
        _say(console, f"{path}: no users")
        return 0
    width = max(len(u.name) for u in users)
    for user in users:
        state = "disabled" if user.disabled else "locked" if user.locked else "active"
        _say(console, f"{user.name:<{width}}  {user.role.value:<8}  {state:<8}  {user.full_name}")
    return 0


def _users_passwd(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    with AuditTrail(path) as trail, UserStore(path, audit=trail, actor=ACTOR) as store:
        _known(store, args.name)
        password = _password(args, f"new password for {args.name}: ")
        store.set_password(args.name, password)
    _say(console, f"password of {args.name} changed (a locked account is unlocked); the user's sessions ended")
    return 0


def _users_role(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    role = parse_role(args.role)
    with AuditTrail(path) as trail, UserStore(path, audit=trail, actor=ACTOR) as store:
        user = _known(store, args.name)
        if user.role is role:
            _say(console, f"{user.name} is {role.value} already; nothing changed")
            return 0
        store.set_role(user.name, role)
    _say(console, f"{user.name}: {user.role.value} -> {role.value}")
    return 0


def _users_disable(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    with AuditTrail(path) as trail, UserStore(path, audit=trail, actor=ACTOR) as store:
        user = _known(store, args.name)
        if user.disabled:
            _say(console, f"{user.name} is disabled already; nothing changed")
            return 0
        store.disable(user.name)
    _say(console, f"{user.name} disabled; the user's sessions ended")
    return 0


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
    with AuditTrail(path) as trail:
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


def model_approval(history_path: Path, sha256: str) -> AuditRecord | None:
    """The latest ``model_approved`` record of a parameter file with this sha256 in the history's audit trail (read-only); None when there is none."""
    if not history_path.is_file():
        return None
    with AuditTrail(history_path, read_only=True) as trail:
        approvals = [record for record in trail.records(action=MODEL_APPROVED) if record.details.get("sha256") == sha256]
    return approvals[-1] if approvals else None


def provenance_summary(parameters: CultureParameters) -> dict[str, Any]:
    """What an approval records of a calibrated file: where it came from, what was fitted, how well, what a reviewer was asked to look at, the envelope."""
    provenance = parameters.provenance
    if provenance is None:
        return {}
    return {
        "created_utc": provenance.created_utc,
        "tool": provenance.tool,
        "based_on": provenance.based_on,
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


def takeover_signature(args: argparse.Namespace, history_path: Path) -> TakeoverApproval:
    """``run --take-over-as NAME --reason TEXT``: the engineer's signature, checked against the history's user store (password re-entered)."""
    reason = (args.reason or "").strip()
    if not reason:
        raise AdminCommandError("--take-over-as needs --reason: why the batch is taken over without its history (it goes in the audit trail)")
    if not history_path.exists():
        raise AdminCommandError(f"{history_path}: no history file, so no users to sign with; add an engineer first (bioreactor-mpc users add --history ...)")
    signer = _engineer(args, history_path, args.take_over_as, action="take over a batch without its history", refused="nothing taken over")
    return TakeoverApproval(signer, reason, datetime.now(UTC).isoformat())


def _engineer(args: argparse.Namespace, history_path: Path, name: str, *, action: str, refused: str) -> Signer:
    """An engineer's signature: the password re-entered (or from ``--password-env``) and checked against the history's user store."""
    password = _password(args, f"password for {name}: ", confirm=False)
    with UserStore(history_path) as store:
        user = store.authenticate(name, password)
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
