"""Only the monolith reaches dialog data: real ``twistd`` chat instances and a monolith over
Consul Connect, with a real Consul agent (Connect on, its built-in CA) and the intentions the
deployment creates (``* -> chat`` deny, ``snet-server -> chat`` allow).

The agent is this module's own: the last test rotates its CA.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import pytest
from attrs import frozen

from snet.testing.connect import new_ca_private_key
from snet.testing.fleet import ChatFleet, connect_client_tls, monolith, query
from snet.testing.processes import TwistdProcess, http_get, http_json
from snet.testing.servers import ConsulAgent, MariaDB, Redis, free_port
from snet.testing.traffic import (
    ApiUser,
    DialogTraffic,
    DialogUsers,
    api_requests,
    compare_with_mysql,
    metric_value,
    wait_for_instances,
)
from snet.testing.waiting import wait_until

pytestmark = pytest.mark.integration


@frozen
class Deployment:
    agent: ConsulAgent
    fleet: ChatFleet
    server: TwistdProcess
    base: str
    chat_mysql_url: str
    redis_url: str
    users: DialogUsers

    @property
    def sender(self) -> ApiUser:
        return self.users.sender

    @property
    def admin(self) -> str:
        """The monolith's admin listener (its /metrics)."""
        assert self.server.admin_url is not None
        return self.server.admin_url

    @property
    def recipient(self) -> ApiUser:
        return self.users.recipient

    def traffic(self) -> DialogTraffic:
        return self.users.traffic(self.base, clients=3, max_seconds=120)


@pytest.fixture(scope="module")
def deployment(mariadb: MariaDB, redis_server: Redis) -> Iterator[Deployment]:
    suffix = uuid.uuid4().hex[:8]
    chat_mysql_url = mariadb.create_database(f"connect_chat_{suffix}")
    redis_url = redis_server.url.replace("/0", "/2")
    with ConsulAgent() as agent:
        fleet = ChatFleet(
            consul_url=agent.url, mysql_url=chat_mysql_url, redis_url=redis_url, count=2
        )
        try:
            fleet.wait_all_passing()
            with monolith(
                consul_url=agent.url,
                mysql_url=mariadb.create_database(f"connect_server_{suffix}"),
                redis_url=redis_server.url.replace("/0", "/3"),
                chat_service=fleet.service,
            ) as server:
                base = server.base_url
                assert server.admin_url is not None
                wait_for_instances(server.admin_url, 2)
                yield Deployment(
                    agent,
                    fleet,
                    server,
                    base,
                    chat_mysql_url,
                    redis_url,
                    DialogUsers.register(base),
                )
        finally:
            fleet.stop()


def send_through_the_monolith(d: Deployment, text: str) -> None:
    status, _, body = http_json(
        "POST",
        f"{d.base}/dialog/{d.recipient.id}/send",
        {"text": text},
        d.sender.headers,
    )
    assert status == 200, body


def chat_port(d: Deployment, index: int = 0) -> int:
    return int(d.fleet.url(index).rsplit(":", 1)[1])


def test_the_monolith_s_calls_work_over_connect(deployment: Deployment) -> None:
    d = deployment
    text = f"hello over connect {uuid.uuid4().hex}"
    send_through_the_monolith(d, text)
    status, got, body = http_json(
        "GET", f"{d.base}/dialog/{d.sender.id}/list", headers=d.recipient.headers
    )
    assert status == 200, body
    assert text in [m["text"] for m in body]
    assert got.get("X-Snet-Chat-Instance", "").startswith(d.fleet.service)
    # The instances registered as Connect-native (and pass their checks over TLS).
    entries = d.fleet.consul_entries()
    assert len(entries) == 2
    assert all(e["Service"]["Connect"]["Native"] for e in entries)


def test_a_forged_plaintext_call_gets_no_dialog_data(deployment: Deployment) -> None:
    d = deployment
    secret = f"private {uuid.uuid4().hex}"
    send_through_the_monolith(d, secret)
    forged_text = f"forged {uuid.uuid4().hex}"
    for request in (
        f"GET /v1/dialogs/{d.recipient.id}/messages HTTP/1.1\r\nHost: chat\r\n"
        f"X-Snet-User-Id: {d.sender.id}\r\n\r\n",
        f"POST /v1/dialogs/{d.recipient.id}/messages HTTP/1.1\r\nHost: chat\r\n"
        f"X-Snet-User-Id: {d.sender.id}\r\nIdempotency-Key: forged\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(forged_text) + 12}\r\n\r\n"
        f'{{"text": "{forged_text}"}}',
    ):
        answer = b""
        with socket.create_connection(("127.0.0.1", chat_port(d)), timeout=5) as connection:
            connection.sendall(request.encode())
            try:
                while chunk := connection.recv(65536):
                    answer += chunk
            except (ConnectionResetError, TimeoutError):
                pass
        assert secret.encode() not in answer
        assert not answer.startswith(b"HTTP/"), answer  # plaintext gets no HTTP at all
    assert query(
        d.chat_mysql_url, "SELECT COUNT(*) FROM chat_messages WHERE text = %s", forged_text
    ) == [(0,)]


def test_a_tls_call_without_a_client_certificate_gets_401_but_health_answers(
    deployment: Deployment,
) -> None:
    d = deployment
    url = d.fleet.url(0)
    status, got, body = http_json(
        "GET", f"{url}/v1/dialogs/{d.recipient.id}/messages", headers={"X-Snet-User-Id": "1"}
    )
    assert status == 401, body
    assert body["code"] == 40101
    assert "WWW-Authenticate" not in got
    assert "messages" not in body
    assert http_get(f"{url}/health")[0] == 200
    assert http_get(f"{url}/metrics")[0] == 404, "metrics are on the admin listener only"
    status, metrics = http_get(f"{d.fleet.admin_url(0)}/metrics")
    assert status == 200
    assert b"snet_chat_send_batches_total" in metrics  # the store's batches (MessageStore)


