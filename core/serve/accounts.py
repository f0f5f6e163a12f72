"""Class accounts, for labs without a school sign-in provider: the teacher creates a class (a
list of names, or a count) and hands out printed one-time join codes; each student picks a
password on first use. Passwords and join codes are stored only as argon2 hashes; sign-in is
rate-limited per account and per client address.

    <home>/accounts/accounts.json   {"accounts": {id: {...}}}, written atomically under a lock

Account ids appear in paths and run folders; they are names, not secrets.
"""
from __future__ import annotations

import functools
import json
import re
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass
from pathlib import Path

from core import paths

MIN_PASSWORD = 8
MIN_TOKEN = 24                    # a teacher token shorter than this is refused
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"     # no 0/O, 1/I: read off paper
MAX_FAILURES = 5                  # per account, and per client address, in WINDOW_S
WINDOW_S = 300.0


class AccountError(ValueError):
    """One sentence for the person signing in (never says which of name or password was wrong)."""


class RateLimited(AccountError):
    pass


@dataclass
class Account:
    id: str
    name: str
    klass: str
    role: str = "student"          # "student" or "teacher"
    join_hash: str = ""            # until the first sign-in
    password_hash: str = ""
    created: float = 0.0
    last_seen: float = 0.0


def _hasher():
    from argon2 import PasswordHasher
    return PasswordHasher()


_DUMMY: list[str] = []


def _dummy_hash() -> str:
    if not _DUMMY:
        _DUMMY.append(_hasher().hash(secrets.token_hex(16)))
    return _DUMMY[0]


def _verify(hashed: str, given: str) -> bool:
    from argon2.exceptions import InvalidHashError, VerificationError
    if not hashed:
        return False
    try:
        return _hasher().verify(hashed, given)
    except (VerificationError, InvalidHashError):
        return False


# ---------------------------------------------------------------- storage

def _path() -> Path:
    folder = paths.home() / "accounts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "accounts.json"


def _locked():
    return paths.locked(_path().with_suffix(".lock"))


def _load(fresh: bool = False) -> dict[str, Account]:
    """The accounts; `fresh` (under the lock, before a write) bypasses the cache."""
    fields = Account.__dataclass_fields__
    return {k: Account(**{f: v for f, v in a.items() if f in fields}) for k, a in _raw(fresh).items()}


_RAW: dict = {}


def _raw(fresh: bool = False) -> dict:
    """accounts.json as stored, re-read only when the file changed: every page run asks who is
    signed in several times."""
    path = _path()
    try:
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if fresh or _RAW.get("key") != key:
            data = json.loads(path.read_text(encoding="utf-8"))
            _RAW.update(key=key, accounts=dict(data.get("accounts", {})))
        return _RAW["accounts"]
    except (OSError, ValueError, AttributeError):
        return {}


def _save(accounts: dict[str, Account]) -> None:
    paths.atomic_write_text(_path(), json.dumps({"accounts": {k: asdict(a) for k, a in accounts.items()}}, indent=1))


def slug(text: str, limit: int = 18) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")


def new_code() -> str:
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(10))
    return f"{raw[:5]}-{raw[5:]}"


