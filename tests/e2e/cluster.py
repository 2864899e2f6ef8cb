"""End-to-end test of compose.cluster.yml: snet across "hosts" (container network namespaces)
with three Consul servers and a client agent per host, under faults, with traffic through the
monolith the whole time. Standard library only; uses tests/e2e/traffic.py.

    python3 tests/e2e/cluster.py [--keep]

It needs a running Docker engine and the images tests/e2e/compose.sh builds (it runs from
there, or alone after it). It brings the cluster up as its own compose project, starts a
steady stream of dialog sends (several concurrent senders), and while it flows:

  1. kills the Consul leader (SIGKILL), measures the time to a new leader, starts it again;
  2. loses a Consul server for good (container and data volume gone), force-leaves it and
     brings up a fresh one in its place: three voters again;
  3. stops a whole chat host at once (its agent and its instance, SIGKILL): the instance
     leaves the list;
  4. cuts a chat host off the network (docker network disconnect) and reconnects it;
  5. adds a new chat host: the time from its check passing to its first call is measured;
  6. rolls the chat service to a new image, one host at a time, each instance draining
     before it stops;
  7. saves a Consul snapshot and restores it (docs/deploying.md's backup commands).

Each step prints its figures (times, calls during it, failed calls); at the end every
acknowledged send must be stored exactly once (the dialogs as MySQL holds them, read through
the monolith). Exits non-zero if a call failed or a check did not hold. The last line says
``cluster: N passed, N failed``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import traffic  # noqa: E402

PROJECT = os.environ.get("SNET_CLUSTER_PROJECT", "snet-cluster-e2e")
FILE = str(ROOT / "compose.cluster.yml")
SUBNET = os.environ.get("SNET_CLUSTER_SUBNET", "")
NEW_IMAGE = "snet-chat:e2e-v2"


def say(message: str) -> None:
    print(f"cluster: {message}", flush=True)


def run(*command: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    if check and done.returncode != 0:
        raise traffic.CheckFailed(
            f"{' '.join(command)} exited {done.returncode}: {(done.stderr or done.stdout)[-800:]}"
        )
    return done.stdout


def compose(*args: str, env: dict[str, str] | None = None) -> str:
    return run("docker", "compose", "-p", PROJECT, "-f", FILE, *args, env=env)


def container(service: str) -> str:
    return f"{PROJECT}-{service}-1"


def address(name: str) -> str:
    return run(
        "docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name
    ).strip()


def consul_get(path: str) -> Any:
    status, _, body = traffic.call(
        "GET",
        f"{traffic.CONSUL}{path}",
        headers=traffic.consul_headers(os.environ.get("CONSUL_HTTP_TOKEN", "")),
    )
    if status != 200:
        raise OSError(f"Consul {path}: {status} {body}")
    return body


def raft_members() -> list[str]:
    """Node names in the Raft configuration (alive or not)."""
    try:
        servers = consul_get("/v1/operator/raft/configuration")["Servers"]
    except (OSError, KeyError, TypeError):
        return []
    return sorted(s["Node"] for s in servers)


def leader() -> str:
    """The leader's server address (IP:8300), or "" while there is none."""
    try:
        return str(consul_get("/v1/status/leader") or "")
    except OSError:
        return ""


def voters() -> list[str]:
    """Node names of the Raft voters that autopilot finds healthy (alive, in contact with
    the leader, its log caught up)."""
    try:
        servers = consul_get("/v1/operator/autopilot/health")["Servers"]
    except (OSError, KeyError, TypeError):
        return []
    return sorted(s["Name"] for s in servers if s.get("Voter") and s.get("Healthy"))


def until(what: str, condition: Callable[[], Any], timeout: float = 90.0) -> float:
    """Poll *condition* every 50 ms; the seconds it took. Fails after *timeout*."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise traffic.CheckFailed(f"{what}: not within {timeout:.0f} s")


def until_value(what: str, value: Callable[[], Any], timeout: float = 90.0) -> Any:
    """Poll *value* every 200 ms until it returns something truthy; that. Fails after
    *timeout*."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = value()
        if found:
            return found
        time.sleep(0.2)
    raise traffic.CheckFailed(f"{what}: not within {timeout:.0f} s")


# The stream of sends


@dataclass
class Stream:
    sender: traffic.Sender
    workers: int
    pause: float
    records: list[traffic.Record] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            ok, instance, detail = self.sender.send()
            self.records.append(traffic.Record(started, ok, instance, detail))
            time.sleep(self.pause)

    def start(self) -> None:
        for _ in range(self.workers):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self.threads.append(thread)

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(traffic.TIMEOUT + 5)

    def since(self, began: float) -> list[traffic.Record]:
        return [r for r in list(self.records) if r.started >= began]


