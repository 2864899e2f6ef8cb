"""Connection settings shared by every part: parsed once from URLs, then passed around as values.

``mysql://USER:PASSWORD@HOST:PORT/DATABASE``, ``redis://[USER][:PASSWORD@]HOST:PORT/DB`` and
Consul's ``http://HOST:PORT`` are the forms every command line and environment variable
takes. Secrets may instead come from files (:func:`read_secret_file`), as containers get them.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from attrs import evolve, field, frozen


class ConfigError(ValueError):
    """A setting that cannot be used; its message says which and why."""


def _port(text: str | None, default: int, what: str) -> int:
    if text is None:
        return default
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"{what}: port {text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{what}: port {port} is out of range")
    return port


def _split(url: str, scheme: str, what: str) -> tuple[str, int | None, str, str, str]:
    """Return (host, port text, user, password, path) of *url*, checking its scheme."""
    parts = urlsplit(url)
    if parts.scheme != scheme:
        raise ConfigError(f"{what}: expected a {scheme}:// URL, got {url!r}")
    if not parts.hostname:
        raise ConfigError(f"{what}: {url!r} names no host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{what}: {url!r} has an invalid port") from None
    return (
        parts.hostname,
        port,
        unquote(parts.username or ""),
        unquote(parts.password or ""),
        parts.path.lstrip("/"),
    )


def read_secret_file(path: str, what: str) -> str:
    """The secret in the file at *path*, without the line end a text file ends with.

    Refuses (naming *what*) an unreadable or empty file, or one of more than one line: a
    secret is one line, and a mistaken path should fail at start, not at the first login.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: cannot read {path!r}: {e}") from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret or "\n" in secret or "\r" in secret:
        raise ConfigError(f"{what}: {path!r} must hold one non-empty line")
    return secret


@frozen
class MySQLConfig:
    """Where the MySQL/MariaDB database is and how to log in to it."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str

    @classmethod
    def from_url(cls, url: str) -> MySQLConfig:
        host, port, user, password, database = _split(url, "mysql", "--mysql")
        if not user:
            raise ConfigError("--mysql: the URL names no user")
        if not database or "/" in database:
            raise ConfigError("--mysql: the URL must end in /DATABASE")
        return cls(
            host,
            _port(None if port is None else str(port), 3306, "--mysql"),
            user,
            password,
            database,
        )

    def with_password_file(self, path: str) -> MySQLConfig:
        """This config with the password read from *path*; the URL must give none."""
        if self.password:
            raise ConfigError("--mysql-password-file: the --mysql URL gives a password too")
        return evolve(self, password=read_secret_file(path, "--mysql-password-file"))


@frozen
class RedisConfig:
    """Where the Redis server is, which database number to use, and how to log in if needed
    (``redis://[USER][:PASSWORD]@HOST:PORT/DB``; without a user, Redis's ``default`` one)."""

    host: str
    port: int
    db: int = 0
    password: str | None = field(default=None, repr=False)
    username: str | None = None

    @classmethod
    def from_url(cls, url: str) -> RedisConfig:
        host, port, user, password, path = _split(url, "redis", "--redis")
        db = 0
        if path:
            try:
                db = int(path)
            except ValueError:
                raise ConfigError(f"--redis: database {path!r} is not a number") from None
        port_number = _port(None if port is None else str(port), 6379, "--redis")
        return cls(host, port_number, db, password or None, user or None)

    def with_password_file(self, path: str) -> RedisConfig:
        """This config with the password read from *path*; the URL must give none."""
        if self.password:
            raise ConfigError("--redis-password-file: the --redis URL gives a password too")
        return evolve(self, password=read_secret_file(path, "--redis-password-file"))


@frozen
class ConsulConfig:
    """How to reach the Consul agent: its HTTP address and an optional ACL token."""

    scheme: str
    host: str
    port: int
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str, token: str | None = None) -> ConsulConfig:
        if "://" not in url:
            # CONSUL_HTTP_ADDR is often given as HOST:PORT, as the consul CLI accepts it.
            url = "http://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ConfigError(f"--consul: expected an http:// or https:// URL, got {url!r}")
        if not parts.hostname:
            raise ConfigError(f"--consul: {url!r} names no host")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"--consul: {url!r} has an invalid port") from None
        default = 443 if parts.scheme == "https" else 8500
        return cls(parts.scheme, parts.hostname, port or default, token or None)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_http_address(url: str, what: str) -> tuple[str, int]:
    """``http://HOST[:PORT]`` and nothing more (port 80 by default; IPv6 in brackets)."""
    host, port, user, _password, path = _split(url, "http", what)
    parts = urlsplit(url)
    if path or parts.query or parts.fragment or user:
        raise ConfigError(f"{what}: {url!r} must be just http://HOST:PORT")
    return host, port or 80


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too) into its parts."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    host = host.strip("[]")
    return host, _port(port, 0, what)
