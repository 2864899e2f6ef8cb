"""The monolith's public edge as a real ``twistd -n snet-server`` process (real MariaDB and
Redis): request limits, rate limits shared through Redis by two monolith processes, token
revocation and the token cap, and what the answers disclose."""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from snet.testing.fleet import monolith
from snet.testing.processes import TwistdProcess, http_get, http_json
from snet.testing.servers import ConsulAgent, MariaDB, Redis
from snet.testing.waiting import wait_until

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def database(mariadb: MariaDB) -> str:
    return mariadb.create_database("edge_server")


def start(consul: ConsulAgent, database: str, redis: Redis, *args: str) -> TwistdProcess:
    return monolith(
        consul_url=consul.url,
        mysql_url=database,
        redis_url=redis.url.replace("/0", "/6"),
        chat_service="snet-chat-edge",
        rate_limited=True,
        extra_args=[
            "--chat-url", "http://127.0.0.1:9",
            "--trusted-proxies", "127.0.0.1",
            "--header-timeout", "1",
            "--failed-logins-per-address", "5",
            "--registrations-per-hour", "1000",
            *args,
        ],
    ).start()  # fmt: skip


@pytest.fixture
def servers(
    consul_agent: ConsulAgent, database: str, redis_server: Redis
) -> Iterator[tuple[str, str]]:
    """Two monolith processes over the same MySQL and Redis; their base URLs."""
    first = start(consul_agent, database, redis_server)
    try:
        second = start(consul_agent, database, redis_server)
        try:
            yield base(first), base(second)
        finally:
            second.stop()
    finally:
        first.stop()


def base(process: TwistdProcess) -> str:
    assert process.health_url is not None
    return process.health_url.removesuffix("/health")


def registration(url: str, address: str) -> tuple[int, dict[str, str], Any]:
    return http_json(
        "POST",
        f"{url}/user/register",
        {"first_name": "Edge", "second_name": "Case", "birthdate": "1990-01-01",
         "password": PASSWORD},
        {"X-Forwarded-For": address},
    )  # fmt: skip


def register(url: str, address: str = "192.0.2.1") -> str:
    status, _, body = registration(url, address)
    assert status == 200, body
    return str(body["user_id"])


def login(url: str, user_id: str, password: str, address: str) -> tuple[int, dict[str, str], Any]:
    return http_json(
        "POST", f"{url}/login", {"id": user_id, "password": password}, {"X-Forwarded-For": address}
    )


def test_wrong_passwords_from_one_address_get_429_on_every_process_and_the_owner_still_logs_in(
    servers: tuple[str, str],
) -> None:
    first, second = servers
    victim = register(first)
    attacker = "198.51.100.7"
    statuses = [login(url, victim, "wrong password!", attacker)[0] for url in [first, second] * 3]
    assert statuses == [400] * 5 + [429], "5 failures per address, counted across processes"
    status, headers, body = login(second, victim, PASSWORD, attacker)
    assert status == 429
    assert int(headers["Retry-After"]) > 0
    assert set(body) == {"message", "request_id", "code"} and body["code"] == 42901
    status, _, body = login(first, victim, PASSWORD, "203.0.113.5")
    assert status == 200 and body["token"], "the owner, elsewhere, is not locked out"


def test_a_revoked_token_is_refused_by_every_process(servers: tuple[str, str]) -> None:
    """The other process refuses it once its memo of the token runs out
    (``TOKEN_MEMO_SECONDS``, 0.5 s; the bound itself is a unit test of RecentAnswers)."""
    first, second = servers
    user = register(first)
    token = login(first, user, PASSWORD, "192.0.2.9")[2]["token"]
    auth = {"Authorization": f"Bearer {token}"}
    assert http_json("GET", f"{second}/post/feed", headers=auth)[0] == 200
    assert http_json("POST", f"{first}/logout", headers=auth)[0] == 200
    assert http_json("GET", f"{first}/post/feed", headers=auth)[0] == 401
    wait_until(
        lambda: http_json("GET", f"{second}/post/feed", headers=auth)[0] == 401,
        timeout=5,
        what="the other process to refuse the revoked token",
    )