@dataclass
class Step:
    name: str
    figures: dict[str, str]
    calls: int
    failed: int


class Cluster:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.steps: list[Step] = []

    def step(self, name: str, action: Callable[[], dict[str, str]]) -> None:
        say(f"== {name}")
        began = time.monotonic()
        figures = action()
        records = self.stream.since(began)
        failed = [r for r in records if not r.ok]
        step = Step(name, figures, len(records), len(failed))
        self.steps.append(step)
        shown = ", ".join(f"{k} {v}" for k, v in figures.items())
        say(f"   {shown}; {len(records)} calls during the step, {len(failed)} failed")
        for r in failed[:5]:
            say(f"   failed: {r.instance or '-'} {r.detail}")

    def run(self, steps: list[tuple[str, Callable[[], dict[str, str]]]]) -> tuple[int, int]:
        """Run each step under the stream; a step passes when it raised nothing and no call
        failed during it. Returns (passed, failed)."""
        passed = failed = 0
        for name, action in steps:
            try:
                self.step(name, action)
                if self.steps[-1].failed:
                    raise traffic.CheckFailed(f"{self.steps[-1].failed} calls failed")
                passed += 1
            except (traffic.CheckFailed, OSError, ValueError) as e:
                say(f"FAILED: {name}: {e}")
                failed += 1
        return passed, failed

    # The steps

    def kill_leader(self) -> dict[str, str]:
        old = leader()
        name = self.server_at(old)
        say(f"   the leader is {name} ({old}): docker kill")
        run("docker", "kill", container(name))
        took = until("a new leader", lambda: leader() not in ("", old))
        say(f"   new leader {self.server_at(leader())} after {took:.2f} s; starting {name} again")
        run("docker", "start", container(name))
        back = until("three voters again", lambda: len(voters()) == 3 and bool(leader()))
        return {
            "new leader after": f"{took:.2f} s",
            "old leader a healthy voter again after": f"{back:.1f} s",
        }

    def replace_server(self) -> dict[str, str]:
        current = leader()
        name = next(s for s in ("consul-3", "consul-2", "consul-1") if self.server_at(current) != s)
        say(f"   {name} lost for good: its container and its data volume removed")
        compose("rm", "--stop", "--force", name)
        run("docker", "volume", "rm", f"{PROJECT}_{name}-data")
        run(
            # The token from this process's environment: not on a command line.
            "docker", "exec", "-e", "CONSUL_HTTP_TOKEN",
            container("host-ops"), "consul", "force-leave", "-prune", name,
        )  # fmt: skip
        until(f"{name} out of Raft", lambda: name not in raft_members(), timeout=30)
        started = time.monotonic()
        compose("up", "-d", "--no-deps", "--wait", name)
        healthy = time.monotonic() - started
        # The new server's own ACL token, as on the first start.
        compose("run", "--rm", "--no-deps", "-T", "consul-acl-init")
        token = time.monotonic() - started
        say(f"   {name} healthy after {healthy:.1f} s, its agent token set after {token:.1f} s")
        until("three voters with the new server", lambda: len(voters()) == 3 and bool(leader()))
        return {
            "fresh server healthy after": f"{healthy:.1f} s",
            "a healthy voter after": f"{time.monotonic() - started:.1f} s",
        }

    def stop_chat_host(self, host: int) -> dict[str, str]:
        addr = address(container(f"host-chat-{host}"))
        before = len(traffic.consul_instances(passing=True))
        say(f"   host-chat-{host} ({addr}): docker kill of its agent and its instance at once")
        started = time.monotonic()
        run("docker", "kill", container(f"chat-{host}"), container(f"host-chat-{host}"))
        traffic.wait_for(before - 1, None, 90)
        gone = time.monotonic() - started
        return {"out of the list after": f"{gone:.2f} s"}

    def cut_chat_host(self, host: int) -> dict[str, str]:
        name = container(f"host-chat-{host}")
        network = f"{PROJECT}_cluster"
        addr = address(name)
        before = len(traffic.consul_instances(passing=True))
        say(f"   host-chat-{host} ({addr}) cut off the network")
        started = time.monotonic()
        run("docker", "network", "disconnect", network, name)
        traffic.wait_for(before - 1, None, 90)
        out = time.monotonic() - started
        time.sleep(2.0)
        say(f"   out of the list after {out:.2f} s; reconnecting it at {addr}")
        started = time.monotonic()
        run("docker", "network", "connect", "--ip", addr, network, name)
        traffic.wait_for(before, None, 120)
        back = time.monotonic() - started
        return {"out after": f"{out:.2f} s", "back in the list after": f"{back:.1f} s"}

    def add_chat_host(self, host: int) -> dict[str, str]:
        before = set(traffic.consul_instances(passing=False))
        compose("--profile", "extra", "up", "-d", "--no-deps", f"host-chat-{host}")
        compose("--profile", "extra", "up", "-d", "--no-deps", f"chat-{host}")
        new: set[str] = set()

        def passing() -> bool:
            nonlocal new
            new = set(traffic.consul_instances(passing=True)) - before
            return bool(new)

        until("the new instance's check to pass", passing)
        passed_at = time.monotonic()
        (instance,) = new
        until(
            "the new instance's first call",
            lambda: any(r.ok and r.instance == instance for r in self.stream.since(passed_at - 1)),
            timeout=30,
        )
        first = min(r.started for r in self.stream.since(passed_at - 1) if r.instance == instance)
        took = max(0.0, first - passed_at)
        if took > 1.0:
            raise traffic.CheckFailed(f"the new instance's first call came {took:.2f} s after")
        return {"first call after passing": f"{took * 1000:.0f} ms"}

    def rolling_update(self, hosts: list[int]) -> dict[str, str]:
        dockerfile = "FROM snet-chat:e2e\\nLABEL snet.release=v2\\n"
        run("sh", "-c", f"printf '{dockerfile}' | docker build -q -t {NEW_IMAGE} -")
        ips = {host: address(container(f"host-chat-{host}")) for host in hosts}

        def at(ip: str, instances: dict[str, str]) -> set[str]:
            return {i for i, where in instances.items() if where.rsplit(":", 1)[0] == ip}

        def whole(passing: dict[str, str]) -> bool:
            """Every host of the update has a passing instance. Seen on 2026-12-06: the host cut
            off and reconnected in step 4 out of the passing list again when this step began,
            which the old check, comparing list sizes, took as a failure. Why is not proven;
            one candidate, fixed the same day: a chat instance that could not ask its agent
            registered itself again when the agent answered, which reset its check to critical
            (snet.chat.registration now registers again only when the agent lost it)."""
            return all(at(ip, passing) for ip in ips.values())

        times = []
        for host in hosts:
            until(
                f"every chat host passing before chat-{host}'s update",
                lambda: whole(traffic.consul_instances(passing=True)),
            )
            before = traffic.consul_instances(passing=True)
            old = at(ips[host], before)
            started = time.monotonic()
            compose(
                "--profile", "extra", "up", "-d", "--no-deps", "--wait", f"chat-{host}",
                env={"SNET_CHAT_IMAGE": NEW_IMAGE},
            )  # fmt: skip

            def replaced(old: set[str] = old, ip: str = ips[host]) -> bool:
                """The old instance is out of the list, one new one on its host is in it, and
                every other host still has its own."""
                now = traffic.consul_instances(passing=True)
                return not old & set(now) and len(at(ip, now)) == 1 and whole(now)

            try:
                until(f"chat-{host} back with a new instance", replaced)
            except traffic.CheckFailed as e:
                # What Consul had before and has now, and the new container's last lines.
                registered = traffic.consul_instances(passing=False)
                passing = traffic.consul_instances(passing=True)
                logs = compose("logs", "--no-color", "--tail", "20", f"chat-{host}")
                raise traffic.CheckFailed(
                    f"{e}; passing before {sorted(before.items())}, passing now"
                    f" {sorted(passing.items())}, registered now {sorted(registered.items())};"
                    f" chat-{host}'s last lines:\n{logs}"
                ) from None
            image = run("docker", "inspect", "-f", "{{.Config.Image}}", container(f"chat-{host}"))
            if image.strip() != NEW_IMAGE:
                raise traffic.CheckFailed(f"chat-{host} runs {image.strip()}, not {NEW_IMAGE}")
            times.append(time.monotonic() - started)
            say(f"   chat-{host} on {NEW_IMAGE} and in the list after {times[-1]:.1f} s")
        return {"hosts": str(len(hosts)), "per host": "/".join(f"{t:.1f}" for t in times) + " s"}

    def snapshot(self) -> dict[str, str]:
        """docs/deploying.md's backup and restore, through the operator's agent."""
        before = set(traffic.consul_instances(passing=True))
        ops = ["exec", "-T", "-e", "CONSUL_HTTP_TOKEN", "host-ops", "consul"]
        started = time.monotonic()
        compose(*ops, "snapshot", "save", "/tmp/consul.snap")
        saved = time.monotonic() - started
        inspect = compose(*ops[:-1], "consul", "snapshot", "inspect", "/tmp/consul.snap")
        size = next((line.split()[-1] for line in inspect.splitlines() if "Size" in line), "?")
        started = time.monotonic()
        compose(*ops, "snapshot", "restore", "/tmp/consul.snap")
        restored = time.monotonic() - started
        until("three voters and a leader after the restore", lambda: len(voters()) == 3)
        until(
            "the same passing instances after the restore",
            lambda: set(traffic.consul_instances(passing=True)) == before,
            timeout=60,
        )
        return {
            "snapshot": f"{size} bytes",
            "save": f"{saved:.2f} s",
            "restore": f"{restored:.2f} s",
        }

    def server_at(self, server_address: str) -> str:
        ip = server_address.partition(":")[0]
        for name in ("consul-1", "consul-2", "consul-3"):
            try:
                if address(container(name)) == ip:
                    return name
            except traffic.CheckFailed:
                continue
        return f"? ({server_address})"


