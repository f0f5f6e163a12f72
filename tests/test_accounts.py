"""Real identity (issue 23): class accounts with one-time join codes and argon2 passwords, a
rate-limited sign-in, a long teacher token, and claims that only this lab can sign."""
from __future__ import annotations

import json

import pytest

from core import paths
from core.serve import access, accounts

TOKEN = "t" * 10 + "0123456789abcdefghijklmnop"


@pytest.fixture(autouse=True)
def fresh_limiter(monkeypatch):
    monkeypatch.setattr(accounts, "LIMITER", accounts._Limiter())


def test_a_class_gets_one_time_join_codes():
    made = accounts.create_class("Lab 3", ["Alice Smith", "Bob", "Bob"])
    ids = [a.id for a, _ in made]
    assert ids == ["lab-3-alice-smith", "lab-3-bob", "lab-3-bob-2"]
    stored = (accounts._path()).read_text()
    for _, code in made:
        assert code not in stored and len(code) == 11          # only argon2 hashes are kept
    assert "$argon2" in stored
    assert [a.id for a, _ in accounts.create_class("Lab 3", 2)] == ["lab-3-student-01", "lab-3-student-02"]


def test_first_sign_in_sets_a_password_and_uses_up_the_code():
    (alice, code), = accounts.create_class("lab", ["alice"])
    with pytest.raises(accounts.AccountError, match="at least 8"):
        accounts.sign_in(alice.id, code, new_password="short")
    accounts.sign_in(alice.id, code.lower(), new_password="correct horse")     # codes read off paper
    assert accounts.sign_in(alice.id, "correct horse").id == alice.id
    with pytest.raises(accounts.AccountError, match="don't match"):
        accounts.sign_in(alice.id, code, new_password="another one")           # one time only
    new = accounts.reset_code(alice.id)
    with pytest.raises(accounts.AccountError):
        accounts.sign_in(alice.id, "correct horse")                            # reset: old password gone
    accounts.sign_in(alice.id, new, new_password="battery staple")


def test_sign_in_is_rate_limited_per_account_and_per_client():
    (alice, code), = accounts.create_class("lab", ["alice"])
    accounts.sign_in(alice.id, code, new_password="correct horse")
    for _ in range(accounts.MAX_FAILURES):
        with pytest.raises(accounts.AccountError):
            accounts.sign_in(alice.id, "guess", client="10.0.0.9")
    with pytest.raises(accounts.RateLimited, match="try again"):
        accounts.sign_in(alice.id, "correct horse", client="10.0.0.1")        # the account is locked
    with pytest.raises(accounts.RateLimited):
        accounts.sign_in("someone-else", "x", client="10.0.0.9")              # and so is that client


def test_teacher_token_must_be_long_and_right():
    assert accounts.token_problem("a") and accounts.token_problem(" ") is not None
    assert accounts.token_problem(accounts.new_token()) is None
    with pytest.raises(accounts.AccountError):
        accounts.teacher_sign_in("a", "a")                  # a one-letter token signs nobody in
    with pytest.raises(accounts.AccountError):
        accounts.teacher_sign_in(TOKEN[:-1], TOKEN)
    accounts.teacher_sign_in(TOKEN, TOKEN)


def test_claims_are_tied_to_this_lab():
    (alice, code), = accounts.create_class("lab", ["alice"])
    accounts.sign_in(alice.id, code, new_password="correct horse")
    claims = accounts.account_claims(alice)
    assert accounts.claims_user(claims) == (alice.id, False)
    forged = dict(claims, lab_account="lab-bob")                      # another student's name
    assert accounts.claims_user(forged) is None
    assert accounts.claims_user({"lab_account": alice.id, "lab_mac": "0" * 64}) is None
    teacher = accounts.teacher_claims(TOKEN)
    assert accounts.claims_user(teacher, TOKEN) == ("teacher", True)
    assert accounts.claims_user(teacher, TOKEN + "x") is None           # a new token signs it out
    accounts.delete_account(alice.id)
    assert accounts.claims_user(claims) is None                         # a deleted account too
    assert json.dumps(claims)                                          # fits in a cookie as JSON


def test_provider_ids_are_stable_and_path_safe():
    one = accounts.provider_user_id({"iss": "https://idp", "sub": "123", "email": "a@school.org"})
    assert one == accounts.provider_user_id({"iss": "https://idp", "sub": "123", "email": "a@school.org"})
    assert one != accounts.provider_user_id({"iss": "https://other", "sub": "123", "email": "a@school.org"})
    access.User(one)          # a valid id for paths


def test_the_lab_secret_is_kept_private():
    key = accounts.lab_secret()
    assert key == accounts.lab_secret() and len(key) == 32
    path = paths.home() / "accounts" / "secret"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
