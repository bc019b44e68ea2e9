"""The password policy (NIST SP 800-63B, section 3.1.1.2), and the ageing and inactivity lock Part 11 sites ask for.

A new password is refused, with the rule it broke (:class:`PasswordRule`), when

- it is shorter than ``min_length`` (12) or longer than ``max_length``
  (1024: a login form must not make the server hash megabytes);
- it equals or contains the user name, case-insensitively (a name of fewer
  than three characters only when equal: two letters occur in ordinary
  words), or a part of the user's full name of four letters or more;
- it contains a context word: the product's name, and whatever a site adds
  (its company, site or product names);
- it is repetitive or sequential: ``aaaaaaaaaaaa``, ``abcabcabcabc``,
  ``123456789012``, ``qwertyuiop12``: one or two runs, each a repeated block
  or a sequence of the alphabet, the digits or a keyboard row;
- it is a common or breached password: on the shipped list of the 20,000
  most common ones (``interfaces/data/common-passwords.txt``), also once
  digits and symbols around a word and look-alike digits are taken away
  (``Password1234!`` and ``p@ssw0rd2024`` are ``password``);
- it is one of the user's last ``history_count`` passwords (checked by
  :class:`~interfaces.users.UserStore`, which keeps their hashes).

There are no composition rules (one digit, one capital …): SP 800-63B says
they make passwords worse, not stronger. ``max_age_days`` (ageing) and
``lock_after_inactive_days`` (inactivity lock) are off by default, as the
standard advises; a site whose procedures require them sets them.

:class:`PasswordPolicy` is a configuration model like the others
(:class:`~plant_models.config_loading.FrozenConfig`); this module imports
nothing else of the project's, so a configuration that holds one loads
without the user store.
"""

from __future__ import annotations

import unicodedata
from enum import Enum
from functools import cache
from importlib.resources import files
from pathlib import Path

from pydantic import Field, model_validator

from plant_models.config_loading import FieldError, FrozenConfig, load_yaml_model
from plant_models.errors import BioreactorMPCError

COMMON_PASSWORDS_RESOURCE = "data/common-passwords.txt"
"""The shipped list, relative to the ``interfaces`` package: one lower-case password a line, ``# `` starts a comment."""
HARD_MAX_LENGTH = 4096
"""No policy may allow longer passwords than this (each is hashed with argon2id at every login)."""
_SHORT_USER_NAME = 3
_FULL_NAME_PART = 4
_MIN_RUN = 3
_SEQUENCES = ("abcdefghijklmnopqrstuvwxyz", "01234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm", "qwertzuiop", "azertyuiop", "yxcvbnm")
"""Alphabets a sequential run follows (forwards or backwards): the letters, the digits (9 wraps to 0), the keyboard rows."""
_LOOK_ALIKES = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "@": "a", "$": "s", "!": "i", "|": "l", "+": "t"})


class PasswordRule(str, Enum):
    """Which rule a refused password broke (:attr:`WeakPasswordError.rule`)."""

    NOT_TEXT = "not_text"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    USER_NAME = "user_name"
    CONTEXT_WORD = "context_word"
    REPETITIVE = "repetitive"
    COMMON = "common"
    REUSED = "reused"


class WeakPasswordError(ValueError, BioreactorMPCError):
    """A new password does not meet the :class:`PasswordPolicy`; :attr:`rule` says which rule, the message how (never the password)."""

    def __init__(self, message: str, rule: PasswordRule) -> None:
        super().__init__(f"{message} (password rule: {rule.value})")
        self.rule = rule


class PasswordPolicy(FrozenConfig):
    """What a new password must meet, and when an account's password ages out or the account locks (docs/audit-and-users.md, section 4)."""

    min_length: int = Field(default=12, ge=8, le=256, description="fewest characters (NIST SP 800-63B: at least 8; 15 where a password is the only factor)")
    max_length: int = Field(default=1024, ge=64, le=HARD_MAX_LENGTH, description="most characters (at least 64, so pass phrases fit)")
    refuse_common: bool = Field(default=True, description="refuse passwords on the shipped list of 20,000 common and breached passwords")
    context_words: tuple[str, ...] = Field(
        default=("bioreactor",), description="words no password may contain, case-insensitively: the product's name, the site's and the company's"
    )
    history_count: int = Field(default=5, ge=0, le=50, description="a new password must differ from the user's last this many (0: no history kept)")
    max_age_days: float | None = Field(default=None, gt=0.0, description="a password older than this no longer logs in (an administrator sets a new one); off by default")
    lock_after_inactive_days: float | None = Field(
        default=None, gt=0.0, description="an account unused this long locks at its next login (an administrator sets a new password to unlock it); off by default"
    )

    @model_validator(mode="after")
    def _consistent(self) -> PasswordPolicy:
        if self.max_length < self.min_length:
            raise FieldError("max_length", self.max_length, f"must be at least min_length ({self.min_length})")
        for word in self.context_words:
            if len(word.strip()) < _MIN_RUN:
                raise FieldError("context_words", word, f"each word needs at least {_MIN_RUN} characters (a shorter one occurs in ordinary pass phrases)")
        return self


def load_password_policy(path: str | Path) -> PasswordPolicy:
    """The :class:`PasswordPolicy` in the YAML file at ``path``; a :class:`~plant_models.errors.ConfigError` naming the file and each wrong field otherwise."""
    return load_yaml_model(path, PasswordPolicy)


