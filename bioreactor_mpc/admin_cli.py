"""``bioreactor-mpc audit`` and ``bioreactor-mpc users``: check the audit trail, manage the operator screen's users.

Both work on the history file (``--history``), where the runtime keeps its
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

:func:`add_parsers` adds the commands to the CLI's sub-parsers and
:func:`dispatch` runs them.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from controller.advisory import Signer
from controller.takeover import TakeoverApproval
from interfaces.audit import AuditTrail, AuditVerification
from interfaces.users import Role, UnknownUserError, User, UserStore, check_password, check_user_name, parse_role
from plant_models.errors import BioreactorMPCError

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

ACTOR = "admin-cli"
"""The actor of the audit records these commands write."""


class AdminCommandError(BioreactorMPCError, ValueError):
    """An ``audit`` or ``users`` command cannot run as given (no such file, no password, passwords that differ)."""


def add_parsers(subparsers: SubParsers) -> None:
    """Add ``audit`` and ``users`` to the CLI's sub-parsers (``dest="command"``)."""
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
    add.add_argument("--role", required=True, choices=[r.value for r in Role], help="viewer sees, operator also approves and rejects, engineer also changes the mode")
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


def dispatch(args: argparse.Namespace, console: Console) -> int | None:
    """Run an ``audit`` or ``users`` command and return its exit status; None when ``args.command`` is neither.

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
    with UserStore(args.history) as store, AuditTrail(args.history) as trail:
        user = store.check_new_user(args.name, full_name=args.full_name, role=args.role, password=password)
        subject = f"user {user.name}"
        trail.append(actor=ACTOR, action="user_added", subject=subject, details={"name": user.name, "full_name": user.full_name, "role": user.role.value})
        try:
            store.add_user(user.name, full_name=user.full_name, role=user.role, password=password)
        except BioreactorMPCError as error:
            trail.append(actor=ACTOR, action="user_add_failed", subject=subject, details={"name": user.name, "error": str(error)})
            raise
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
        state = "disabled" if user.disabled else "active"
        _say(console, f"{user.name:<{width}}  {user.role.value:<8}  {state:<8}  {user.full_name}")
    return 0


def _users_passwd(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    with UserStore(path) as store, AuditTrail(path) as trail:
        _known(store, args.name)
        password = _password(args, f"new password for {args.name}: ")
        check_password(password)
        trail.append(actor=ACTOR, action="password_changed", subject=f"user {args.name}", details={"name": args.name})
        store.set_password(args.name, password)
    _say(console, f"password of {args.name} changed; the user's sessions ended")
    return 0


def _users_role(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    role = parse_role(args.role)
    with UserStore(path) as store, AuditTrail(path) as trail:
        user = _known(store, args.name)
        if user.role is role:
            _say(console, f"{user.name} is {role.value} already; nothing changed")
            return 0
        trail.append(actor=ACTOR, action="role_changed", subject=f"user {user.name}", details={"name": user.name, "from": user.role.value, "to": role.value})
        store.set_role(user.name, role)
    _say(console, f"{user.name}: {user.role.value} -> {role.value}")
    return 0


def _users_disable(args: argparse.Namespace, console: Console) -> int:
    path = _existing(args.history)
    with UserStore(path) as store, AuditTrail(path) as trail:
        user = _known(store, args.name)
        if user.disabled:
            _say(console, f"{user.name} is disabled already; nothing changed")
            return 0
        trail.append(actor=ACTOR, action="user_disabled", subject=f"user {user.name}", details={"name": user.name})
        store.disable(user.name)
    _say(console, f"{user.name} disabled; the user's sessions ended")
    return 0


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
    password = _password(args, f"password for {args.take_over_as}: ", confirm=False)
    with UserStore(history_path) as store:
        user = store.authenticate(args.take_over_as, password)
    if user is None:
        raise AdminCommandError(f"{args.take_over_as}: wrong user name or password; nothing taken over")
    if not user.role.allows(Role.ENGINEER):
        raise AdminCommandError(f"{user.name} is {user.role.value}: only an engineer can take over a batch without its history")
    return TakeoverApproval(Signer(user.name, user.full_name, user.role.value), reason, datetime.now(UTC).isoformat())


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
