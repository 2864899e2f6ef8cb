"""The monolith's users: profiles and their prefix search, passwords (salted scrypt hashes,
computed off the reactor thread) and bearer tokens (random, stored only as SHA-256, expiring).

The store takes checked values only (``snet.server.validation`` checks what clients send) and
raises its own exceptions (``NoSuchUser``, ``WrongPassword``), which the app answers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from attrs import define, field, frozen
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from snet.storage import run_with_retry

log = Logger(namespace="snet.server.accounts")

SEARCH_LIMIT = 100
"""The most users one search returns (the first ones by id)."""
TOKEN_TTL = 30 * 24 * 3600.0
"""Seconds a token stays valid after its login."""
MAX_TOKENS = 10
"""Live tokens one user may hold (one per device or so); a login beyond it revokes the
oldest."""


class NoSuchUser(Exception):
    """There is no user with the id given at login."""


class WrongPassword(Exception):
    """The password given at login is not the user's."""


# --- search ---------------------------------------------------------------------------------


def like_prefix(prefix: str) -> str:
    """A ``LIKE`` pattern matching strings that start with *prefix*: its ``\\``, ``%`` and
    ``_`` are escaped (backslash is LIKE's default escape character)."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


# --- values ---------------------------------------------------------------------------------


@frozen
class Profile:
    """What a user tells about themself."""

    first_name: str
    second_name: str
    birthdate: date
    biography: str = ""
    city: str = ""


@frozen
class User:
    """A stored user (without the password hash)."""

    id: int
    profile: Profile

    def to_json(self) -> dict[str, Any]:
        """The public API's ``User``: the id as a decimal string, the date as YYYY-MM-DD."""
        return {
            "id": str(self.id),
            "first_name": self.profile.first_name,
            "second_name": self.profile.second_name,
            "birthdate": self.profile.birthdate.isoformat(),
            "biography": self.profile.biography,
            "city": self.profile.city,
        }


def _user(row: tuple[Any, ...]) -> User:
    id_, first, second, birthdate, biography, city = row
    return User(
        id=int(id_),
        profile=Profile(
            first_name=str(first),
            second_name=str(second),
            birthdate=birthdate,
            biography=str(biography),
            city=str(city),
        ),
    )


# --- passwords ------------------------------------------------------------------------------


@frozen
class ScryptParameters:
    """scrypt's cost parameters; stored with every hash so that they can change later."""

    n: int = 2**14
    r: int = 8
    p: int = 1
    salt_bytes: int = 16
    key_bytes: int = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, key_bytes: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        dklen=key_bytes,
        maxmem=256 * r * n + 1024 * 1024,
    )


def hash_password(password: str, params: ScryptParameters, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$SALT$HASH`` (base64 salt and hash) of *password* with a fresh random
    salt. Slow on purpose: call it in a thread."""
    if salt is None:
        salt = secrets.token_bytes(params.salt_bytes)
    key = _scrypt(password, salt, params.n, params.r, params.p, params.key_bytes)
    return f"scrypt${params.n}${params.r}${params.p}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Whether *password* matches *stored* (a ``hash_password`` result), compared in constant
    time; False for a stored value of an unknown shape. Slow on purpose: call it in a thread."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        expected = base64.b64decode(parts[5], validate=True)
    except ValueError:
        return False
    key = _scrypt(password, salt, n, r, p, len(expected))
    return hmac.compare_digest(key, expected)


ThreadRunner = Callable[..., Deferred[Any]]
"""``deferToThread``'s shape: run ``f(*args)`` in a thread, fire with its result."""


@define
class PasswordHasher:
    """Hashes and checks passwords in threads (``run_in_thread``), never on the reactor's."""

    params: ScryptParameters = field(factory=ScryptParameters)
    run_in_thread: ThreadRunner = deferToThread

    def hash(self, password: str) -> Deferred[str]:
        """Fire with the stored form of *password*."""
        d: Deferred[str] = self.run_in_thread(hash_password, password, self.params)
        return d

    def verify(self, password: str, stored: str) -> Deferred[bool]:
        """Fire with whether *password* matches the stored form."""
        d: Deferred[bool] = self.run_in_thread(verify_password, password, stored)
        return d


# --- tokens ---------------------------------------------------------------------------------

BEARER_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,256}")
"""What a bearer token may look like (ours are ``secrets.token_urlsafe(32)``: 43 characters)."""