def check_password(password: str, *, policy: PasswordPolicy | None = None, user_name: str | None = None, full_name: str | None = None) -> None:
    """Raise :class:`WeakPasswordError` naming the rule when ``password`` may not be a new password (the history is the store's to check).

    ``user_name`` and ``full_name``, when given, are refused inside the
    password too. The message never contains the password.
    """
    policy = policy if policy is not None else PasswordPolicy()
    if not isinstance(password, str):
        raise WeakPasswordError("the password must be text", PasswordRule.NOT_TEXT)
    if len(password) < policy.min_length:
        raise WeakPasswordError(f"the password has {len(password)} characters; use at least {policy.min_length}", PasswordRule.TOO_SHORT)
    if len(password) > policy.max_length:
        raise WeakPasswordError(f"the password has {len(password)} characters; use at most {policy.max_length}", PasswordRule.TOO_LONG)
    folded = _fold(password)
    if user_name:
        name = _fold(user_name)
        if folded == name or (len(name) >= _SHORT_USER_NAME and name in folded):
            raise WeakPasswordError("the password is or contains the user name", PasswordRule.USER_NAME)
    for part in _name_parts(full_name):
        if part in folded:
            raise WeakPasswordError(f"the password contains {part!r} from the user's full name", PasswordRule.USER_NAME)
    for word in policy.context_words:
        if _fold(word.strip()) in folded:
            raise WeakPasswordError(f"the password contains {word.strip()!r}, a word anyone guessing would try here", PasswordRule.CONTEXT_WORD)
    if is_repetitive_or_sequential(folded):
        raise WeakPasswordError("the password is a repeated or sequential run of characters ('aaaa…', 'abcabc…', '1234…', 'qwerty…')", PasswordRule.REPETITIVE)
    if policy.refuse_common and _is_common(folded):
        raise WeakPasswordError("the password is, or is built on, one of the 20,000 most common passwords", PasswordRule.COMMON)


def is_repetitive_or_sequential(text: str) -> bool:
    """Whether ``text`` is one or two runs of at least three characters, each a repeated block or a sequence (both ways) of :data:`_SEQUENCES`.

    ``aaaaaaaaaaaa``, ``abababababab``, ``123456789012``, ``aaaaaa123456``
    and ``qwertyqwerty`` are; ``correct horse battery`` is not.
    """
    length = len(text)
    if length < _MIN_RUN:
        return False
    repeated_prefix = _repeated_prefixes(text)
    repeated_suffix = _repeated_prefixes(text[::-1])[::-1]
    sequence_prefix = _sequence_run(text)
    sequence_suffix = _sequence_run(text[::-1])

    def prefix_is_run(end: int) -> bool:
        return end >= _MIN_RUN and (repeated_prefix[end] or end <= sequence_prefix)

    def suffix_is_run(start: int) -> bool:
        return length - start >= _MIN_RUN and (repeated_suffix[start] or length - start <= sequence_suffix)

    return prefix_is_run(length) or any(prefix_is_run(split) and suffix_is_run(split) for split in range(_MIN_RUN, length - _MIN_RUN + 1))


@cache
def common_passwords() -> frozenset[str]:
    """The shipped list of common passwords (:data:`COMMON_PASSWORDS_RESOURCE`), lower-cased."""
    text = files("interfaces").joinpath(COMMON_PASSWORDS_RESOURCE).read_text(encoding="utf-8")
    return frozenset(line for line in text.splitlines() if line and not line.startswith("# "))


# --------------------------------------------------------------------------- helpers


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def _name_parts(full_name: str | None) -> list[str]:
    if not full_name:
        return []
    parts = "".join(c if c.isalnum() else " " for c in _fold(full_name)).split()
    return [part for part in parts if len(part) >= _FULL_NAME_PART]


def _is_common(folded: str) -> bool:
    listed = common_passwords()
    core = folded.strip("0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    candidates = {folded, core, core.translate(_LOOK_ALIKES), core.translate(_LOOK_ALIKES).replace("i", "l")}
    return any(candidate in listed for candidate in candidates if candidate)


def _repeated_prefixes(text: str) -> list[bool]:
    """``result[k]``: whether ``text[:k]`` is a block repeated at least twice (the tail may be a part of it), by the prefix function (linear time)."""
    border = [0] * len(text)
    for i in range(1, len(text)):
        k = border[i - 1]
        while k and text[i] != text[k]:
            k = border[k - 1]
        border[i] = k + 1 if text[i] == text[k] else 0
    return [False] + [2 * (k + 1 - border[k]) <= k + 1 for k in range(len(text))]


def _sequence_run(text: str) -> int:
    """How many leading characters of ``text`` follow one of :data:`_SEQUENCES` in one direction (0 or 1 when none do)."""
    best = min(len(text), 1)
    for alphabet in _SEQUENCES:
        for step in (1, -1):
            run = 1 if text and text[0] in alphabet else 0
            while run and run < len(text) and _follows(alphabet, text[run - 1], text[run], step):
                run += 1
            best = max(best, run)
    return best


def _follows(alphabet: str, before: str, after: str, step: int) -> bool:
    position = alphabet.find(before)
    while position != -1:
        following = position + step
        if 0 <= following < len(alphabet) and alphabet[following] == after:
            return True
        position = alphabet.find(before, position + 1)
    return False
