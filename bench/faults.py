"""Faults under load, side by side: the monolith's own Consul-aware balancer against HAProxy.

Starts its own Consul dev agent (and, for the ``consul`` scenario, a persistent one-node
Consul server), MariaDB and Redis on free 127.0.0.1 ports. Then, for every
scenario and for both set-ups, a fresh fleet of three ``twistd snet-chat`` instances and one
``twistd snet-server``:

- ``snet``: the monolith discovers the instances itself (blocking queries on Consul's health
  API, round-robin, passive health, retries with the same idempotency key);
- ``haproxy``: the monolith sends every dialog call to one HAProxy address
  (``--chat-url``), and HAProxy (Debian's package, run as a child process) discovers the
  same instances from Consul's DNS interface (``bench/haproxy-consul.cfg``: resolvers,
  ``server-template`` on the SRV record, health checks, ``retries 3``, ``option
  redispatch``), as HashiCorp's HAProxy tutorial sets it up.

K keep-alive clients (``snet.testing.traffic``) make sends (unique texts) and lists through
the monolith's public API while one fault happens:

- ``sigterm``: one instance stops cleanly (deregister, drain, exit);
- ``sigkill``: one instance dies mid-request;
- ``sigstop``: one instance freezes (accepts connections, answers nothing), then SIGCONT;
- ``consul``: the Consul agent is killed, stays down, and starts again with its data
  directory, as a real agent restarts: the same cluster, CA, intentions and registrations;
- ``consul-dev``: the same with a dev agent, which forgets everything: a new cluster with a
  new Connect CA and trust domain, no intentions, no registrations (the instances register
  again by themselves, and every process must move to certificates of the new CA);
- ``new``: a fourth instance starts.

For each it prints failed calls, messages duplicated or lost (what the clients were told
against what MySQL holds), the time from the fault until no more failures, the time until an
instance is used (the new one after passing its check; the frozen one after SIGCONT), how
evenly the steady instances were loaded, and throughput; then a markdown table of all. Figures
only: nothing here passes or fails on a time.

    python bench/faults.py                      # everything, about 6-9 minutes
    python bench/faults.py --scenarios sigkill,new --modes snet --after 5

HAProxy must be installed (``apt-get install haproxy``, 2.6 on Debian 12).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import platform
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from snet.testing.fleet import ChatFleet, monolith
from snet.testing.processes import TwistdProcess, http_get
from snet.testing.servers import ConsulAgent, MariaDB, Redis, free_ports
from snet.testing.traffic import (
    DialogTraffic,
    admin_urls,
    compare_with_mysql,
    measure_pickup,
    metric_value,
    read_served,
    register_user,
    served_requests,
    spread,
    stored_texts,
)
from snet.testing.waiting import timed, wait_until

SCENARIOS = ("sigterm", "sigkill", "sigstop", "consul", "consul-dev", "new")
CONSUL_RESTARTS = {"consul": True, "consul-dev": False}
"""The scenarios that kill and restart Consul, and whether their agent keeps its state."""
MODES = ("snet", "haproxy")
CONFIG = Path(__file__).resolve().parent / "haproxy-consul.cfg"
HAPROXY_MONOLITH_ARGS = ("--chat-timeout", "6")
"""Behind HAProxy the monolith waits longer than HAProxy's own ``timeout server 5s``, so that
HAProxy, not the monolith, decides when a server is too slow."""


class HAProxy:
    """``haproxy -f CONFIG -db`` as a child process, discovering *service* from Consul DNS."""

    def __init__(self, binary: str, *, dns_port: int, service: str) -> None:
        self.port, self.stats_port = free_ports(2)
        self.directory = Path(tempfile.mkdtemp(prefix="snet-haproxy-"))
        self.config = self.directory / "haproxy.cfg"
        self.config.write_text(
            string.Template(CONFIG.read_text()).substitute(
                port=self.port, stats_port=self.stats_port, dns_port=dns_port, service=service
            )
        )
        self.log_path = self.directory / "haproxy.log"
        check = subprocess.run(  # noqa: S603 (our own config, the found binary)
            [binary, "-c", "-f", str(self.config)], capture_output=True, text=True, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c: {check.stdout}{check.stderr}")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603
                [binary, "-f", str(self.config), "-db"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def servers_up(self) -> int:
        """Servers of the ``chat`` backend that HAProxy has UP, from its stats CSV."""
        try:
            status, body = http_get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=1)
        except OSError:
            return 0
        if status != 200:
            return 0
        rows = csv.DictReader(io.StringIO(body.decode().lstrip("# ")))
        return sum(
            1
            for row in rows
            if row["pxname"] == "chat"
            and row["svname"] not in ("FRONTEND", "BACKEND")
            and row["status"].startswith("UP")
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Result:
    scenario: str
    mode: str
    calls: int = 0
    failed: int = 0
    statuses: str = ""
    duplicated: int = 0
    lost: int = 0
    failed_stored: int = 0
    """Sends the client was told failed that MySQL holds all the same (a client that retries
    them without the same idempotency key stores them twice)."""
    recovered: float = 0.0
    in_use: float | None = None
    slowest: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    steady: list[str] = field(default_factory=list)
    throughput: float = 0.0
    note: str = ""
    in_use_runs: list[float] = field(default_factory=list)
    spread_runs: list[int] = field(default_factory=list)

    @property
    def spread(self) -> int:
        return spread(self.counts, self.steady)

    def row(self) -> str:
        in_use = ", ".join(f"{t:.3f}" for t in self.in_use_runs)
        if not in_use and self.in_use is not None:
            in_use = f"{self.in_use:.3f}"
        spreads = ", ".join(str(n) for n in self.spread_runs) or str(self.spread)
        counts = "/".join(str(self.counts.get(i, 0)) for i in sorted(self.counts))
        return (
            f"| {self.scenario} | {self.mode} | {self.calls} | {self.failed}"
            f"{f' ({self.statuses})' if self.statuses else ''} | {self.failed_stored}"
            f" | {self.duplicated}/{self.lost} | {self.recovered:.2f} | {in_use}"
            f" | {self.slowest:.2f} | {counts} | {spreads}"
            f" | {self.throughput:.0f} |"
        )


HEADER = (
    "| scenario | balancer | calls | failed | failed but stored | duplicated/lost "
    "| recovered after (s) "
    "| back in use (s) | slowest call (s) | sends per instance (last run) | spread | calls/s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Servers:
    consul: ConsulAgent
    mariadb: MariaDB
    redis: Redis
    haproxy_binary: str | None
    later: contextlib.ExitStack
    """Closes what is started on demand (the persistent agent) at the end of the bench."""
    persistent_consul: ConsulAgent | None = None

    def consul_for(self, scenario: str) -> ConsulAgent:
        """The agent a scenario runs on: a persistent one for ``consul``, else the dev one."""
        if not CONSUL_RESTARTS.get(scenario, False):
            return self.consul
        if self.persistent_consul is None:
            self.persistent_consul = self.later.enter_context(ConsulAgent(persistent=True))
        return self.persistent_consul


@contextlib.contextmanager
def deployment(
    servers: Servers, consul: ConsulAgent, mode: str, clients: int, seconds: float
) -> Iterator[tuple[ChatFleet, TwistdProcess, DialogTraffic, str]]:
    """A fresh fleet and monolith (and HAProxy) on *consul*, and traffic ready to start."""
    tag = uuid.uuid4().hex[:8]
    chat_mysql = servers.mariadb.create_database(f"bench_chat_{tag}")
    # HAProxy checks and forwards plain HTTP: that mode runs both ends in plaintext.
    plaintext = mode == "haproxy"
    fleet = ChatFleet(
        consul_url=consul.url,
        mysql_url=chat_mysql,
        redis_url=servers.redis.url,
        plaintext=plaintext,
    )
    haproxy: HAProxy | None = None
    server: TwistdProcess | None = None
    try:
        fleet.wait_all_passing()
        extra: tuple[str, ...] = ()
        if mode == "haproxy":
            assert servers.haproxy_binary is not None
            haproxy = HAProxy(
                servers.haproxy_binary, dns_port=consul.dns_port, service=fleet.service
            )
            wait_until(
                lambda: haproxy is not None and haproxy.servers_up() == 3,
                20,
                "HAProxy",
                interval=0.05,
            )
            extra = ("--chat-url", haproxy.url, *HAPROXY_MONOLITH_ARGS)
        server = monolith(
            consul_url=consul.url,
            mysql_url=servers.mariadb.create_database(f"bench_server_{tag}"),
            redis_url=servers.redis.url.replace("/0", "/1"),
            chat_service=fleet.service,
            extra_args=extra,
            plaintext=plaintext,
        ).start()
        assert server.health_url is not None
        base = server.health_url.removesuffix("/health")
        if mode == "snet":
            wait_until(
                lambda: metric_value(server.admin_url or "", "snet_chat_instances_healthy") == 3,
                10,
                "list",
                interval=0.05,
            )
        traffic = DialogTraffic(
            base,
            sender=register_user(base, "Sender"),
            recipient=register_user(base, "Recipient"),
            lister=register_user(base, "Lister"),
            clients=clients,
            max_seconds=seconds,
        )
        yield fleet, server, traffic, chat_mysql
    finally:
        if server is not None:
            server.stop()
        if haproxy is not None:
            haproxy.stop()
        fleet.stop()


def run(servers: Servers, scenario: str, mode: str, args: argparse.Namespace) -> Result:
    result = Result(scenario, mode)
    budget = args.before + args.after + max(args.down, args.freeze) + 30
    consul = servers.consul_for(scenario)
    with deployment(servers, consul, mode, args.clients, budget) as (
        fleet,
        _,
        traffic,
        chat_mysql,
    ):
        urls = admin_urls(fleet)
        original = sorted(urls)
        victim = original[0]
        result.steady = original[1:] if scenario in ("sigterm", "sigkill", "sigstop") else original
        traffic.start()
        try:
            time.sleep(args.before)
            at_fault = read_served(urls)
            at_fault_requests = served_requests(urls[victim]) or 0
            fault = time.monotonic()
            say(f"  {scenario} ({mode}) ...")
            if scenario in ("sigterm", "sigkill"):
                fleet.instances[0].signal(
                    signal.SIGTERM if scenario == "sigterm" else signal.SIGKILL
                )
                fleet.instances[0].wait(20)
                time.sleep(args.after)
            elif scenario == "sigstop":
                fleet.instances[0].signal(signal.SIGSTOP)
                try:
                    time.sleep(args.freeze)
                finally:
                    fleet.instances[0].signal(signal.SIGCONT)
                resumed = time.monotonic()
                # Up to one call per client may have been stuck in the frozen process and is
                # answered as soon as it goes on: only a count above those shows a call routed
                # to it after SIGCONT.
                stuck = at_fault_requests + args.clients
                try:
                    back = wait_until(
                        timed(lambda: (served_requests(urls[victim], timeout=1) or 0) > stuck),
                        args.after + 20,
                        "the frozen instance to serve again",
                        interval=0.005,
                    )
                    result.in_use = back - resumed
                except TimeoutError:
                    result.note = "never served again"
                time.sleep(max(0.0, resumed + args.after - time.monotonic()))
            elif scenario in CONSUL_RESTARTS:
                consul.kill()
                time.sleep(args.down)
                consul.start()
                time.sleep(args.after)
            elif scenario == "new":
                pickup = measure_pickup(fleet, timeout=30)
                result.in_use = pickup.seconds_to_first_request
                urls = admin_urls(fleet)
                time.sleep(max(0.0, fault + args.after - time.monotonic()))
        finally:
            traffic.stop()
        end = read_served(urls)
        result.counts = {i: end.get(i, at_fault.get(i, 0)) for i in urls}
        failures = traffic.failures()
        result.calls = traffic.count()
        result.failed = len(failures)
        statuses: dict[int, int] = {}
        for outcome in failures:
            statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
        result.statuses = ", ".join(f"{n}x{s}" for s, n in sorted(statuses.items()))
        result.recovered = traffic.time_to_recover(fault)
        result.slowest = traffic.slowest()
        result.throughput = traffic.throughput()
        duplicated, lost = compare_with_mysql(
            chat_mysql, traffic.sender.id, traffic.acknowledged_texts()
        )
        result.duplicated, result.lost = len(duplicated), len(lost)
        stored = stored_texts(chat_mysql, traffic.sender.id)
        result.failed_stored = sum(
            1 for o in failures if o.kind == "send" and o.text and o.text in stored
        )
    return result


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    haproxy = "not installed"
    if found := shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin"):
        version = subprocess.run([found, "-v"], capture_output=True, text=True, check=False)  # noqa: S603
        haproxy = version.stdout.splitlines()[0] if version.stdout else "?"
    return (
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"{_cpus()} CPUs ({cpu}); {haproxy}"
    )


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--clients", type=int, default=8, help="concurrent keep-alive clients")
    parser.add_argument("--before", type=float, default=3.0, help="seconds of load before")
    parser.add_argument("--after", type=float, default=8.0, help="seconds of load after")
    parser.add_argument("--down", type=float, default=4.0, help="seconds Consul is down")
    parser.add_argument(
        "--freeze",
        type=float,
        default=8.0,
        help="seconds an instance is stopped (longer than HAProxy's 5 s server timeout)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="runs of each scenario and mode")
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(scenarios) - set(SCENARIOS) | set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin")
    if "haproxy" in modes and binary is None:
        print(
            "haproxy is not installed: apt-get install -y haproxy (Debian 12 has 2.6),"
            " or run with --modes snet",
            file=sys.stderr,
        )
        return 2

    results: list[Result] = []
    started = time.monotonic()
    with (
        ConsulAgent() as consul,
        MariaDB() as mariadb,
        Redis() as redis,
        contextlib.ExitStack() as later,
    ):
        servers = Servers(consul, mariadb, redis, binary, later)
        for scenario in scenarios:
            for mode in modes:
                runs = []
                for _ in range(args.repeat):
                    runs.append(run(servers, scenario, mode, args))
                    print(format_result(runs[-1]), flush=True)
                results.append(merge(runs))
    print()
    print(
        f"{args.clients} clients, {args.before:g}s of load before each fault and"
        f" {args.after:g}s after; Consul down {args.down:g}s, instance frozen"
        f" {args.freeze:g}s; 3 chat instances; {args.repeat} runs of each, summed (times:"
        f" the worst run; back in use and spread: each run);"
        f" {time.monotonic() - started:.0f}s in all"
    )
    print(machine())
    print()
    print(HEADER)
    for result in results:
        print(result.row())
    return 0


def merge(runs: list[Result]) -> Result:
    """Runs of one scenario and mode as one row: counts summed, times at their worst, the
    instance counts of the last run."""
    last = runs[-1]
    merged = Result(last.scenario, last.mode, counts=last.counts, steady=last.steady)
    merged.calls = sum(r.calls for r in runs)
    merged.failed = sum(r.failed for r in runs)
    statuses = [r.statuses for r in runs if r.statuses]
    merged.statuses = "; ".join(statuses)
    merged.duplicated = sum(r.duplicated for r in runs)
    merged.lost = sum(r.lost for r in runs)
    merged.failed_stored = sum(r.failed_stored for r in runs)
    merged.recovered = max(r.recovered for r in runs)
    merged.slowest = max(r.slowest for r in runs)
    merged.throughput = sum(r.throughput for r in runs) / len(runs)
    merged.in_use_runs = [r.in_use for r in runs if r.in_use is not None]
    merged.spread_runs = [r.spread for r in runs]
    merged.note = "; ".join(r.note for r in runs if r.note)
    return merged


def format_result(result: Result) -> str:
    lines = [
        f"{result.scenario} / {result.mode}: {result.calls} calls, {result.failed} failed"
        f"{f' ({result.statuses})' if result.statuses else ''}, "
        f"{result.duplicated} duplicated, {result.lost} lost,"
        f" {result.failed_stored} failed but stored",
        f"  no more failures {result.recovered:.2f}s after the fault; slowest call"
        f" {result.slowest:.2f}s; {result.throughput:.0f} calls/s",
        f"  sends per instance {result.counts} (spread {result.spread} among {result.steady})",
    ]
    if result.in_use is not None:
        lines.append(f"  back in use after {result.in_use:.3f}s")
    if result.note:
        lines.append(f"  {result.note}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
