"""Parsing of the connection URLs that every snet command line and environment takes."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snet.config import ConfigError, ConsulConfig, MySQLConfig, RedisConfig, parse_host_port

hosts = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True)
ports = st.integers(1, 65535)
words = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)


@given(hosts, ports, words, words, st.from_regex(r"[A-Za-z0-9_]{1,64}", fullmatch=True))
def test_a_mysql_url_round_trips_its_parts_even_with_odd_passwords(
    host: str, port: int, user: str, password: str, database: str
) -> None:
    url = f"mysql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{database}"
    assert MySQLConfig.from_url(url) == MySQLConfig(host, port, user, password, database)


def test_mysql_defaults_to_port_3306_and_hides_its_password() -> None:
    config = MySQLConfig.from_url("mysql://app:s3cret@db/snet")
    assert config.port == 3306
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(
    "url",
    [
        "postgres://u:p@h/db",
        "mysql://h/db",
        "mysql://u:p@h",
        "mysql://u:p@h/",
        "mysql://u:p@h/a/b",
        "mysql://u:p@h:99999/db",
        "mysql://u:p@h:port/db",
        "mysql://u:p@:3306/db",
    ],
)
def test_unusable_mysql_urls_are_refused_with_a_reason(url: str) -> None:
    with pytest.raises(ConfigError, match="--mysql"):
        MySQLConfig.from_url(url)


@given(hosts, ports, st.integers(0, 15))
def test_a_redis_url_round_trips(host: str, port: int, db: int) -> None:
    assert RedisConfig.from_url(f"redis://{host}:{port}/{db}") == RedisConfig(host, port, db)


def test_redis_defaults_and_errors() -> None:
    assert RedisConfig.from_url("redis://cache") == RedisConfig("cache", 6379, 0)
    with pytest.raises(ConfigError, match="not a number"):
        RedisConfig.from_url("redis://cache/zero")
    with pytest.raises(ConfigError, match="redis://"):
        RedisConfig.from_url("http://cache")


def test_consul_address_takes_the_forms_consul_http_addr_takes() -> None:
    assert ConsulConfig.from_url("127.0.0.1:8501").url == "http://127.0.0.1:8501"
    assert ConsulConfig.from_url("http://consul").url == "http://consul:8500"
    assert ConsulConfig.from_url("https://consul").url == "https://consul:443"
    assert "tok" not in repr(ConsulConfig.from_url("consul:8500", "tok"))
    with pytest.raises(ConfigError, match="--consul"):
        ConsulConfig.from_url("ftp://consul")


@given(hosts, ports)
def test_host_port_splits(host: str, port: int) -> None:
    assert parse_host_port(f"{host}:{port}", "--advertise") == (host, port)


def test_host_port_takes_bracketed_ipv6_and_refuses_nonsense() -> None:
    assert parse_host_port("[::1]:9001", "x") == ("::1", 9001)
    for bad in ("9001", ":9001", "host:", "host:0", "host:x"):
        with pytest.raises(ConfigError):
            parse_host_port(bad, "x")