def test_logout_everywhere_and_the_cap_on_live_tokens(servers: tuple[str, str]) -> None:
    first, second = servers
    user = register(first)
    tokens = [login(first, user, PASSWORD, "192.0.2.10")[2]["token"] for _ in range(11)]

    def works(url: str, token: str) -> bool:
        headers = {"Authorization": f"Bearer {token}"}
        return http_json("GET", f"{url}/post/feed", headers=headers)[0] == 200

    assert not works(second, tokens[0]), "the 11th login revoked the oldest token"
    assert all(works(second, token) for token in tokens[1:])
    headers = {"Authorization": f"Bearer {tokens[5]}"}
    assert http_json("POST", f"{first}/logout?everywhere=true", headers=headers)[0] == 200
    wait_until(
        lambda: not any(works(second, token) for token in tokens),
        timeout=5,
        what="every token refused by the other process",
    )


def test_a_20_mb_body_is_refused_before_1_mb_of_it_is_accepted(servers: tuple[str, str]) -> None:
    host, port = servers[0].removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 20000000\r\n\r\n"
        )
        chunk = b"x" * 65536
        answer = b""
        try:
            while sent < 20_000_000:
                sock.settimeout(0.05)
                with contextlib.suppress(TimeoutError):
                    answer += sock.recv(65536)
                if answer:
                    break
                sock.settimeout(5)
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(5)
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 1_000_000


def test_a_slow_header_client_is_closed_at_the_header_deadline_while_health_answers(
    servers: tuple[str, str],
) -> None:
    host, port = servers[0].removeprefix("http://").split(":")
    began = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        closed_after = None
        for _ in range(40):
            status, _ = http_get(f"{servers[0]}/health")
            assert status == 200
            try:
                sock.sendall(b"X")
            except OSError:
                closed_after = time.monotonic() - began
                break
            sock.settimeout(0.1)
            try:
                if sock.recv(4096) == b"":
                    closed_after = time.monotonic() - began
                    break
            except TimeoutError:
                pass
        assert closed_after is not None and closed_after < 3, closed_after


def test_answers_name_no_server_version(servers: tuple[str, str]) -> None:
    status, headers, _ = http_json("GET", f"{servers[0]}/health")
    assert status == 200
    assert headers["Server"] == "snet"


def test_registrations_from_one_address_are_limited(
    consul_agent: ConsulAgent, database: str, redis_server: Redis
) -> None:
    process = start(consul_agent, database, redis_server, "--registrations-per-hour", "2")
    address = f"192.0.2.{uuid.uuid4().int % 200 + 20}"
    try:
        url = base(process)
        register(url, address)
        register(url, address)
        status, headers, body = registration(url, address)
        assert (status, body["code"]) == (429, 42902)
        assert int(headers["Retry-After"]) > 0
        register(url, "192.0.2.250")
    finally:
        process.stop()


def test_operator_routes_are_on_the_admin_listener_only(
    consul_agent: ConsulAgent, database: str, redis_server: Redis
) -> None:
    """/metrics and the fleet view answer on the admin listener (127.0.0.1), not on the
    public port."""
    process = start(consul_agent, database, redis_server)
    try:
        admin, public = process.admin_url, base(process)
        assert admin is not None
        for path in ("/metrics", "/fleet/", "/fleet/fleet.json"):
            assert http_get(f"{admin}{path}")[0] == 200, path
            assert http_get(f"{public}{path}")[0] == 404, path
        status, _, fleet = http_json("GET", f"{admin}/fleet/fleet.json")
        assert status == 200 and isinstance(fleet, dict), fleet
    finally:
        process.stop()
