"""The password policy (NIST SP 800-63B): each rule refuses what it should and names itself; history, ageing and the inactivity lock in the user store."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from pydantic import ValidationError

from interfaces.passwords import PasswordPolicy, PasswordRule, WeakPasswordError, check_password, common_passwords, is_repetitive_or_sequential, load_password_policy
from interfaces.users import Role, User, UserStore
from plant_models.errors import ConfigError

DAY_S = 86400.0
GOOD = "correct horse battery"


class Clock:
    def __init__(self) -> None:
        self.now_s = 1_800_000_000.0  # 2027-01-15

    def __call__(self) -> float:
        return self.now_s


def cheap_hasher() -> PasswordHasher:
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@pytest.mark.security
@pytest.mark.parametrize(
    ("password", "rule"),
    [
        ("aaaaaaaaaaaa", PasswordRule.REPETITIVE),
        ("abcabcabcabc", PasswordRule.REPETITIVE),
        ("123456789012", PasswordRule.REPETITIVE),
        ("987654321098", PasswordRule.REPETITIVE),
        ("abcdefghijkl", PasswordRule.REPETITIVE),
        ("qwertyuiop123", PasswordRule.REPETITIVE),
        ("aaaaaa123456", PasswordRule.REPETITIVE),
        ("password1234", PasswordRule.COMMON),
        ("Password1234!", PasswordRule.COMMON),
        ("p@ssw0rd2024", PasswordRule.COMMON),
        ("iloveyou12345", PasswordRule.COMMON),
        ("alice.martin", PasswordRule.USER_NAME),
        ("ALICE.MARTIN", PasswordRule.USER_NAME),
        ("my name is alice.martin!", PasswordRule.USER_NAME),
        ("martinezzz-rocks", PasswordRule.USER_NAME),  # "martin" from the full name
        ("the Bioreactor is fine", PasswordRule.CONTEXT_WORD),
        ("shortpw", PasswordRule.TOO_SHORT),
        ("x" * 10 + "y" * 1015, PasswordRule.TOO_LONG),
    ],
)
def test_each_rule_refuses_and_names_itself_without_showing_the_password(password, rule):
    with pytest.raises(WeakPasswordError) as error:
        check_password(password, user_name="alice.martin", full_name="Alice Martin")
    assert error.value.rule is rule
    assert f"(password rule: {rule.value})" in str(error.value)
    assert password not in str(error.value)


@pytest.mark.parametrize("password", [GOOD, "engineer-password-1", "Tr0ub4dor&3xyz", "x7Gq2pLm9wRt", "Zeitgeist im Bioreakt", "a" * 11 + "b"])
def test_ordinary_pass_phrases_and_random_passwords_are_accepted(password):
    check_password(password, user_name="alice.martin", full_name="Alice Martin")


def test_random_passwords_pass():
    for _ in range(200):
        check_password(secrets.token_urlsafe(12), user_name="operator")


@pytest.mark.security
def test_a_password_equal_to_the_user_name_is_refused_and_a_two_letter_name_only_when_equal():
    with pytest.raises(WeakPasswordError, match="the password is or contains the user name") as error:
        check_password("Operator.One", user_name="operator.one", policy=PasswordPolicy(min_length=8))
    assert error.value.rule is PasswordRule.USER_NAME
    check_password("totally normal phrase", user_name="al")  # "al" occurs in ordinary words
    with pytest.raises(WeakPasswordError, match="is or contains the user name"):
        check_password("alalalalalal", user_name="alalalalalal")


def test_the_messages_say_the_numbers():
    with pytest.raises(WeakPasswordError, match="the password has 11 characters; use at least 12"):
        check_password("elevenchars")
    with pytest.raises(WeakPasswordError, match="the password has 70 characters; use at most 64"):
        check_password("correct horse " * 5, policy=PasswordPolicy(max_length=64))


@pytest.mark.security
def test_site_context_words_are_refused_case_insensitively():
    policy = PasswordPolicy(context_words=("bioreactor", "Acme Biologics", "Basel"))
    with pytest.raises(WeakPasswordError, match="'Basel'") as error:
        check_password("summer in BASEL 2026", policy=policy)
    assert error.value.rule is PasswordRule.CONTEXT_WORD
    check_password("summer in BASEL 2026")  # not a context word by default


@pytest.mark.security
def test_the_common_list_is_shipped_as_package_data_and_can_be_switched_off():
    listed = common_passwords()
    assert len(listed) > 19_000
    assert {"password", "123456", "qwerty", "iloveyou", "monkey"} <= listed
    assert all(p == p.lower() and p and not p.startswith("# ") for p in listed)
    long_common = sorted(p for p in listed if len(p) >= 12 and not is_repetitive_or_sequential(p))[0]
    with pytest.raises(WeakPasswordError, match="20,000 most common"):
        check_password(long_common)
    check_password(long_common, policy=PasswordPolicy(refuse_common=False))


@pytest.mark.security
def test_repetitive_or_sequential_runs():
    for text in ("aaaaaaaaaaaa", "abababababab", "zyxwvutsrqpo", "890123456789", "asdfghjklasd", "1111112345678"):
        assert is_repetitive_or_sequential(text), text
    for text in ("correct horse battery", "aaaaaaxyzbcq", "abc-but-then-not", "12ab"):
        assert not is_repetitive_or_sequential(text), text


def test_the_policy_is_frozen_and_refuses_what_nist_does_not_allow():
    with pytest.raises(ValidationError, match="min_length"):
        PasswordPolicy(min_length=6)
    with pytest.raises(ValidationError, match="max_length"):
        PasswordPolicy(max_length=32)
    with pytest.raises(ValidationError, match=r"max_length: must be at least min_length \(200\); got 100"):
        PasswordPolicy(min_length=200, max_length=100)
    with pytest.raises(ValidationError, match="context_words: each word needs at least 3 characters"):
        PasswordPolicy(context_words=("ab",))
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        PasswordPolicy(require_digit=True)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="max_age_days"):
        PasswordPolicy(max_age_days=0)
    policy = PasswordPolicy()
    with pytest.raises(ValidationError):
        policy.min_length = 8  # type: ignore[misc]
    assert (policy.min_length, policy.history_count, policy.max_age_days, policy.lock_after_inactive_days) == (12, 5, None, None)


# --------------------------------------------------------------------------- in the user store


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _store(tmp_path: Path, clock: Clock, policy: PasswordPolicy | None = None) -> UserStore:
    return UserStore(tmp_path / "history.sqlite", clock=clock, password_hasher=cheap_hasher(), policy=policy)


@pytest.mark.security
def test_the_store_applies_the_policy_to_new_users_and_new_passwords(tmp_path, clock):
    with _store(tmp_path, clock) as users:
        for password, rule in (("aaaaaaaaaaaa", "repetitive"), ("password1234", "common"), ("alice.martin", "user_name")):
            with pytest.raises(WeakPasswordError, match=f"password rule: {rule}"):
                users.add_user("alice.martin", full_name="Alice Martin", role="operator", password=password)
        assert users.users() == []
        users.add_user("alice.martin", full_name="Alice Martin", role="operator", password=GOOD)
        with pytest.raises(WeakPasswordError, match="password rule: user_name"):
            users.set_password("alice.martin", "Alice.Martin.2026")
        assert users.authenticate("alice.martin", GOOD) is not None


@pytest.mark.security
def test_one_of_the_last_five_passwords_is_refused_an_older_one_accepted(tmp_path, clock):
    passwords = [f"{word} lantern orchard" for word in ("first", "second", "third", "fourth", "fifth", "sixth")]
    with _store(tmp_path, clock) as users:
        users.add_user("alice", full_name="Alice", role="operator", password=passwords[0])
        with pytest.raises(WeakPasswordError, match="one of 'alice''s last 5 passwords") as error:
            users.set_password("alice", passwords[0])
        assert error.value.rule is PasswordRule.REUSED
        for password in passwords[1:]:
            users.set_password("alice", password)
        for recent in passwords[2:]:  # the last five, the current one included
            with pytest.raises(WeakPasswordError, match="password rule: reused"):
                users.set_password("alice", recent)
        users.set_password("alice", passwords[0])  # six passwords ago
        assert users.authenticate("alice", passwords[0]) is not None
    db = sqlite3.connect(tmp_path / "history.sqlite")
    stored = [row[0] for row in db.execute("SELECT password_hash FROM password_history WHERE user_name = 'alice'")]
    db.close()
    assert len(stored) == 5 and all(h.startswith("$argon2id$") for h in stored)
    assert not any(p in h for p in passwords for h in stored)


def test_no_history_kept_when_history_count_is_zero(tmp_path, clock):
    with _store(tmp_path, clock, PasswordPolicy(history_count=0)) as users:
        users.add_user("alice", full_name="Alice", role="operator", password=GOOD)
        users.set_password("alice", GOOD)
    db = sqlite3.connect(tmp_path / "history.sqlite")
    assert db.execute("SELECT COUNT(*) FROM password_history").fetchone()[0] == 0
    db.close()


@pytest.mark.security
def test_an_aged_password_no_longer_logs_in_until_an_administrator_sets_a_new_one(tmp_path, clock):
    with _store(tmp_path, clock, PasswordPolicy(max_age_days=90)) as users:
        users.add_user("alice", full_name="Alice", role="operator", password=GOOD)
        clock.now_s += 89.9 * DAY_S
        assert users.authenticate("alice", GOOD) is not None and not users.password_expired("alice")
        clock.now_s += 0.2 * DAY_S
        assert users.password_expired("alice")
        assert users.authenticate("alice", GOOD) is None
        users.set_password("alice", "a fresh pass phrase")
        assert users.authenticate("alice", "a fresh pass phrase") is not None
    with _store(tmp_path, clock) as users:  # ageing off (the default): the same password logs in years later
        clock.now_s += 3 * 365 * DAY_S
        assert users.authenticate("alice", "a fresh pass phrase") is not None


@pytest.mark.security
def test_an_account_unused_too_long_locks_at_its_next_login_and_a_new_password_unlocks_it(tmp_path, clock):
    with _store(tmp_path, clock, PasswordPolicy(lock_after_inactive_days=30)) as users:
        alice = users.add_user("alice", full_name="Alice", role="operator", password=GOOD)
        clock.now_s += 29 * DAY_S
        assert users.authenticate("alice", GOOD) == alice, "used within 30 days"
        token = users.create_session(alice)
        clock.now_s += 29 * DAY_S
        assert users.authenticate("alice", GOOD) == alice, "each login starts the 30 days again"
        clock.now_s += 30.5 * DAY_S
        assert users.authenticate("alice", "wrong password 123") is None
        assert users.user("alice") == alice, "a wrong password does not lock"
        assert users.authenticate("alice", GOOD) is None
        assert users.user("alice") == User("alice", "Alice", Role.OPERATOR, disabled=False, locked=True)
        assert users.authenticate("alice", GOOD) is None, "locked stays locked"
        assert users.session_user(token) is None
        users.set_password("alice", "a fresh pass phrase")
        assert users.authenticate("alice", "a fresh pass phrase") == alice
    with _store(tmp_path, clock) as users:  # the lock off (the default)
        clock.now_s += 400 * DAY_S
        assert users.authenticate("alice", "a fresh pass phrase") == alice


def test_a_policy_file_is_loaded_and_a_wrong_field_named(tmp_path):
    good = tmp_path / "policy.yaml"
    good.write_text("min_length: 14\ncontext_words: [bioreactor, acme]\nhistory_count: 8\nmax_age_days: 180\nlock_after_inactive_days: 90\n")
    assert load_password_policy(good) == PasswordPolicy(min_length=14, context_words=("bioreactor", "acme"), history_count=8, max_age_days=180, lock_after_inactive_days=90)
    bad = tmp_path / "bad.yaml"
    bad.write_text("min_lenght: 14\n")
    with pytest.raises(ConfigError, match="bad.yaml: min_lenght: .*min_length"):
        load_password_policy(bad)
    bad.write_text("refuse_common: yes\n")
    with pytest.raises(ConfigError, match="bad.yaml: refuse_common: must be true or false"):
        load_password_policy(bad)
