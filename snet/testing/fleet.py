"""A fleet of real snet processes: chat instances registered with Consul, and monoliths.

Integration tests, benchmarks and ``python -m snet.stack`` start the same processes the same
way, from ``twistd`` of the running Python environment, each on a free 127.0.0.1 port.

They speak Connect by default, as deployed (docs/trust.md): a fleet first creates the
intentions ``* -> <its service>`` deny and ``snet-server -> <its service>`` allow, its
instances serve TLS only, and a monolith calls them as ``snet-server``. Talking to an
instance directly takes ``https://`` and, for ``/v1``, a Connect client certificate:
``ChatFleet.caller_tls`` is one for ``snet-server`` (``/health`` and ``/metrics`` need none).
``plaintext=True`` starts both ends with ``--insecure-plaintext`` instead.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
import uuid
from collections.abc import Sequence
from functools import cached_property
from typing import Any
from urllib.parse import quote

import pymysql

from snet.config import MySQLConfig
from snet.connect.wiring import MONOLITH_SERVICE
from snet.testing.processes import TwistdProcess, http_get, http_json
from snet.testing.servers import free_port
from snet.testing.waiting import wait_until

PLAINTEXT = "--insecure-plaintext"


def allow_only_the_monolith(consul_url: str, service: str) -> list[str]:
    """Create the intentions ``* -> service`` deny and ``snet-server -> service`` allow (those
    that exist already are kept); returns them as ``source -> destination action`` lines."""
    created = []
    for source, action in (("*", "deny"), (MONOLITH_SERVICE, "allow")):
        status, _, answer = http_json(
            "POST",
            f"{consul_url}/v1/connect/intentions",
            {"SourceName": source, "DestinationName": service, "Action": action},
        )
        if status != 200 and "duplicate" not in json.dumps(answer).lower():
            raise RuntimeError(f"creating the intention {source} -> {service}: {status} {answer}")
        created.append(f"{source} -> {service} {action}")
    return created


def connect_client_tls(consul_url: str, service: str = MONOLITH_SERVICE) -> ssl.SSLContext:
    """A TLS client context that presents *service*'s Connect leaf (from the agent at
    *consul_url*) and verifies servers against the Connect roots (their SPIFFE ids are not
    checked: a test client, not the monolith)."""
    status, body = http_get(f"{consul_url}/v1/agent/connect/ca/leaf/{quote(service, safe='')}")
    if status != 200:
        raise RuntimeError(f"the connect leaf of {service}: {status} {body!r}")
    leaf = json.loads(body)
    status, body = http_get(f"{consul_url}/v1/agent/connect/ca/roots")
    if status != 200:
        raise RuntimeError(f"the connect roots: {status} {body!r}")
    roots = "".join(root["RootCert"] for root in json.loads(body)["Roots"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=roots)
    # ssl loads a key pair only from a file: a private one, removed at once.
    descriptor, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(descriptor, "w") as pem:
            pem.write(leaf["CertPEM"] + leaf["PrivateKeyPEM"])
        context.load_cert_chain(path)
    finally:
        os.unlink(path)
    return context


class ChatFleet:
    """Chat instances registered under one service name (by default a fresh one), over
    Connect unless *plaintext* (see the module docstring)."""

    def __init__(
        self,
        *,
        consul_url: str,
        mysql_url: str,
        redis_url: str,
        count: int = 3,
        service: str | None = None,
        extra_args: Sequence[str] = ("--drain-timeout", "5"),
        ports: Sequence[int] | None = None,
        own_session: bool = False,
        plaintext: bool = False,
    ) -> None:
        self.consul_url = consul_url
        self.plaintext = plaintext
        self.mysql_url = mysql_url
        self.redis_url = redis_url
        self.service = service or f"snet-chat-{uuid.uuid4().hex[:8]}"
        self.extra_args = [*extra_args, PLAINTEXT] if plaintext else list(extra_args)
        self.own_session = own_session
        self.intentions = [] if plaintext else allow_only_the_monolith(consul_url, self.service)
        self.instances: list[TwistdProcess] = []
        for index in range(count):
            self.instances.append(self._process(index, ports[index] if ports else free_port()))
        for process in self.instances:
            process.start(ready_timeout=None)  # all at once: the schema is applied concurrently
        for process in self.instances:
            process.wait_healthy(30)

    def _process(self, index: int, port: int) -> TwistdProcess:
        admin = free_port()
        return TwistdProcess(
            "snet-chat",
            [
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--admin-listen", f"tcp:{admin}:interface=127.0.0.1",
                "--consul", self.consul_url,
                "--service-name", self.service,
                "--instance-id", self.instance_id(index),
                "--mysql", self.mysql_url,
                "--redis", self.redis_url,
                *self.extra_args,
            ],
            health_url=f"{self.scheme}://127.0.0.1:{port}/health",
            admin_url=f"http://127.0.0.1:{admin}",
            name=self.instance_id(index),
            own_session=self.own_session,
        )  # fmt: skip

    @property
    def scheme(self) -> str:
        return "http" if self.plaintext else "https"

    @cached_property
    def caller_tls(self) -> ssl.SSLContext | None:
        """A client certificate of ``snet-server``, the one caller the intentions allow, for
        calling ``/v1`` of an instance directly (None in plaintext: none needed)."""
        return None if self.plaintext else connect_client_tls(self.consul_url)

    def add_instance(self) -> TwistdProcess:
        """Start one more instance (it registers once healthy) and return it."""
        return self.add_instance_at(free_port()).start()

    def add_instance_at(self, port: int) -> TwistdProcess:
        """One more instance on *port*, not started yet."""
        process = self._process(len(self.instances), port)
        self.instances.append(process)
        return process

    def instance_id(self, index: int) -> str:
        return f"{self.service}-{index}"

    def url(self, index: int) -> str:
        health = self.instances[index].health_url
        assert health is not None
        return health.removesuffix("/health")

    def admin_url(self, index: int) -> str:
        """Where instance *index* serves ``/metrics`` (its admin listener)."""
        admin = self.instances[index].admin_url
        assert admin is not None
        return admin

    def consul_entries(self, passing: bool = True) -> list[dict[str, Any]]:
        query = "?passing=true" if passing else ""
        status, body = http_get(f"{self.consul_url}/v1/health/service/{self.service}{query}")
        assert status == 200, body
        entries: list[dict[str, Any]] = json.loads(body)
        return entries

    def registered_ids(self) -> set[str]:
        return {e["Service"]["ID"] for e in self.consul_entries(passing=False)}

    def passing_ids(self) -> set[str]:
        return {e["Service"]["ID"] for e in self.consul_entries()}

    def check_status(self, instance_id: str) -> str | None:
        for entry in self.consul_entries(passing=False):
            if entry["Service"]["ID"] == instance_id:
                statuses = [c["Status"] for c in entry["Checks"] if c.get("ServiceID")]
                return statuses[0] if statuses else None
        return None

    def ids(self) -> set[str]:
        return {self.instance_id(i) for i in range(len(self.instances))}

    def running_ids(self) -> set[str]:
        return {self.instance_id(i) for i, p in enumerate(self.instances) if p.running()}

    def wait_all_passing(self, timeout: float = 15) -> None:
        """Wait until exactly the running instances show as passing in Consul."""
        wait_until(
            lambda: self.passing_ids() == self.running_ids(), timeout, "every instance passing"
        )

    def stop(self) -> None:
        for process in self.instances:
            process.stop()


UNLIMITED = ("--registrations-per-hour", "1000000", "--failed-logins-per-address", "1000000")
"""Options that lift the monolith's rate limits (for tests and benchmarks)."""


