"""Unit tests of snet.server.validation (property-based): what the monolith accepts of
profiles, passwords, user ids, search prefixes and post texts."""

from __future__ import annotations

import re
from datetime import date, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snet.server.validation import (
    MAX_BIOGRAPHY,
    MAX_NAME,
    MAX_PASSWORD,
    MAX_POST_TEXT,
    MIN_PASSWORD,
    OLDEST_BIRTHDATE,
    parse_birthdate,
    parse_user_id,
    validate_biography,
    validate_city,
    validate_name,
    validate_new_password,
    validate_post_text,
    validate_search_prefix,
)
from snet.web.errors import BadRequest

TODAY = date(2026, 11, 27)


# --- birth dates --------------------------------------------------------------------------


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


# --- names and other profile fields -------------------------------------------------------


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


# --- ids ----------------------------------------------------------------------------------


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


# --- search prefixes ----------------------------------------------------------------------


def test_search_prefixes_must_be_1_to_100_characters() -> None:
    assert validate_search_prefix(" Kon ", "first_name") == "Kon"
    for bad in (None, "", "   ", "x" * (MAX_NAME + 1)):
        with pytest.raises(BadRequest):
            validate_search_prefix(bad, "first_name")


# --- passwords ----------------------------------------------------------------------------


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


# --- post texts ---------------------------------------------------------------------------


@given(st.text(PRINTABLE, min_size=1, max_size=200).filter(lambda s: s.strip()))
def test_post_texts_are_kept_as_given(text: str) -> None:
    assert validate_post_text(text) == text


def test_post_texts_over_the_limit_are_refused() -> None:
    assert validate_post_text("x" * MAX_POST_TEXT)
    with pytest.raises(BadRequest):
        validate_post_text("x" * (MAX_POST_TEXT + 1))
