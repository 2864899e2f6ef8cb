"""Real Consul, MariaDB and Redis servers for tests, each private to the test run.

Every server here is started from its real binary on free ``127.0.0.1`` ports, with its data
and its log file in a temporary directory of its own, and counts as started only once it
really answers (Consul has a leader, MariaDB accepts a login over TCP, Redis answers PING).
The classes are synchronous on purpose: session-scoped pytest fixtures start them before the
reactor matters, and fault tests stop, kill, pause and restart them from blocking code::

    @pytest.fixture(scope="session")
    def consul() -> Iterator[ConsulAgent]:
        with ConsulAgent() as agent:
            yield agent

A server keeps its ports for its whole life, so ``restart()`` (or ``stop()`` then ``start()``)
brings it back where its clients expect it. Nothing outlives the test run: ``close()`` (the
end of a ``with`` block) stops the process by its PID and removes the directory, an ``atexit``
hook does the same for whatever is still open, and on Linux each server is also told to die
with the process that started it (``setpriv --pdeathsig``), for a test run that is itself
killed. Children stay in the test run's process group, so a Ctrl-C reaches them too.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self

import pymysql
from attrs import define, field

from snet.testing.waiting import tail, wait_until

__all__ = [
    "ConsulAgent",
    "MariaDB",
    "MissingBinary",
    "Redis",
    "ServerStartError",
    "find_binary",
    "free_port",
    "free_ports",
]

HOST = "127.0.0.1"
"""The only address the servers listen on."""

EXTRA_BINARY_DIRS = ("/usr/sbin", "/usr/local/bin", "/usr/bin")
"""Searched after PATH: ``mariadbd`` lives in /usr/sbin, which a user's PATH often lacks."""


class MissingBinary(Exception):
    """A server's program is not installed; the message says how to get it."""

    def __init__(self, binary: str, hint: str) -> None:
        super().__init__(
            f"{binary} was not found on PATH nor in {', '.join(EXTRA_BINARY_DIRS)}: {hint}"
        )
        self.binary = binary
        self.hint = hint


class ServerStartError(RuntimeError):
    """A server exited while it was starting, or its setup command failed."""


def find_binary(name: str, hint: str) -> str:
    """The full path of the program *name*, searching PATH and then the usual system folders.

    :raises MissingBinary: if it is nowhere; *hint* tells the reader how to install it.
    """
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in EXTRA_BINARY_DIRS:
        found = shutil.which(name, path=directory)
        if found is not None:
            return found
    raise MissingBinary(name, hint)


def free_ports(count: int, *, udp: bool = False) -> list[int]:
    """*count* distinct ports on 127.0.0.1 that nothing listens on right now.

    The sockets that found them are held until all are found, so the ports differ from each
    other; with *udp* each port is also free for UDP (Consul's DNS and Serf ports use both).
    Another process may still take a port before the server binds it: the servers below pick
    new ports and try again when their first start fails.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(tcp)
            tcp.bind((HOST, 0))
            port: int = tcp.getsockname()[1]
            if udp:
                datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                held.append(datagram)
                try:
                    datagram.bind((HOST, port))
                except OSError:
                    continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def free_port() -> int:
    """One TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def _death_signal_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL`` where it can make a child die with this process.

    The parent-death signal fires when the *thread* that started the child ends, so it is
    used only from the main thread, which lives as long as the test run.
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


_open_servers: set[_Server] = set()
"""Servers not yet closed; ``atexit`` closes them."""


@atexit.register
def _close_open_servers() -> None:
    for server in list(_open_servers):
        # Best effort at exit: one that fails to close must not keep the others running.
        with contextlib.suppress(Exception):
            server.close(timeout=5.0)