def monolith(
    *,
    consul_url: str,
    mysql_url: str,
    redis_url: str,
    chat_service: str,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    own_session: bool = False,
    rate_limited: bool = False,
    plaintext: bool = False,
    admin_port: int | None = None,
) -> TwistdProcess:
    """A ``twistd -n snet-server`` process (not started yet) discovering *chat_service*,
    calling it over Connect as ``snet-server`` unless *plaintext*.

    Unless *rate_limited*, its registration and failed-login limits are lifted: tests and
    benchmarks register many users from 127.0.0.1 through one Redis, and exercise the API
    rather than its limits (tests/integration/test_edge.py checks those).
    """
    port = port or free_port()
    admin = admin_port or free_port()
    if not rate_limited:
        extra_args = [*UNLIMITED, *extra_args]
    return TwistdProcess(
        "snet-server",
        [
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--admin-listen", f"tcp:{admin}:interface=127.0.0.1",
            "--consul", consul_url,
            "--chat-service", chat_service,
            "--mysql", mysql_url,
            "--redis", redis_url,
            *extra_args,
            *([PLAINTEXT] if plaintext else []),
        ],
        health_url=f"http://127.0.0.1:{port}/health",
        admin_url=f"http://127.0.0.1:{admin}",
        name=f"monolith-{port}",
        own_session=own_session,
    )  # fmt: skip


def query(mysql_url: str, sql: str, *args: object) -> list[tuple[Any, ...]]:
    """Run one parameterised statement against *mysql_url* and return its rows."""
    config = MySQLConfig.from_url(mysql_url)
    connection = pymysql.connect(
        host=config.host, port=config.port, user=config.user, password=config.password,
        database=config.database, autocommit=True,
    )  # fmt: skip
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, args)
            return list(cursor.fetchall())
    finally:
        connection.close()