def print_table(steps: list[Step], show: Callable[[str], None]) -> None:
    """The steps' figures as a Markdown table (docs/cluster.md keeps one)."""
    show("| step | figures | calls | failed |")
    show("|---|---|---|---|")
    for step in steps:
        shown = "; ".join(f"{k} {v}" for k, v in step.figures.items())
        show(f"| {step.name} | {shown} | {step.calls} | {step.failed} |")


def operator_token() -> str:
    return compose(
        "run", "--rm", "--no-deps", "-T", "--entrypoint", "cat", "consul-acl-init",
        "/secrets/operator/consul-token",
    ).strip()  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the cluster up at the end")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.01)
    args = parser.parse_args(argv)
    passed = failed = 0
    began = time.monotonic()
    state_path = str(ROOT / ".cluster-e2e-state.json")
    stream: Stream | None = None
    try:
        compose("down", "-v", "--remove-orphans", "--timeout", "10")
        say("docker compose -f compose.cluster.yml up --wait")
        compose("up", "-d", "--no-build", "--pull", "never", "--wait")
        say(f"up after {time.monotonic() - began:.0f} s")
        os.environ["CONSUL_HTTP_TOKEN"] = operator_token()
        say(f"servers {voters()}, leader {leader()}")
        traffic.wait_for(3, None, 60)
        traffic.save_state(state_path, {"users": traffic.make_users(16), "acknowledged": {}})
        state = traffic.load_state(state_path)
        stream = Stream(traffic.Sender(state), args.workers, args.pause)
        stream.start()
        time.sleep(2.0)
        cluster = Cluster(stream)
        steps: list[tuple[str, Callable[[], dict[str, str]]]] = [
            ("1. the Consul leader killed", cluster.kill_leader),
            ("2. a Consul server lost for good and replaced", cluster.replace_server),
            ("3. a whole chat host stopped", lambda: cluster.stop_chat_host(3)),
            ("4. a chat host cut off and reconnected", lambda: cluster.cut_chat_host(2)),
            ("5. a new chat host added", lambda: cluster.add_chat_host(4)),
            ("6. a rolling update of chat", lambda: cluster.rolling_update([1, 2, 4])),
            ("7. a Consul snapshot saved and restored", cluster.snapshot),
        ]
        ran = cluster.run(steps)
        passed, failed = passed + ran[0], failed + ran[1]
        time.sleep(2.0)
        stream.end()
        total = len(stream.records)
        bad = [r for r in stream.records if not r.ok]
        say(f"{total} sends in {time.monotonic() - began:.0f} s, {len(bad)} failed in all")
        traffic.save_state(state_path, state)
        try:
            traffic.cmd_verify(argparse.Namespace(state=state_path))
            passed += 1
        except traffic.CheckFailed as e:
            say(f"FAILED: {e}")
            failed += 1
        print_table(cluster.steps, say)
    except (traffic.CheckFailed, OSError, KeyError, json.JSONDecodeError) as e:
        say(f"FAILED: {e}")
        failed += 1
    finally:
        if stream is not None:
            stream.end()
        if failed:
            print(compose("ps", "-a", "--format", "{{.Name}} {{.Status}}"), flush=True)
            print(compose("logs", "--no-color", "--tail", "15", "server"), flush=True)
        if not args.keep:
            compose("--profile", "extra", "down", "-v", "--remove-orphans", "--timeout", "30")
        Path(state_path).unlink(missing_ok=True)
    say(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
