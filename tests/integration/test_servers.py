"""The real-server harness itself: Consul, MariaDB and Redis start, answer, stop and come back.

These tests start private servers of their own (not the session fixtures), because they stop,
kill, pause and restart them.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator

import pymysql
import pytest

from snet.config import MySQLConfig
from snet.testing.servers import (
    ConsulAgent,
    MariaDB,
    MissingBinary,
    Redis,
    ServerStartError,
    find_binary,
    free_ports,
)

pytestmark = pytest.mark.integration

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _consul(agent: ConsulAgent, method: str, path: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{agent.url}{path}", data=data, method=method)
    with _no_proxy.open(request, timeout=5) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


def _mysql_connect(url: str) -> pymysql.Connection:
    config = MySQLConfig.from_url(url)
    return pymysql.connect(
        host=config.host,
        port=config.port,
        user=config.user,
        password=config.password,
        database=config.database,
        autocommit=True,
        connect_timeout=5,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulAgent]:
    with ConsulAgent() as agent:
        yield agent


@pytest.fixture(scope="module")
def mariadb() -> Iterator[MariaDB]:
    with MariaDB() as server:
        yield server


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    with Redis() as server:
        yield server


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5, udp=True)
    assert len(set(ports)) == 5
    assert all(1024 <= port < 65536 for port in ports)


def test_missing_binary_says_how_to_install_it() -> None:
    with pytest.raises(MissingBinary) as raised:
        find_binary("snet-no-such-server", "apt-get install snet-no-such-server")
    assert raised.value.binary == "snet-no-such-server"
    assert "apt-get install snet-no-such-server" in str(raised.value)
    assert "/usr/sbin" in str(raised.value)


def test_consul_agent_answers_with_a_leader(consul: ConsulAgent) -> None:
    assert consul.url == f"http://127.0.0.1:{consul.http_port}"
    assert consul.leader()
    assert len({consul.http_port, consul.dns_port, consul.serf_lan_port}) == 3
    assert _consul(consul, "GET", "/v1/agent/self") is not None


def test_consul_restart_keeps_its_port_and_forgets_registrations(consul: ConsulAgent) -> None:
    port, old_pid = consul.http_port, consul.pid
    _consul(consul, "PUT", "/v1/agent/service/register", {"Name": "harness", "Port": 1})
    assert "harness" in _consul(consul, "GET", "/v1/agent/services")  # type: ignore[operator]

    consul.restart()

    assert consul.http_port == port
    assert consul.pid != old_pid
    assert old_pid is not None and not _alive(old_pid)
    assert consul.leader()
    assert "harness" not in _consul(consul, "GET", "/v1/agent/services")  # type: ignore[operator]


def test_a_dev_consul_restart_is_a_new_cluster_with_a_new_trust_domain(
    consul: ConsulAgent,
) -> None:
    before = consul.trust_domain()
    assert before is not None and before.endswith(".consul")
    consul.kill()
    consul.start()
    assert consul.trust_domain() not in (None, before)


def test_a_persistent_consul_keeps_its_ca_intentions_and_registrations_over_a_kill() -> None:
    """kill + start of a persistent agent (what a real agent restart is): the same trust
    domain and CA root, the intentions, and the registrations reloaded from its data dir."""
    with ConsulAgent(persistent=True) as agent:
        assert agent.data_dir is not None and agent.data_dir.is_dir()
        domain = agent.trust_domain()
        roots = _consul(agent, "GET", "/v1/agent/connect/ca/roots")
        assert isinstance(roots, dict)
        _consul(
            agent,
            "POST",
            "/v1/connect/intentions",
            {"SourceName": "*", "DestinationName": "harness", "Action": "deny"},
        )
        _consul(agent, "PUT", "/v1/agent/service/register", {"Name": "harness", "Port": 1})
        port, old_pid = agent.http_port, agent.pid

        agent.kill()
        assert agent.leader() is None
        agent.start()

        assert (agent.http_port, agent.trust_domain()) == (port, domain)
        assert agent.pid != old_pid
        again = _consul(agent, "GET", "/v1/agent/connect/ca/roots")
        assert isinstance(again, dict)
        assert again["ActiveRootID"] == roots["ActiveRootID"]
        intentions = _consul(agent, "GET", "/v1/connect/intentions")
        assert isinstance(intentions, list)
        assert [(i["SourceName"], i["DestinationName"], i["Action"]) for i in intentions] == [
            ("*", "harness", "deny")
        ]
        assert "harness" in _consul(agent, "GET", "/v1/agent/services")  # type: ignore[operator]
    assert not agent.directory.exists()


def test_consul_comes_back_after_a_kill(consul: ConsulAgent) -> None:
    port = consul.http_port
    consul.kill()
    assert not consul.running
    assert consul.leader() is None
    consul.start()
    assert consul.http_port == port
    assert consul.leader()


def test_mariadb_database_url_works_for_its_own_user_only(mariadb: MariaDB) -> None:
    first = mariadb.create_database("harness_one")
    second = mariadb.create_database("harness_two")
    config = MySQLConfig.from_url(first)
    assert (config.host, config.port, config.database) == ("127.0.0.1", mariadb.port, "harness_one")

    connection = _mysql_connect(first)
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE t (id INT PRIMARY KEY, body TEXT)")
            cursor.execute("INSERT INTO t VALUES (1, %s)", ("héllo 👋",))
            cursor.execute("SELECT body FROM t")
            assert cursor.fetchone() == ("héllo 👋",)
            with pytest.raises(pymysql.err.OperationalError):
                cursor.execute("SELECT 1 FROM harness_two.t")
    finally:
        connection.close()
    assert MySQLConfig.from_url(second).password != config.password


def test_mariadb_create_database_starts_afresh(mariadb: MariaDB) -> None:
    url = mariadb.create_database("harness_fresh")
    connection = _mysql_connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE leftover (id INT)")
    finally:
        connection.close()

    connection = _mysql_connect(mariadb.create_database("harness_fresh"))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW TABLES")
            assert cursor.fetchall() == ()
    finally:
        connection.close()


def test_mariadb_create_database_refuses_names_that_need_quoting(mariadb: MariaDB) -> None:
    with pytest.raises(ValueError, match="database name"):
        mariadb.create_database("x`; DROP DATABASE mysql; --")


def test_mariadb_keeps_data_and_port_across_stop_start_and_kill(mariadb: MariaDB) -> None:
    url = mariadb.create_database("harness_durable")
    port = mariadb.port
    connection = _mysql_connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE kept (id INT PRIMARY KEY)")
            cursor.execute("INSERT INTO kept VALUES (1)")
    finally:
        connection.close()

    mariadb.stop()
    assert not mariadb.running
    with pytest.raises(pymysql.err.OperationalError):
        _mysql_connect(url)
    mariadb.start()
    connection = _mysql_connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO kept VALUES (2)")
    finally:
        connection.close()

    mariadb.kill()
    mariadb.start()
    assert mariadb.port == port
    connection = _mysql_connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT id FROM kept ORDER BY id")
            assert cursor.fetchall() == ((1,), (2,))
    finally:
        connection.close()


def test_a_paused_mariadb_answers_nothing_until_resumed(mariadb: MariaDB) -> None:
    mariadb.pause()
    try:
        with pytest.raises(pymysql.err.OperationalError):
            mariadb.connect(connect_timeout=0.3, read_timeout=0.3)
    finally:
        mariadb.resume()
    mariadb.connect(connect_timeout=5).close()


def test_redis_answers_ping_and_starts_empty_again(redis: Redis) -> None:
    assert redis.url == f"redis://127.0.0.1:{redis.port}/0"
    assert redis.command("PING") == b"+PONG"
    assert redis.command("SET", "k", "v") == b"+OK"
    assert redis.command("EXISTS", "k") == b":1"
    redis.stop()
    assert not redis.running
    redis.start()
    assert redis.command("EXISTS", "k") == b":0"
    redis.command("SET", "k", "v")
    redis.flushall()
    assert redis.command("EXISTS", "k") == b":0"


def test_closing_a_server_ends_its_process_and_removes_its_directory() -> None:
    with Redis() as server:
        pid, directory = server.pid, server.directory
        assert pid is not None and _alive(pid)
        assert server.log_path.parent == directory
    assert not _alive(pid)
    assert not directory.exists()


class _BrokenRedis(Redis):
    def _command(self) -> list[str]:
        return [*super()._command(), "--no-such-option", "1"]


def test_a_server_that_exits_while_starting_reports_its_log() -> None:
    server = _BrokenRedis()
    try:
        with pytest.raises(ServerStartError) as raised:
            server.start()
        assert "redis exited with status" in str(raised.value)
        assert "no-such-option" in str(raised.value)
        assert not server.running
    finally:
        server.close()


def test_a_with_block_whose_server_cannot_start_leaves_nothing_behind() -> None:
    server = _BrokenRedis()
    with pytest.raises(ServerStartError), server:
        pytest.fail("the with block must not run")
    assert not server.running
    assert not server.directory.exists()


def test_dropping_a_database_removes_it_and_its_user(mariadb: MariaDB) -> None:
    url = mariadb.create_database("harness_dropped")
    mariadb.drop_database("harness_dropped")
    with pytest.raises(pymysql.err.OperationalError):
        _mysql_connect(url)
