"""Parsing of the connection URLs that every snet command line and environment takes."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.python.usage import UsageError

from snet.config import (
    ConfigError,
    ConsulConfig,
    MySQLConfig,
    RedisConfig,
    parse_host_port,
    read_secret_file,
)
from snet.options import ServiceOptions

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


# Secrets from files, as containers get them


def test_a_redis_url_may_carry_a_user_and_a_password_that_repr_hides() -> None:
    config = RedisConfig.from_url("redis://:s%40cret@cache:6380/1")
    assert config == RedisConfig("cache", 6380, 1, "s@cret")
    assert "s@cret" not in repr(config)
    assert RedisConfig.from_url("redis://cache").password is None
    named = RedisConfig.from_url("redis://snet-chat:pw@cache/1")
    assert named == RedisConfig("cache", 6379, 1, "pw", "snet-chat")


def test_a_secret_file_gives_its_one_line_without_the_line_end(tmp_path: Path) -> None:
    for text in ("s3cret", "s3cret\n", "s3cret\r\n"):
        (tmp_path / "secret").write_text(text)
        assert read_secret_file(str(tmp_path / "secret"), "--x") == "s3cret"


@pytest.mark.parametrize("text", ["", "\n", "two\nlines\n"])
def test_an_empty_or_multi_line_secret_file_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / "secret").write_text(text)
    with pytest.raises(ConfigError, match=r"--x: .* one non-empty line"):
        read_secret_file(str(tmp_path / "secret"), "--x")


def test_a_missing_secret_file_is_refused_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--mysql-password-file: cannot read"):
        MySQLConfig.from_url("mysql://app@db/snet").with_password_file(str(tmp_path / "none"))


def options(environ: dict[str, str], *args: str) -> ServiceOptions:
    parsed = ServiceOptions(environ=environ)
    parsed.parseOptions(list(args))
    return parsed


def test_passwords_come_from_the_files_the_environment_names(tmp_path: Path) -> None:
    (tmp_path / "mysql").write_text("db-secret\n")
    (tmp_path / "redis").write_text("cache-secret\n")
    parsed = options(
        {
            "SNET_MYSQL": "mysql://snet_chat@mysql/snet_chat",
            "SNET_MYSQL_PASSWORD_FILE": str(tmp_path / "mysql"),
            "SNET_REDIS": "redis://redis:6379/1",
            "SNET_REDIS_PASSWORD_FILE": str(tmp_path / "redis"),
        }
    )
    assert parsed["mysql-config"] == MySQLConfig(
        "mysql", 3306, "snet_chat", "db-secret", "snet_chat"
    )
    assert parsed["redis-config"] == RedisConfig("redis", 6379, 1, "cache-secret")
    named = options(
        {"SNET_MYSQL": "mysql://u:p@db/snet", "SNET_REDIS_PASSWORD_FILE": str(tmp_path / "redis")},
        "--redis",
        "redis://snet-chat@redis/1",
    )
    assert named["redis-config"] == RedisConfig("redis", 6379, 1, "cache-secret", "snet-chat")


def test_a_redis_user_without_a_password_is_refused_at_start() -> None:
    with pytest.raises(UsageError, match="user 'snet-chat' needs a password"):
        options({"SNET_MYSQL": "mysql://u:p@db/snet"}, "--redis", "redis://snet-chat@redis/1")


def test_a_password_in_the_url_and_a_password_file_are_refused_together(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x\n")
    with pytest.raises(UsageError, match="--mysql-password-file: the --mysql URL gives"):
        options({}, "--mysql", "mysql://u:p@db/snet", "--mysql-password-file", str(tmp_path / "pw"))
    with pytest.raises(UsageError, match="--redis-password-file: the --redis URL gives"):
        options(
            {"SNET_MYSQL": "mysql://u:p@db/snet", "SNET_REDIS_PASSWORD_FILE": str(tmp_path / "pw")},
            "--redis",
            "redis://:p@cache",
        )


def test_the_consul_token_comes_from_its_file_unless_given_directly(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    mysql = {"SNET_MYSQL": "mysql://u:p@db/snet"}
    from_env_file = options({**mysql, "CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "token")})
    assert from_env_file["consul-config"].token == "from-file"
    from_option = options(mysql, "--consul-token-file", str(tmp_path / "token"))
    assert from_option["consul-config"].token == "from-file"
    direct = options(
        {**mysql, "CONSUL_HTTP_TOKEN": "direct", "CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "token")}
    )
    assert direct["consul-config"].token == "direct"
    assert options(mysql)["consul-config"].token is None
    with pytest.raises(UsageError, match="--consul-token-file: cannot read"):
        options({**mysql, "CONSUL_HTTP_TOKEN_FILE": str(tmp_path / "missing")})