def new_token() -> str:
    """A fresh random bearer token."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> bytes:
    """What is stored of a token: its SHA-256."""
    return hashlib.sha256(token.encode("ascii")).digest()


def is_token_shaped(token: str) -> bool:
    """Whether *token* could be one of ours (checked before any lookup)."""
    return BEARER_TOKEN.fullmatch(token) is not None


# --- the store ------------------------------------------------------------------------------

_USER_COLUMNS = "id, first_name, second_name, birthdate, biography, city"

SEARCH_SQL = (
    f"SELECT {_USER_COLUMNS} FROM users FORCE INDEX (ix_users_names)"  # noqa: S608
    " WHERE first_name LIKE %s AND second_name LIKE %s ORDER BY id LIMIT %s"
)
"""The search: both names by prefix (``like_prefix``), a range read of ``ix_users_names``
(second names checked in the index), then the matches sorted by id.

The index is forced: with ``ORDER BY id LIMIT`` and a short first-name prefix the optimizer
otherwise prefers walking the primary key in id order, hoping for early matches, which reads
the whole table when matches are rare."""


def _utc(seconds: float) -> datetime:
    """A naive UTC datetime, as the DATETIME columns hold."""
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)


def _register(txn: adbapi.Transaction, profile: Profile, password_hash: str, now: datetime) -> int:
    txn.execute(
        "INSERT INTO users (first_name, second_name, birthdate, biography, city,"
        " password_hash, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            profile.first_name,
            profile.second_name,
            profile.birthdate,
            profile.biography,
            profile.city,
            password_hash,
            now,
        ),
    )
    return int(txn.lastrowid)


def _password_hash(txn: adbapi.Transaction, user_id: int) -> str | None:
    txn.execute("SELECT password_hash FROM users WHERE id = %s", (user_id,))
    row = txn.fetchone()
    return None if row is None else str(row[0])


def _store_token(
    txn: adbapi.Transaction,
    digest: bytes,
    user_id: int,
    now: datetime,
    expires: datetime,
    keep: int,
) -> None:
    """Store a new token of *user_id*; expired ones go, and of the live ones only the *keep*
    newest stay."""
    txn.execute("DELETE FROM user_tokens WHERE user_id = %s AND expires_at <= %s", (user_id, now))
    txn.execute(
        "INSERT INTO user_tokens (token_hash, user_id, created_at, expires_at)"
        " VALUES (%s, %s, %s, %s)",
        (digest, user_id, now, expires),
    )
    txn.execute(
        "SELECT created_at FROM user_tokens WHERE user_id = %s"
        " ORDER BY created_at DESC, token_hash LIMIT 1 OFFSET %s",
        (user_id, keep - 1),
    )
    oldest_kept = txn.fetchone()
    if oldest_kept is not None:
        txn.execute(
            "DELETE FROM user_tokens WHERE user_id = %s AND created_at < %s",
            (user_id, oldest_kept[0]),
        )


def _revoke_token(txn: adbapi.Transaction, digest: bytes) -> None:
    txn.execute("DELETE FROM user_tokens WHERE token_hash = %s", (digest,))


def _revoke_all_tokens(txn: adbapi.Transaction, user_id: int) -> int:
    txn.execute("DELETE FROM user_tokens WHERE user_id = %s", (user_id,))
    return int(txn.rowcount)


def _token_user(txn: adbapi.Transaction, digest: bytes, now: datetime) -> int | None:
    txn.execute(
        "SELECT user_id FROM user_tokens WHERE token_hash = %s AND expires_at > %s",
        (digest, now),
    )
    row = txn.fetchone()
    return None if row is None else int(row[0])


def _get(txn: adbapi.Transaction, user_id: int) -> User | None:
    txn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = %s", (user_id,))  # noqa: S608
    row = txn.fetchone()
    return None if row is None else _user(row)


def _exists(txn: adbapi.Transaction, user_id: int) -> bool:
    txn.execute("SELECT 1 FROM users WHERE id = %s", (user_id,))
    return txn.fetchone() is not None


def _search(txn: adbapi.Transaction, first: str, second: str, limit: int) -> list[User]:
    txn.execute(SEARCH_SQL, (like_prefix(first), like_prefix(second), limit))
    return [_user(row) for row in txn.fetchall()]


def _ping(txn: adbapi.Transaction) -> None:
    txn.execute("SELECT 1")
    txn.fetchall()


@define
class RecentAnswers:
    """A bounded in-memory memo of answers that stay true for *ttl* seconds (LRU beyond
    *size* entries), so the hot path of every authenticated call skips a MySQL round trip."""

    clock: IReactorTime
    ttl: float
    size: int = 100_000
    _entries: OrderedDict[Any, tuple[float, Any]] = field(factory=OrderedDict, init=False)

    def get(self, key: Any) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self.clock.seconds():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def forget(self, key: Any) -> None:
        self._entries.pop(key, None)

    def forget_value(self, value: Any) -> None:
        for key in [k for k, (_, v) in self._entries.items() if v == value]:
            del self._entries[key]

    def put(self, key: Any, value: Any) -> None:
        self._entries[key] = (self.clock.seconds() + self.ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


TOKEN_MEMO_SECONDS = 0.5
"""How long a checked token is trusted without asking MySQL again: a token revoked through
another monolith process (or expired) is refused everywhere at most this much later. Under
load it still spares MySQL all but about two lookups per second per busy token."""


@define
class Accounts:
    """Users, passwords and tokens in MySQL (the ``users`` and ``user_tokens`` tables of
    ``snet.server.schema``).

    Two answers are memoised in memory: that a user exists (users are never deleted) and
    which user a token belongs to (for ``TOKEN_MEMO_SECONDS``).
    """

    pool: adbapi.ConnectionPool
    clock: IReactorTime
    hasher: PasswordHasher = field(factory=PasswordHasher)
    token_ttl: float = TOKEN_TTL
    max_tokens: int = MAX_TOKENS
    _tokens: RecentAnswers = field(init=False)
    _users: RecentAnswers = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._tokens = RecentAnswers(self.clock, TOKEN_MEMO_SECONDS)
        self._users = RecentAnswers(self.clock, float("inf"))

    def today(self) -> date:
        """Today's date (UTC) by the injected clock."""
        return _utc(self.clock.seconds()).date()

    def register(self, profile: Profile, password: str) -> Deferred[int]:
        """Store a new user with a hash of *password*; fires with the new id."""
        return Deferred.fromCoroutine(self._register(profile, password))

    async def _register(self, profile: Profile, password: str) -> int:
        password_hash = await self.hasher.hash(password)
        user_id = await run_with_retry(
            self.pool, _register, profile, password_hash, _utc(self.clock.seconds())
        )
        log.info("registered user {user_id}", user_id=user_id)
        return user_id

    def login(self, user_id: int, password: str) -> Deferred[str]:
        """Check *password* and fire with a new bearer token, valid for ``token_ttl`` s.

        :raises NoSuchUser: there is no such user.
        :raises WrongPassword: the password is wrong (the message says no more than that the
            pair does not match).
        """
        return Deferred.fromCoroutine(self._login(user_id, password))

    async def _login(self, user_id: int, password: str) -> str:
        stored = await run_with_retry(self.pool, _password_hash, user_id)
        if stored is None:
            raise NoSuchUser("no such user")
        if not await self.hasher.verify(password, stored):
            log.info("failed login of user {user_id}", user_id=user_id)
            raise WrongPassword("wrong id or password")
        token = new_token()
        now = self.clock.seconds()
        await run_with_retry(
            self.pool,
            _store_token,
            token_digest(token),
            user_id,
            _utc(now),
            _utc(now + self.token_ttl),
            self.max_tokens,
        )
        log.info("user {user_id} logged in", user_id=user_id)
        return token

    def authenticate(self, token: str) -> Deferred[int | None]:
        """Fire with the id of the user whose unexpired token *token* is, else None."""
        if not is_token_shaped(token):
            return succeed(None)
        digest = token_digest(token)
        known = self._tokens.get(digest)
        if known is not None:
            return succeed(known)

        def remember(user_id: int | None) -> int | None:
            if user_id is not None:
                self._tokens.put(digest, user_id)
            return user_id

        d = run_with_retry(self.pool, _token_user, digest, _utc(self.clock.seconds()))
        return d.addCallback(remember)

    def logout(self, token: str) -> Deferred[None]:
        """Revoke *token* (a token that authenticated the call)."""
        digest = token_digest(token)
        self._tokens.forget(digest)
        return run_with_retry(self.pool, _revoke_token, digest)

    def logout_everywhere(self, user_id: int) -> Deferred[int]:
        """Revoke every token of *user_id*; fires with how many there were."""
        self._tokens.forget_value(user_id)
        return run_with_retry(self.pool, _revoke_all_tokens, user_id)

    def get(self, user_id: int) -> Deferred[User | None]:
        """The user *user_id*, or None."""
        return run_with_retry(self.pool, _get, user_id)

    def exists(self, user_id: int) -> Deferred[bool]:
        """Whether user *user_id* exists."""
        if self._users.get(user_id):
            return succeed(True)

        def remember(exists: bool) -> bool:
            if exists:
                self._users.put(user_id, True)
            return exists

        return run_with_retry(self.pool, _exists, user_id).addCallback(remember)

    def search(
        self, first_name_prefix: str, second_name_prefix: str, limit: int = SEARCH_LIMIT
    ) -> Deferred[list[User]]:
        """Up to *limit* users whose names start with the prefixes (case-insensitive), by id."""
        return run_with_retry(self.pool, _search, first_name_prefix, second_name_prefix, limit)

    def ping(self) -> Deferred[None]:
        """``SELECT 1``: fires when MySQL answers."""
        return run_with_retry(self.pool, _ping)
