"""Command-line options shared by snet's twistd plugins.

Every option can also come from the environment (for containers): an option given on the
command line wins, then its environment variable, then the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.python import usage

from snet.config import ConfigError, ConsulConfig, MySQLConfig, RedisConfig, read_secret_file
from snet.web.limits import HTTPLimits

_TRUE = frozenset({"1", "true", "yes", "on"})


def flag_or_environment(flag: object, environ: Mapping[str, str], variable: str) -> bool:
    """Whether an on/off option is on: its flag, else *variable* set to 1, true, yes or on."""
    return bool(flag) or environ.get(variable, "").strip().lower() in _TRUE


def positive_float(text: str) -> float:
    """Coerce an option to a number of seconds greater than zero."""
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{text!r} is not a positive number")
    return value


def positive_int(text: str) -> int:
    """Coerce an option to a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(f"{text!r} is not a whole number >= 1")
    return value


def non_negative_float(text: str) -> float:
    """Coerce an option to a number of seconds, zero allowed."""
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text!r} is not a number of seconds >= 0")
    return value


class _NamedCoerceParameter(usage.CoerceParameter):
    """Like twistd's own, but its error names the option: ``--drain-timeout: ...``."""

    def dispatch(self, parameterName: str, value: str | None) -> None:  # noqa: N803
        try:
            super().dispatch(parameterName, value)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            detail = str(e).removeprefix("Parameter type enforcement failed: ")
            raise usage.UsageError(f"--{parameterName}: {detail}") from None