@define(eq=False)
class _Server:
    """One server process with its own temporary directory and log file.

    Subclasses say how to run it (``_command``), how to tell that it answers (``_answers``)
    and how to pick new ports should the first start find one taken (``_pick_ports``).
    """

    name: ClassVar[str]
    startup_timeout: float = 30.0
    """Seconds a start may take before it counts as failed."""
    keep_files: bool = False
    own_session: bool = False
    """Start in a session of its own, out of reach of a terminal's Ctrl-C, so that whoever
    started it stops it in order (the local stack); tests leave it in their process group."""
    """Keep the temporary directory (data and log) after ``close()``, for debugging."""
    directory: Path = field(init=False)
    """The server's own temporary directory: data, sockets, log."""
    log_path: Path = field(init=False)
    """Where the server's stdout and stderr go (appended to across restarts)."""
    _process: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _log: IO[bytes] | None = field(init=False, default=None)
    _started_once: bool = field(init=False, default=False)
    _closed: bool = field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self._find_binaries()
        self.directory = Path(tempfile.mkdtemp(prefix=f"snet-{self.name}-"))
        self.log_path = self.directory / f"{self.name}.log"
        self._pick_ports()
        _open_servers.add(self)

    # What subclasses provide.

    def _find_binaries(self) -> None:
        """Resolve the programs this server needs, raising MissingBinary if one is absent."""
        raise NotImplementedError

    def _pick_ports(self) -> None:
        """Choose free ports for this server."""
        raise NotImplementedError

    def _command(self) -> Sequence[str]:
        """The command line that runs the server in the foreground."""
        raise NotImplementedError

    def _answers(self) -> bool:
        """Whether the server answers requests now; False (not an exception) if not yet."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """One-time setup before the first start (such as creating a data directory)."""

    # Life cycle.

    @property
    def pid(self) -> int | None:
        """The server's process ID while it runs, else None."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process exists (it may be paused, or still starting)."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the server, if it is not running, and wait until it answers.

        The first start picks new ports and tries again (three times in all) if the server
        exits at once, as it does when another process took one of its ports meanwhile;
        later starts keep the ports the clients already know.

        :raises ServerStartError: if the server exits while starting.
        :raises TimeoutError: if it does not answer within ``startup_timeout`` seconds.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self.running:
            return self
        if not self._started_once:
            self._prepare()
        attempts = 1 if self._started_once else 3
        for attempt in range(1, attempts + 1):
            try:
                self._launch()
                break
            except ServerStartError:
                if attempt == attempts:
                    raise
                self._pick_ports()
        self._started_once = True
        return self

    def _launch(self) -> None:
        command = [*_death_signal_prefix(), *self._command()]
        self._close_log()
        log = self.log_path.open("ab")
        log.write(f"\n=== snet.testing starts: {' '.join(command)}\n".encode())
        log.flush()
        self._log = log
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            start_new_session=self.own_session,
        )
        try:
            wait_until(
                self._answers_or_fail,
                self.startup_timeout,
                f"{self.name} (pid {self._process.pid}) to answer",
                log_path=self.log_path,
            )
        except TimeoutError:
            self.kill()
            raise

    def _answers_or_fail(self) -> bool:
        process = self._process
        if process is None or process.poll() is not None:
            code = None if process is None else process.returncode
            self._close_log()
            raise ServerStartError(
                f"{self.name} exited with status {code} while starting"
                f"\n--- last lines of {self.log_path} ---\n{self.log_tail()}"
            )
        return self._answers()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it is still there after *timeout* s.

        A paused server is resumed so that it sees the SIGTERM. Stopping a stopped server
        does nothing.
        """
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGCONT)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close_log()

    def kill(self) -> None:
        """Kill the server at once with SIGKILL, as a crash would; it can be started again."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self._close_log()

    def restart(self) -> Self:
        """Stop the server and start it again on the same ports, waiting until it answers."""
        self.stop()
        return self.start()

    def pause(self) -> None:
        """Freeze the server with SIGSTOP: it keeps its connections but answers nothing."""
        if self._process is not None and self.running:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused server go on (SIGCONT)."""
        if self._process is not None and self.running:
            self._process.send_signal(signal.SIGCONT)

    def close(self, timeout: float = 15.0) -> None:
        """Stop the server for good and remove its directory (unless ``keep_files``)."""
        if self._closed:
            return
        try:
            self.stop(timeout)
        finally:
            self._closed = True
            _open_servers.discard(self)
            if not self.keep_files:
                shutil.rmtree(self.directory, ignore_errors=True)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        """The last *lines* lines of the server's log."""
        return tail(self.log_path, lines)

    def __enter__(self) -> Self:
        """Start the server; if it cannot start, close it (its error shows the log's tail)."""
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _http_get(url: str, timeout: float = 1.0) -> bytes | None:
    """The body of a 200 answer from *url*, or None if there is no such answer (yet).

    Proxies from the environment are ignored: these servers are on this machine.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            body: bytes = response.read()
            return body
    except (OSError, urllib.error.URLError):
        return None


CONSUL_HINT = (
    "scripts/install-deps installs consul from Debian 11's consul package "
    "(consul 1.8.7) into /usr/local/bin"
)


@define(eq=False)
class ConsulAgent(_Server):
    """A one-node Consul server with Connect on (its built-in CA), by default a dev agent.

    - **dev** (the default, ``consul agent -dev``): keeps everything in memory and has a
      leader about 0.3 s after it starts. A restart makes a *new cluster*: a new cluster id,
      a new Connect CA and SPIFFE trust domain, no intentions, no registrations.
    - **persistent** (``persistent=True``): ``consul agent -server -bootstrap-expect=1
      -data-dir=...`` with the settings ``-dev`` gives (Connect on, ``raft_multiplier`` 1,
      fast gossip timings, no update check), its state in a data directory of its own. A
      restart, even after ``kill()``, keeps the cluster: the CA and trust domain, the
      intentions, the ACLs, the registrations and checks (the agent reloads them from disk),
      as a real agent restart does. It has a leader about 1.5 s after it starts (raft's 1 s
      heartbeat timeout, which only ``-dev`` can shorten).

    Every port it opens is free and its own, so several agents can run at once; a restart
    keeps them. It counts as started once it has a leader and its Connect CA answers.
    """

    name: ClassVar[str] = "consul"
    persistent: bool = False
    """Run a server with a data directory that survives restarts (see the class docstring)."""
    acl_default_policy: str | None = None
    """With "deny" (or "allow"), ACLs are on with that default policy and
    ``management_token`` is the bootstrap (1.8's "master") token; None leaves ACLs off."""
    management_token: str = field(init=False, factory=lambda: str(uuid.uuid4()), repr=False)
    binary: str = field(init=False)
    http_port: int = field(init=False)
    """The HTTP API port (CONSUL_HTTP_ADDR is ``address``)."""
    dns_port: int = field(init=False)
    serf_lan_port: int = field(init=False)
    serf_wan_port: int = field(init=False)
    server_port: int = field(init=False)

    def _find_binaries(self) -> None:
        self.binary = find_binary("consul", CONSUL_HINT)

    def _pick_ports(self) -> None:
        http, server, dns, serf_lan, serf_wan = free_ports(5, udp=True)
        self.http_port, self.server_port = http, server
        self.dns_port, self.serf_lan_port, self.serf_wan_port = dns, serf_lan, serf_wan

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the HTTP API, as CONSUL_HTTP_ADDR takes it."""
        return f"{HOST}:{self.http_port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the HTTP API."""
        return f"http://{self.address}"

    @property
    def data_dir(self) -> Path | None:
        """Where a persistent agent keeps its state (None for a dev agent)."""
        return self.directory / "data" if self.persistent else None

    def _mode_options(self) -> list[str]:
        if self.data_dir is None:
            return ["-dev"]
        # What -dev's own configuration (Consul 1.8's DevSource) sets, but the in-memory
        # store: one server that elects itself, Connect on, quick raft and gossip timings.
        gossip = 'gossip_interval = "100ms" probe_interval = "100ms" probe_timeout = "100ms"'
        return [
            "-server",
            "-bootstrap-expect=1",
            f"-data-dir={self.data_dir}",
            "-hcl=connect { enabled = true }",
            "-hcl=performance { raft_multiplier = 1 }",
            "-hcl=disable_anonymous_signature = true",
            f"-hcl=gossip_lan {{ {gossip} suspicion_mult = 3 }}",
            f"-hcl=gossip_wan {{ {gossip} suspicion_mult = 3 }}",
        ]

    def _command(self) -> list[str]:
        return [
            self.binary,
            "agent",
            *self._mode_options(),
            f"-node=snet-test-{self.http_port}",
            f"-client={HOST}",
            f"-bind={HOST}",
            f"-http-port={self.http_port}",
            f"-dns-port={self.dns_port}",
            f"-serf-lan-port={self.serf_lan_port}",
            f"-serf-wan-port={self.serf_wan_port}",
            f"-server-port={self.server_port}",
            "-grpc-port=-1",
            "-log-level=info",
            "-hcl=disable_update_check = true",
            *self._acl_options(),
        ]

    def _acl_options(self) -> list[str]:
        if self.acl_default_policy is None:
            return []
        # Consul 1.8 names the bootstrap token "master" (1.11 renamed it initial_management);
        # the agent uses it too, to register its own node under default deny.
        token = self.management_token
        return [
            '-hcl=primary_datacenter = "dc1"',
            f'-hcl=acl {{ enabled = true default_policy = "{self.acl_default_policy}"'
            f" enable_token_persistence = false"
            f' tokens {{ master = "{token}" agent = "{token}" }} }}',
        ]

    def api(
        self, method: str, path: str, body: object = None, token: str | None = None
    ) -> tuple[int, object]:
        """Call the HTTP API (blocking): ``(status, decoded JSON or text)``, errors included.

        *token* goes in ``X-Consul-Token``; for test set-up, pass ``management_token``.
        """
        data = None if body is None else json.dumps(body).encode()
        url = f"{self.url}{path}"  # always http://127.0.0.1:PORT/...
        request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        if token:
            request.add_header("X-Consul-Token", token)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=10) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def create_token(self, name: str, rules: str) -> str:
        """A new ACL token (its SecretID) whose one policy, *name*, has *rules* (HCL)."""
        status, answer = self.api(
            "PUT", "/v1/acl/policy", {"Name": name, "Rules": rules}, self.management_token
        )
        if status != 200:
            raise RuntimeError(f"creating the ACL policy {name} failed: {status} {answer}")
        status, answer = self.api(
            "PUT",
            "/v1/acl/token",
            {"Description": name, "Policies": [{"Name": name}]},
            self.management_token,
        )
        if status != 200 or not isinstance(answer, dict):
            raise RuntimeError(f"creating the ACL token {name} failed: {status} {answer}")
        secret: str = answer["SecretID"]
        return secret

    def _answers(self) -> bool:
        return self.leader() not in (None, "") and self.trust_domain() is not None

    def trust_domain(self) -> str | None:
        """The Connect CA's SPIFFE trust domain (``<cluster id>.consul``), or None if the
        agent does not answer or its CA has no active root yet (a new cluster names its
        trust domain a moment before its first root exists). A dev agent has a new one
        after every restart; a persistent agent keeps its own."""
        body = _http_get(f"{self.url}/v1/agent/connect/ca/roots")
        if body is None:
            return None
        try:
            answer = json.loads(body)
            domain, roots, active = answer["TrustDomain"], answer["Roots"], answer["ActiveRootID"]
        except (ValueError, TypeError, KeyError):
            return None
        if not (roots and active and isinstance(domain, str) and domain):
            return None
        return domain

    def leader(self) -> str | None:
        """The leader's address as the agent reports it ("" before an election), or None if
        the agent does not answer."""
        body = _http_get(f"{self.url}/v1/status/leader")
        if body is None:
            return None
        return body.decode("utf-8", "replace").strip().strip('"')