def new_token() -> str:
    """A teacher token: 32 random bytes, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def token_problem(token: str) -> str | None:
    if token and len(token.strip()) < MIN_TOKEN:
        return (f"The teacher token must be at least {MIN_TOKEN} random characters; make one with "
                "`python -m core token` (or leave it unset and use class accounts or a sign-in provider).")
    return None


# ---------------------------------------------------------------- the teacher's side

def create_class(klass: str, names: list[str] | int, role: str = "student") -> list[tuple[Account, str]]:
    """New accounts (names, or a count: student-01 ...) with their one-time join codes, which are
    shown once and kept only as hashes."""
    klass_slug = slug(klass) or "class"
    if isinstance(names, int):
        names = [f"student {i:02d}" for i in range(1, names + 1)]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise AccountError("Give at least one name (or a number of students).")
    if len(names) > 500:
        raise AccountError("At most 500 accounts at once.")
    made = []
    with _locked():
        accounts = _load(fresh=True)
        for name in names:
            base = f"{klass_slug}-{slug(name) or 'student'}"[:36]
            account_id, n = base, 2
            while account_id in accounts:
                account_id, n = f"{base}-{n}", n + 1
            code = new_code()
            account = Account(account_id, name[:80], klass[:80], role, _hasher().hash(code), created=time.time())
            accounts[account_id] = account
            made.append((account, code))
        _save(accounts)
    return made


def reset_code(account_id: str) -> str:
    """A new join code for a student who forgot the password; the old password stops working."""
    with _locked():
        accounts = _load(fresh=True)
        account = accounts.get(account_id)
        if account is None:
            raise AccountError(f"No account {account_id}.")
        code = new_code()
        account.join_hash, account.password_hash = _hasher().hash(code), ""
        _save(accounts)
    return code


def delete_account(account_id: str) -> None:
    with _locked():
        accounts = _load(fresh=True)
        accounts.pop(account_id, None)
        _save(accounts)


def list_accounts() -> list[Account]:
    return sorted(_load().values(), key=lambda a: (a.klass, a.id))


def get(account_id: str) -> Account | None:
    return _load().get(account_id)


# ---------------------------------------------------------------- signing in

class _Limiter:
    """Failed attempts per key in a sliding window, in this server process."""

    def __init__(self):
        self._failures: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def check(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                q = self._failures[key]
                while q and now - q[0] > WINDOW_S:
                    q.popleft()
                if len(q) >= MAX_FAILURES:
                    wait = int(WINDOW_S - (now - q[0])) + 1
                    raise RateLimited(f"Too many failed sign-ins: try again in {wait} s.")

    def fail(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._failures[key].append(time.monotonic())

    def clear(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


LIMITER = _Limiter()


def sign_in(account_id: str, secret: str, client: str = "", new_password: str = "") -> Account:
    """The account, if `secret` is its password, or its join code together with a new password
    (first use: the code then stops working). AccountError with one sentence otherwise."""
    account_id = account_id.strip().lower()
    keys = (f"account:{account_id}", f"client:{client}")
    LIMITER.check(*keys)
    with _locked():
        accounts = _load(fresh=True)
        account = accounts.get(account_id)
        if account is None:
            _verify(_dummy_hash(), secret)       # as slow as a real check: timing tells no names
        if account and account.join_hash and _verify(account.join_hash, secret.strip().upper()):
            if len(new_password) < MIN_PASSWORD:
                raise AccountError(f"First sign-in: choose a password of at least {MIN_PASSWORD} characters.")
            account.password_hash, account.join_hash = _hasher().hash(new_password), ""
        elif not (account and _verify(account.password_hash, secret)):
            LIMITER.fail(*keys)
            raise AccountError("That account name and password (or join code) don't match.")
        account.last_seen = time.time()
        _save(accounts)
    LIMITER.clear(keys[0])
    return account


def teacher_sign_in(given: str, token: str, client: str = "") -> None:
    """Raises AccountError unless `given` is the configured (long) teacher token."""
    import hmac
    keys = ("teacher", f"client:{client}")
    LIMITER.check(*keys)
    if not token or token_problem(token) or not hmac.compare_digest(given.encode(), token.encode()):
        LIMITER.fail(*keys)
        raise AccountError("That is not the teacher token.")


# ---------------------------------------------------------------- the signed session

def lab_secret() -> bytes:
    """A random key kept in the data directory (0600): it signs the sign-in cookie (as
    Streamlit's cookie secret) and the claims below, so a restart signs nobody out."""
    return _secret_at(paths.home() / "accounts" / "secret")


@functools.lru_cache(maxsize=8)
def _secret_at(path: Path) -> bytes:      # read once per data directory, not per page run
    return bytes.fromhex(paths.private_once(path, lambda: secrets.token_hex(32)))


def _mac(kind: str, value: str) -> str:
    import hashlib
    import hmac
    return hmac.new(lab_secret(), f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def account_claims(account: Account) -> dict:
    """What the sign-in cookie holds for a class account (signed as a whole by the server's
    cookie secret; the mac ties it to this lab even if a provider sent look-alike claims)."""
    return {"name": account.name, "email": f"{account.id}@class", "lab_account": account.id,
            "lab_mac": _mac("account", account.id)}


def teacher_claims(token: str) -> dict:
    """The token's fingerprint: a changed token signs its old sessions out."""
    import hashlib
    print_ = hashlib.sha256(token.encode()).hexdigest()[:16]
    return {"name": "Teacher", "email": "teacher@lab", "lab_teacher": print_,
            "lab_mac": _mac("teacher", print_)}


def claims_user(claims: dict, token: str = "") -> tuple[str, bool] | None:
    """(user id, is teacher) for our own claims, if genuine and still valid, else None."""
    import hashlib
    import hmac
    mac = str(claims.get("lab_mac", ""))
    if "lab_account" in claims:
        account_id = str(claims["lab_account"])
        if not hmac.compare_digest(mac, _mac("account", account_id)):
            return None
        account = get(account_id)
        return (account.id, account.role == "teacher") if account and account.password_hash else None
    if "lab_teacher" in claims and token and not token_problem(token):
        current = hashlib.sha256(token.encode()).hexdigest()[:16]
        if hmac.compare_digest(mac, _mac("teacher", current)) and claims["lab_teacher"] == current:
            return ("teacher", True)
    return None


def provider_user_id(claims: dict) -> str:
    """A stable id for a provider's user (issuer + subject): a name for paths, not a secret."""
    import hashlib
    key = f"{claims.get('iss', '')}|{claims.get('sub', '')}|{claims.get('email', '')}"
    return "u-" + hashlib.sha256(key.encode()).hexdigest()[:14]