class EnvironmentOptions(usage.Options):
    """Options whose unset values are filled from environment variables.

    A class lists ``environment = {"option-name": "ENV_VAR", ...}`` and
    ``fallbacks = {"option-name": default}`` (not usage.Options' own ``defaults``); like
    ``optParameters``, both add up along the class hierarchy. Coerce functions of
    ``optParameters`` apply to values from the environment too, and their errors name the
    variable.
    """

    optParameters: list[list[Any]] = []
    environment: Mapping[str, str] = {}
    fallbacks: Mapping[str, Any] = {}

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.environ = os.environ if environ is None else environ
        for name, handler in self._dispatch.items():
            if isinstance(handler, usage.CoerceParameter):
                self._dispatch[name] = _NamedCoerceParameter(self, handler.coerce)  # type: ignore[no-untyped-call]

    def _merged(self, attribute: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for klass in reversed(type(self).__mro__):
            merged.update(vars(klass).get(attribute, {}))
        return merged

    def fill_from_environment(self) -> None:
        coercers: dict[str, Callable[[str], Any]] = {
            name: handler.coerce
            for name, handler in self._dispatch.items()
            if isinstance(handler, usage.CoerceParameter)
        }
        fallbacks = self._merged("fallbacks")
        for name, variable in self._merged("environment").items():
            if self[name] is not None:
                continue
            raw = self.environ.get(variable)
            if raw:
                coerce = coercers.get(name)
                try:
                    self[name] = coerce(raw) if coerce else raw
                except ValueError as e:
                    raise usage.UsageError(f"{variable}={raw!r}: {e}") from None
            elif name in fallbacks:
                self[name] = fallbacks[name]

    def postOptions(self) -> None:
        self.fill_from_environment()


class ServiceOptions(EnvironmentOptions):
    """The options every snet service takes: where to listen, Consul, MySQL, Redis, drain."""

    optParameters = [
        ["listen", None, None, "Endpoint string to listen on.", str],
        [
            "admin-listen",
            None,
            None,
            "Endpoint string of the admin listener (/metrics, /health; operators only; on"
            " 127.0.0.1 by default).",
            str,
        ],
        [
            "consul",
            None,
            None,
            "Consul agent HTTP address (default CONSUL_HTTP_ADDR, else http://127.0.0.1:8500).",
            str,
        ],
        ["mysql", None, None, "mysql://USER:PASSWORD@HOST:PORT/DATABASE (required).", str],
        [
            "mysql-password-file",
            None,
            None,
            "Read the MySQL password from this file (the --mysql URL then gives none).",
            str,
        ],
        [
            "redis",
            None,
            None,
            "redis://[USER][:PASSWORD@]HOST:PORT/DB (default redis://127.0.0.1:6379/0).",
            str,
        ],
        [
            "redis-password-file",
            None,
            None,
            "Read the Redis password from this file (the --redis URL then gives none).",
            str,
        ],
        [
            "consul-token-file",
            None,
            None,
            "Read the Consul ACL token from this file (CONSUL_HTTP_TOKEN, if set, wins).",
            str,
        ],
        [
            "drain-timeout",
            None,
            None,
            "Seconds to let in-flight requests finish on stop (default 10).",
            positive_float,
        ],
        [
            "max-body",
            None,
            None,
            "Largest request body in bytes; a larger one is refused with 413 before it is read"
            " (default 65536).",
            positive_int,
        ],
        [
            "header-timeout",
            None,
            None,
            "Seconds a client has to send the request line and headers (default 10).",
            positive_float,
        ],
        [
            "body-timeout",
            None,
            None,
            "Seconds a client has to send the whole body after the headers (default 30).",
            positive_float,
        ],
        [
            "idle-timeout",
            None,
            None,
            "Seconds a kept-alive connection may stay idle (default 60).",
            positive_float,
        ],
        [
            "max-connections",
            None,
            None,
            "Open connections per listener; more are closed at once (default 1024).",
            positive_int,
        ],
    ]
    environment = {
        "listen": "SNET_LISTEN",
        "admin-listen": "SNET_ADMIN_LISTEN",
        "consul": "CONSUL_HTTP_ADDR",
        "mysql": "SNET_MYSQL",
        "mysql-password-file": "SNET_MYSQL_PASSWORD_FILE",
        "redis": "SNET_REDIS",
        "redis-password-file": "SNET_REDIS_PASSWORD_FILE",
        "consul-token-file": "CONSUL_HTTP_TOKEN_FILE",
        "drain-timeout": "SNET_DRAIN_TIMEOUT",
        "max-body": "SNET_MAX_BODY",
        "header-timeout": "SNET_HEADER_TIMEOUT",
        "body-timeout": "SNET_BODY_TIMEOUT",
        "idle-timeout": "SNET_IDLE_TIMEOUT",
        "max-connections": "SNET_MAX_CONNECTIONS",
    }
    fallbacks = {
        "consul": "http://127.0.0.1:8500",
        "redis": "redis://127.0.0.1:6379/0",
        "drain-timeout": 10.0,
        "max-body": 64 * 1024,
        "header-timeout": 10.0,
        "body-timeout": 30.0,
        "idle-timeout": 60.0,
        "max-connections": 1024,
    }

    def postOptions(self) -> None:
        super().postOptions()
        if not self["mysql"]:
            raise usage.UsageError(
                "--mysql (or SNET_MYSQL) is required: mysql://USER:PASSWORD@HOST:PORT/DATABASE"
            )
        try:
            mysql = MySQLConfig.from_url(self["mysql"])
            if self["mysql-password-file"]:
                mysql = mysql.with_password_file(self["mysql-password-file"])
            redis = RedisConfig.from_url(self["redis"])
            if self["redis-password-file"]:
                redis = redis.with_password_file(self["redis-password-file"])
            if redis.username and not redis.password:
                # txredisapi would send no AUTH at all: say so now, not at the first call.
                raise ConfigError(f"--redis: the user {redis.username!r} needs a password")
            # As the consul CLI: a token given directly wins over a token file.
            token = self.environ.get("CONSUL_HTTP_TOKEN")
            if not token and self["consul-token-file"]:
                token = read_secret_file(self["consul-token-file"], "--consul-token-file")
            self["mysql-config"] = mysql
            self["redis-config"] = redis
            self["consul-config"] = ConsulConfig.from_url(self["consul"], token)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["http-limits"] = HTTPLimits(
            max_body=self["max-body"],
            header_timeout=self["header-timeout"],
            body_timeout=self["body-timeout"],
            idle_timeout=self["idle-timeout"],
            max_connections=self["max-connections"],
        )