_IDENTIFIER = re.compile(r"[A-Za-z0-9_]{1,64}")
"""A database (and user) name that needs no quoting beyond backticks."""

MARIADB_HINT = "apt-get install mariadb-server (MariaDB 10.11 or newer)"


@define(eq=False)
class MariaDB(_Server):
    """A MariaDB server with a fresh data directory, logged into as root without a password.

    ``create_database`` gives each test module a database and a user of its own. ``stop()``
    and ``start()`` (or ``kill()`` and ``start()``, as a crash) keep the data and the port.
    """

    name: ClassVar[str] = "mariadb"
    server_binary: str = field(init=False)
    install_binary: str = field(init=False)
    port: int = field(init=False)
    """The TCP port on 127.0.0.1."""

    def _find_binaries(self) -> None:
        self.server_binary = find_binary("mariadbd", MARIADB_HINT)
        self.install_binary = find_binary("mariadb-install-db", MARIADB_HINT)

    def _pick_ports(self) -> None:
        self.port = free_port()

    @property
    def datadir(self) -> Path:
        """Where the databases live."""
        return self.directory / "data"

    @property
    def socket_path(self) -> Path:
        """The server's Unix socket."""
        return self.directory / "mariadb.sock"

    def _prepare(self) -> None:
        command = [
            self.install_binary,
            "--no-defaults",
            f"--datadir={self.datadir}",
            "--user=root",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ]
        with self.log_path.open("ab") as log:
            log.write(f"=== snet.testing runs: {' '.join(command)}\n".encode())
            log.flush()
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                timeout=120,
                check=False,
            )
        if result.returncode != 0:
            raise ServerStartError(
                f"mariadb-install-db failed with status {result.returncode}"
                f"\n--- last lines of {self.log_path} ---\n{self.log_tail()}"
            )

    def _command(self) -> list[str]:
        return [
            self.server_binary,
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.directory / 'mariadb.pid'}",
            f"--tmpdir={self.directory}",
            f"--port={self.port}",
            f"--bind-address={HOST}",
            "--user=root",
            "--skip-log-bin",
            "--skip-name-resolve",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_unicode_ci",
            "--max-connections=500",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=16M",
            "--innodb-log-buffer-size=4M",
            # Commits reach the OS at once but are synced only once a second: a killed
            # server loses nothing, only a machine crash could.
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-doublewrite=0",
            "--key-buffer-size=8M",
            "--performance-schema=OFF",
        ]

    def _answers(self) -> bool:
        try:
            self.connect(connect_timeout=1, read_timeout=2).close()
        except pymysql.err.MySQLError:
            return False
        return True

    def connect(
        self,
        database: str | None = None,
        *,
        connect_timeout: float = 10,
        read_timeout: float | None = 30,
    ) -> pymysql.Connection:
        """A new pymysql connection as root over TCP (autocommit on); the caller closes it.

        *read_timeout* bounds every wait for the server, the login's included: pymysql's
        *connect_timeout* covers only the TCP connect, which a paused server still accepts.
        """
        return pymysql.connect(
            host=HOST,
            port=self.port,
            user="root",
            password="",
            database=database,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            write_timeout=read_timeout,
            autocommit=True,
            charset="utf8mb4",
        )

    def create_database(self, name: str) -> str:
        """Create the database *name* afresh and a user allowed in from 127.0.0.1.

        A database or user of that name from before is dropped first. The user has a random
        password and every privilege on that database only.

        :param name: letters, digits and ``_``, at most 64 characters; also the user name.
        :returns: ``mysql://USER:PASSWORD@127.0.0.1:PORT/NAME``.
        """
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"database name {name!r}: use 1 to 64 letters, digits and _")
        password = secrets.token_hex(16)
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
                cursor.execute(f"DROP USER IF EXISTS '{name}'@'{HOST}'")
                cursor.execute(
                    f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                )
                cursor.execute(f"CREATE USER '{name}'@'{HOST}' IDENTIFIED BY %s", (password,))
                cursor.execute(f"GRANT ALL PRIVILEGES ON `{name}`.* TO '{name}'@'{HOST}'")
        finally:
            connection.close()
        return f"mysql://{name}:{password}@{HOST}:{self.port}/{name}"

    def drop_database(self, name: str) -> None:
        """Drop the database and the user that ``create_database(name)`` made, if they exist."""
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"database name {name!r}: use 1 to 64 letters, digits and _")
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
                cursor.execute(f"DROP USER IF EXISTS '{name}'@'{HOST}'")
        finally:
            connection.close()


