"""Unit tests of snet.server.accounts' pure parts: the validators (property-based), the
LIKE-prefix escaping, scrypt password hashes and tokens. Hashing runs synchronously here with
cheap parameters; tests/integration/test_server_storage.py runs the real ones in threads."""

from __future__ import annotations

import hashlib
import re
from datetime import date, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred

from snet.server.accounts import (
    MAX_BIOGRAPHY,
    MAX_NAME,
    MAX_PASSWORD,
    MIN_PASSWORD,
    OLDEST_BIRTHDATE,
    PasswordHasher,
    Profile,
    ScryptParameters,
    User,
    hash_password,
    is_token_shaped,
    like_prefix,
    new_token,
    parse_birthdate,
    parse_user_id,
    token_digest,
    validate_biography,
    validate_city,
    validate_name,
    validate_new_password,
    validate_search_prefix,
    verify_password,
)
from snet.server.social import MAX_POST_TEXT, Post, validate_post_text
from snet.testing import result_of
from snet.web.errors import BadRequest

TODAY = date(2026, 11, 27)
CHEAP = ScryptParameters(n=2**4, r=1, p=1)


def run_now(f: Any, *args: Any) -> Deferred[Any]:
    """A stand-in for deferToThread that runs *f* at once (unit tests have no threads)."""
    return maybeDeferred(f, *args)


# --- birth dates ----------------------------------------------------------------------------


@given(st.dates(min_value=OLDEST_BIRTHDATE, max_value=TODAY))
def test_every_real_past_date_is_a_birthdate(day: date) -> None:
    assert parse_birthdate(day.isoformat(), TODAY) == day


@given(st.dates(min_value=TODAY + timedelta(days=1)))
def test_future_dates_are_refused(day: date) -> None:
    with pytest.raises(BadRequest):
        parse_birthdate(day.isoformat(), TODAY)


@given(st.dates(max_value=OLDEST_BIRTHDATE - timedelta(days=1), min_value=date(1000, 1, 1)))
def test_dates_before_1900_are_refused(day: date) -> None:
    with pytest.raises(BadRequest):
        parse_birthdate(day.isoformat(), TODAY)


@pytest.mark.parametrize(
    "text",
    [
        "2023-02-30",
        "2023-02-29",
        "2023-13-01",
        "2023-00-10",
        "2023-04-31",
        "1990-5-17",
        "17.05.1990",
        "1990-05-17T00:00:00",
        " 1990-05-17",
        "\uff11\uff19\uff19\uff10-05-17",  # full-width digits
        "",
        "19900517",
    ],
)
def test_impossible_or_misshapen_dates_are_refused(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_birthdate(text, TODAY)


@given(st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.text()), st.booleans()))
def test_non_strings_are_not_birthdates(value: object) -> None:
    with pytest.raises(BadRequest):
        parse_birthdate(value, TODAY)


def test_leap_days_are_birthdates() -> None:
    assert parse_birthdate("2024-02-29", TODAY) == date(2024, 2, 29)


# --- names and other profile fields ---------------------------------------------------------

PRINTABLE = st.characters(blacklist_categories=("Cc", "Cs"))


@given(st.text(PRINTABLE, min_size=1, max_size=MAX_NAME).filter(lambda s: s.strip()))
def test_names_are_kept_stripped(name: str) -> None:
    assert validate_name(name, "first_name") == name.strip()


@given(st.text(PRINTABLE, min_size=MAX_NAME + 1, max_size=MAX_NAME + 50))
def test_over_long_names_are_refused(name: str) -> None:
    with pytest.raises(BadRequest):
        validate_name(name, "first_name")


@given(st.text(st.characters(whitelist_categories=("Cc",)), min_size=1, max_size=3))
def test_control_characters_are_refused_in_names(bad: str) -> None:
    with pytest.raises(BadRequest):
        validate_name("a" + bad + "b", "first_name")


def test_blank_names_and_lone_surrogates_are_refused() -> None:
    for name in ("", "  ", "\u3000", "a\ud800"):
        with pytest.raises(BadRequest):
            validate_name(name, "second_name")


def test_optional_fields_default_to_empty_and_allow_newlines_in_biographies() -> None:
    assert validate_city(None) == ""
    assert validate_biography(None) == ""
    assert validate_biography("line one\nline two\ttab") == "line one\nline two\ttab"
    with pytest.raises(BadRequest):
        validate_city("Moscow\nLondon")
    with pytest.raises(BadRequest):
        validate_biography("x" * (MAX_BIOGRAPHY + 1))
    with pytest.raises(BadRequest):
        validate_biography("bell\x07")


# --- ids ------------------------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=2**63 - 1))
def test_user_ids_are_positive_decimal_strings(n: int) -> None:
    assert parse_user_id(str(n)) == n


@given(
    st.one_of(
        st.integers(),
        st.none(),
        st.text().filter(lambda s: re.fullmatch(r"[1-9][0-9]{0,18}", s) is None),
        st.integers(min_value=2**63).map(str),
    )
)
def test_anything_else_is_not_a_user_id(value: object) -> None:
    with pytest.raises(BadRequest):
        parse_user_id(value)


# --- search prefixes ------------------------------------------------------------------------


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


def test_search_prefixes_must_be_1_to_100_characters() -> None:
    assert validate_search_prefix(" Kon ", "first_name") == "Kon"
    for bad in (None, "", "   ", "x" * (MAX_NAME + 1)):
        with pytest.raises(BadRequest):
            validate_search_prefix(bad, "first_name")


# --- passwords ------------------------------------------------------------------------------


@given(st.text(min_size=MIN_PASSWORD, max_size=40))
def test_new_passwords_of_valid_length_are_accepted_unless_not_unicode(password: str) -> None:
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises(BadRequest):
            validate_new_password(password)
        return
    assert validate_new_password(password) == password


def test_new_passwords_outside_the_length_limits_are_refused() -> None:
    for bad in ("", "x" * (MIN_PASSWORD - 1), "x" * (MAX_PASSWORD + 1), None, 12345678):
        with pytest.raises(BadRequest):
            validate_new_password(bad)


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


# --- tokens ---------------------------------------------------------------------------------


def test_tokens_are_random_urlsafe_and_stored_as_sha256() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(is_token_shaped(token) and len(token) == 43 for token in tokens)
    token = tokens.pop()
    assert token_digest(token) == hashlib.sha256(token.encode()).digest()


@pytest.mark.parametrize("token", ["", "short", "x" * 257, "has space in it....", "ünïcödé" * 4])
def test_misshapen_tokens_are_not_tokens(token: str) -> None:
    assert not is_token_shaped(token)


# --- the public shapes ----------------------------------------------------------------------


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


@given(st.text(PRINTABLE, min_size=1, max_size=200).filter(lambda s: s.strip()))
def test_post_texts_are_kept_as_given(text: str) -> None:
    assert validate_post_text(text) == text


def test_post_texts_over_the_limit_are_refused() -> None:
    assert validate_post_text("x" * MAX_POST_TEXT)
    with pytest.raises(BadRequest):
        validate_post_text("x" * (MAX_POST_TEXT + 1))


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