def test_a_valid_certificate_of_another_service_gets_403(deployment: Deployment) -> None:
    d = deployment
    intruder = connect_client_tls(d.agent.url, "intruder")
    status, _, body = http_json(
        "GET",
        f"{d.fleet.url(1)}/v1/dialogs/{d.recipient.id}/messages",
        headers={"X-Snet-User-Id": d.sender.id},
        tls=intruder,
    )
    assert status == 403, body
    assert body["code"] == 40300
    assert "svc/intruder" in body["message"]
    assert "messages" not in body
    # The one caller the intentions allow is served.
    status, _, body = http_json(
        "GET",
        f"{d.fleet.url(1)}/v1/dialogs/{d.recipient.id}/messages",
        headers={"X-Snet-User-Id": d.sender.id},
        tls=d.fleet.caller_tls,
    )
    assert status == 200, body


def test_a_rogue_instance_under_the_chat_name_gets_no_request_and_clients_see_no_failure(
    deployment: Deployment,
) -> None:
    """A real chat process with a valid certificate of another service (``intruder``),
    registered in Consul under the chat service's name and passing its check."""
    d = deployment
    port, admin = free_port(), free_port()
    rogue = TwistdProcess(
        "snet-chat",
        [
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--admin-listen", f"tcp:{admin}:interface=127.0.0.1",
            "--consul", d.agent.url,
            "--service-name", "intruder",
            "--mysql", d.chat_mysql_url,
            "--redis", d.redis_url,
        ],
        health_url=f"https://127.0.0.1:{port}/health",
        admin_url=f"http://127.0.0.1:{admin}",
        name="rogue",
    )  # fmt: skip
    rogue_id = f"{d.fleet.service}-rogue"
    with d.traffic() as traffic, rogue:
        traffic.wait_for(30)
        status, answer = d.agent.api(
            "PUT",
            "/v1/agent/service/register",
            {
                "Name": d.fleet.service,
                "ID": rogue_id,
                "Address": "127.0.0.1",
                "Port": port,
                "Check": {
                    "HTTP": f"https://127.0.0.1:{port}/health",
                    "Interval": "500ms",
                    "TLSSkipVerify": True,
                },
            },
        )
        assert status == 200, answer
        try:
            wait_until(lambda: rogue_id in d.fleet.passing_ids(), 15, "the rogue passing")

            def identity_failures() -> float:
                value = metric_value(
                    d.admin,
                    "snet_chat_request_failures_total",
                    instance=rogue_id,
                    reason="identity",
                )
                return value or 0.0

            wait_until(lambda: identity_failures() >= 1, 15, "the monolith to try the rogue")
            since = time.monotonic()
            traffic.wait_for(60, since=since)
        finally:
            d.agent.api("PUT", f"/v1/agent/service/deregister/{rogue_id}")
        assert rogue.admin_url is not None
        assert api_requests(rogue.admin_url) == 0
    assert traffic.failures() == []
    ejections = metric_value(d.admin, "snet_chat_ejections_total", instance=rogue_id)
    assert ejections is not None and ejections >= 1
    log = d.server.log_path.read_text(errors="replace")
    assert "svc/intruder" in log and rogue_id in log
    assert compare_with_mysql(d.chat_mysql_url, d.sender.id, traffic.acknowledged_texts()) == (
        [],
        [],
    )


def _leaf_serial(agent: ConsulAgent, service: str) -> str:
    status, answer = agent.api("GET", f"/v1/agent/connect/ca/leaf/{service}")
    assert status == 200 and isinstance(answer, dict), answer
    return str(answer["SerialNumber"])


def test_a_ca_rotation_under_steady_traffic_fails_no_call(deployment: Deployment) -> None:
    """Last in the module: the agent's CA changes for good."""
    d = deployment
    services = (d.fleet.service, "snet-server")
    before = {s: _leaf_serial(d.agent, s) for s in services}
    processes = [*d.fleet.instances, d.server]
    with d.traffic() as traffic:
        traffic.wait_for(30)
        status, answer = d.agent.api(
            "PUT",
            "/v1/connect/ca/configuration",
            {"Provider": "consul", "Config": {"PrivateKey": new_ca_private_key()}},
        )
        assert status == 200, answer
        rotated = time.monotonic()
        # Consul 1.8 spreads the re-issue of leaves after a rotation over 30 s.
        wait_until(
            lambda: all(_leaf_serial(d.agent, s) != before[s] for s in services),
            60,
            "leaves from the new root",
            interval=0.5,
        )
        after = {s: _leaf_serial(d.agent, s) for s in services}

        def all_renewed() -> bool:
            return all(
                after[d.fleet.service if p is not d.server else "snet-server"]
                in p.log_path.read_text(errors="replace")
                for p in processes
            )

        wait_until(all_renewed, 15, "every process to use its new leaf", interval=0.2)
        traffic.wait_for(60, since=time.monotonic())
    print(
        f"\nCA rotation through the monolith: {traffic.count(since=rotated)} calls after the"
        f" rotation, {len(traffic.failures())} failed"
    )
    assert traffic.failures() == [], json.dumps([o.error for o in traffic.failures()][:5])
    assert compare_with_mysql(d.chat_mysql_url, d.sender.id, traffic.acknowledged_texts()) == (
        [],
        [],
    )