REDIS_HINT = "apt-get install redis-server (Redis 7)"


@define(eq=False)
class Redis(_Server):
    """A Redis server that keeps nothing on disk: a stop or a kill loses every key."""

    name: ClassVar[str] = "redis"
    binary: str = field(init=False)
    port: int = field(init=False)
    """The TCP port on 127.0.0.1."""

    def _find_binaries(self) -> None:
        self.binary = find_binary("redis-server", REDIS_HINT)

    def _pick_ports(self) -> None:
        self.port = free_port()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{HOST}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
        ]

    def _answers(self) -> bool:
        try:
            return self.command("PING") == b"+PONG"
        except OSError:
            return False

    def command(self, *words: str, timeout: float = 1.0) -> bytes:
        """Send one command and return the first line of the raw reply, without its CRLF.

        Enough for PING and FLUSHALL; tests that need real replies use a Redis client.
        """
        request = f"*{len(words)}\r\n".encode()
        for word in words:
            data = word.encode()
            request += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection((HOST, self.port), timeout=timeout) as sock:
            sock.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[0]

    def flushall(self) -> None:
        """Remove every key from every database."""
        reply = self.command("FLUSHALL")
        if reply != b"+OK":
            raise RuntimeError(f"FLUSHALL answered {reply!r}")
