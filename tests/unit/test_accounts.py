"""Unit tests of snet.server.accounts' pure parts: the LIKE-prefix escaping, scrypt password
hashes and tokens (the validators are tests/unit/test_validation.py's). Hashing runs
synchronously here with cheap parameters; tests/integration/test_server_storage.py runs the
real ones in threads."""

from __future__ import annotations

import hashlib
import re
from datetime import date
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred

from snet.server.accounts import (
    PasswordHasher,
    Profile,
    ScryptParameters,
    User,
    hash_password,
    is_token_shaped,
    like_prefix,
    new_token,
    token_digest,
    verify_password,
)
from snet.server.social import Post
from snet.testing import result_of

CHEAP = ScryptParameters(n=2**4, r=1, p=1)


def run_now(f: Any, *args: Any) -> Deferred[Any]:
    """A stand-in for deferToThread that runs *f* at once (unit tests have no threads)."""
    return maybeDeferred(f, *args)


# --- search -------------------------------------------------------------------------------


def like_matches(pattern: str, text: str) -> bool:
    """MySQL's LIKE with ``\\`` as the escape character, as a regular expression (the
    collation's case folding aside)."""
    regex = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            regex += re.escape(pattern[i + 1])
            i += 2
            continue
        regex += ".*" if char == "%" else "." if char == "_" else re.escape(char)
        i += 1
    return re.fullmatch(regex, text, re.DOTALL) is not None


@given(st.text(min_size=1), st.text())
def test_like_prefix_matches_exactly_the_strings_starting_with_the_prefix(
    prefix: str, text: str
) -> None:
    """Whatever the prefix holds (``%``, ``_``, ``\\``), the pattern means "starts with"."""
    assert like_matches(like_prefix(prefix), text) == text.startswith(prefix)
    assert like_matches(like_prefix(prefix), prefix + text)


# --- passwords ----------------------------------------------------------------------------


def test_a_hash_verifies_its_password_only() -> None:
    """hash_password/verify_password round-trip; a wrong password or a mangled hash fails."""
    stored = hash_password("correct horse", CHEAP)
    assert stored.startswith("scrypt$16$1$1$")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert not verify_password("correct horse", stored.replace("scrypt", "bcrypt"))
    assert not verify_password("correct horse", "scrypt$16$1$1$!!$!!")
    assert not verify_password("correct horse", "")


def test_hashes_are_salted_and_keep_their_parameters() -> None:
    """The same password hashes differently each time; a hash made with other parameters
    still verifies, because they are stored with it."""
    first, second = hash_password("pw", CHEAP), hash_password("pw", CHEAP)
    assert first != second
    other = hash_password("pw", ScryptParameters(n=2**5, r=2, p=1))
    assert other.startswith("scrypt$32$2$1$")
    assert verify_password("pw", other)


def test_the_default_parameters_are_slow_ones() -> None:
    defaults = ScryptParameters()
    assert (defaults.n, defaults.r, defaults.p, defaults.salt_bytes) == (2**14, 8, 1, 16)


def test_the_hasher_runs_its_work_through_the_thread_runner() -> None:
    """PasswordHasher hands the hashing to its runner (deferToThread in production)."""
    ran: list[object] = []

    def runner(f: Any, *args: Any) -> Deferred[Any]:
        ran.append(f)
        return run_now(f, *args)

    hasher = PasswordHasher(CHEAP, runner)
    stored = result_of(hasher.hash("secret"))
    assert result_of(hasher.verify("secret", stored)) is True
    assert result_of(hasher.verify("Secret", stored)) is False
    assert ran == [hash_password, verify_password, verify_password]


# --- tokens -------------------------------------------------------------------------------


def test_tokens_are_random_urlsafe_and_stored_as_sha256() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(is_token_shaped(token) and len(token) == 43 for token in tokens)
    token = tokens.pop()
    assert token_digest(token) == hashlib.sha256(token.encode()).digest()


@pytest.mark.parametrize("token", ["", "short", "x" * 257, "has space in it....", "ünïcödé" * 4])
def test_misshapen_tokens_are_not_tokens(token: str) -> None:
    assert not is_token_shaped(token)


# --- the public shapes --------------------------------------------------------------------


def test_users_and_posts_show_ids_as_strings() -> None:
    user = User(7, Profile("A", "B", date(2000, 1, 2), "bio", "city"))
    assert user.to_json() == {
        "id": "7",
        "first_name": "A",
        "second_name": "B",
        "birthdate": "2000-01-02",
        "biography": "bio",
        "city": "city",
    }
    post = Post(12, 7, "text")
    assert post.to_json() == {"id": "12", "text": "text", "author_user_id": "7"}
    assert Post.from_json(post.to_json()) == post


def test_recent_answers_expire_after_their_ttl_and_stay_bounded() -> None:
    from twisted.internet.task import Clock

    from snet.server.accounts import RecentAnswers

    clock = Clock()
    memo = RecentAnswers(clock, ttl=10.0, size=2)
    memo.put("a", 1)
    clock.advance(9.9)
    assert memo.get("a") == 1
    clock.advance(0.1)
    assert memo.get("a") is None  # expired: the caller asks MySQL again
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # "a" is now the most recently used
    memo.put("c", 3)
    assert (memo.get("a"), memo.get("b"), memo.get("c")) == (1, None, 3)
