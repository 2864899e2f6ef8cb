"""End-to-end test of deploy/swarm/stack.yml on a single-node Docker Swarm, with traffic
through the monolith the whole time. Standard library only; uses tests/e2e/traffic.py and
cluster.py's stream of sends.

    python3 tests/e2e/swarm.py [--keep]

It makes a swarm advertised on 127.0.0.1 (refusing to touch one that exists), deploys the
stack with the images tests/e2e/compose.sh builds, then, with several senders running:

  1. `docker service update --image` of chat to a new image: start-first, one task at a
     time, each old one deregistering and draining before it stops; 0 failed calls;
  2. `docker service scale chat=5`: each new task gets its first call within a second of
     its Consul check passing;
  3. an update whose new tasks never get healthy: Swarm rolls it back by itself
     (update_config's failure_action), the old instances serving throughout;

and checks that every acknowledged send is stored exactly once. At the end it removes the
stack, its volumes, and leaves the swarm (`docker swarm leave --force`), on failure too.
The last line says ``swarm: N passed, N failed``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import cluster  # noqa: E402
import traffic  # noqa: E402

STACK = os.environ.get("SNET_SWARM_STACK", "snet-swarm")
FILE = str(ROOT / "deploy" / "swarm" / "stack.yml")
NEW_IMAGE = "snet-chat:e2e-v2"
VOLUMES = ["consul-data", "mysql-data", "mysql-secrets", "redis-secrets", "server-secrets",
           "chat-secrets", "operator-secrets"]  # fmt: skip


def say(message: str) -> None:
    print(f"swarm: {message}", flush=True)


def run(*command: str, check: bool = True) -> str:
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if check and done.returncode != 0:
        raise traffic.CheckFailed(
            f"{' '.join(command)} exited {done.returncode}: {(done.stderr or done.stdout)[-800:]}"
        )
    return done.stdout


def service_images(service: str) -> list[str]:
    """The images of the service's running tasks."""
    out = run(
        "docker", "service", "ps", "--filter", "desired-state=running",
        "--format", "{{.Image}} {{.CurrentState}}", f"{STACK}_{service}",
    )  # fmt: skip
    return [line.split()[0] for line in out.splitlines() if " Running " in f" {line} "]


def operator_token() -> str:
    return run(
        "docker", "run", "--rm", "--network", "none", "-v",
        f"{STACK}_operator-secrets:/s:ro", os.environ["SNET_BASE_IMAGE"], "cat", "/s/consul-token",
    ).strip()  # fmt: skip


def update_image(stream: cluster.Stream) -> dict[str, str]:
    run("sh", "-c", f"printf 'FROM snet-chat:e2e\\nLABEL snet.release=v2\\n' | "
        f"docker build -q -t {NEW_IMAGE} -")  # fmt: skip
    before = set(traffic.consul_instances(passing=True))
    started = time.monotonic()
    # Blocks until the update converged (or rolled back).
    run("docker", "service", "update", "--quiet", "--image", NEW_IMAGE, f"{STACK}_chat")
    took = time.monotonic() - started
    images = service_images("chat")
    if len(images) != 3 or set(images) != {NEW_IMAGE}:
        raise traffic.CheckFailed(f"after the update the chat tasks run {images}")
    cluster.until(
        "three instances, all new",
        lambda: len(now := set(traffic.consul_instances(passing=True))) == 3 and not now & before,
    )
    return {"update took": f"{took:.1f} s", "tasks on the new image": str(len(images))}


def scale(stream: cluster.Stream, replicas: int) -> dict[str, str]:
    before = set(traffic.consul_instances(passing=False))
    run("docker", "service", "scale", "--detach", f"{STACK}_chat={replicas}")
    passed_at: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(passed_at) < replicas - len(before) and time.monotonic() < deadline:
        for instance in set(traffic.consul_instances(passing=True)) - before:
            passed_at.setdefault(instance, time.monotonic())
        time.sleep(0.05)
    if len(passed_at) < replicas - len(before):
        raise traffic.CheckFailed(f"only {len(passed_at)} new instances passed their check")
    delays = []
    for instance, passed in passed_at.items():
        cluster.until(
            f"{instance}'s first call",
            lambda i=instance, p=passed: any(r.ok and r.instance == i for r in stream.since(p - 1)),
            timeout=30,
        )
        first = min(r.started for r in stream.since(passed - 1) if r.instance == instance)
        delays.append(max(0.0, first - passed))
    if max(delays) > 1.0:
        raise traffic.CheckFailed(f"a new task's first call came {max(delays):.2f} s after")
    return {
        "new tasks": str(len(delays)),
        "first call after passing": "/".join(f"{d * 1000:.0f}" for d in delays) + " ms",
    }


def failed_update_rolls_back(stream: cluster.Stream) -> dict[str, str]:
    """An update whose new tasks never pass their health check (it asks a closed port):
    Swarm stops it and rolls the service back to the spec before it."""
    service = f"{STACK}_chat"
    before = set(traffic.consul_instances(passing=True))
    started = time.monotonic()
    done = subprocess.run(
        ["docker", "service", "update", "--quiet", "--health-start-period", "1s",
         "--env-add", "SNET_HEALTH_URL=http://127.0.0.1:9/health", service],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    state = run(
        "docker", "service", "inspect", "-f", "{{.UpdateStatus.State}}", service
    ).strip()  # fmt: skip
    env = run("docker", "service", "inspect", "-f",
              "{{json .Spec.TaskTemplate.ContainerSpec.Env}}", service)  # fmt: skip
    say(f"   docker service update exited {done.returncode}; update state {state}")
    if state != "rollback_completed" or "127.0.0.1:9/" in env:
        raise traffic.CheckFailed(f"no rollback: state {state}, env {env.strip()}")
    cluster.until(
        "the instances before the update, all passing",
        lambda: set(traffic.consul_instances(passing=True)) == before,
        timeout=60,
    )
    return {"rolled back after": f"{time.monotonic() - started:.1f} s"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the swarm and stack up")
    args = parser.parse_args(argv)
    cluster.say = say  # the steps' lines say "swarm:"
    passed = failed = 0
    began = time.monotonic()
    state_path = str(ROOT / ".swarm-e2e-state.json")
    stream: cluster.Stream | None = None
    made_swarm = False
    try:
        if run("docker", "info", "--format", "{{.Swarm.LocalNodeState}}").strip() != "inactive":
            raise traffic.CheckFailed("this engine is already in a swarm: not touching it")
        run("docker", "swarm", "init", "--advertise-addr", "127.0.0.1",
            "--listen-addr", "127.0.0.1:2377")  # fmt: skip
        made_swarm = True
        say("single-node swarm on 127.0.0.1; docker stack deploy")
        run("docker", "stack", "deploy", "--prune", "-c", FILE, STACK)
        cluster.until("three chat tasks running", lambda: len(service_images("chat")) == 3, 240)
        os.environ["CONSUL_HTTP_TOKEN"] = cluster.until_value(
            "the operator token", lambda: run_quiet(operator_token), 120
        )
        traffic.wait_for(3, None, 180)
        say(f"up after {time.monotonic() - began:.0f} s")
        traffic.save_state(state_path, {"users": traffic.make_users(8), "acknowledged": {}})
        state = traffic.load_state(state_path)
        stream = cluster.Stream(traffic.Sender(state), 3, 0.01)
        stream.start()
        time.sleep(2.0)
        steps = cluster.Cluster(stream)
        ran = steps.run(
            [
                ("1. docker service update --image (start-first)", lambda: update_image(stream)),
                ("2. docker service scale chat=5", lambda: scale(stream, 5)),
                (
                    "3. an update whose tasks fail their health check",
                    lambda: failed_update_rolls_back(stream),
                ),
            ]
        )
        passed, failed = passed + ran[0], failed + ran[1]
        time.sleep(2.0)
        stream.end()
        bad = [r for r in stream.records if not r.ok]
        say(f"{len(stream.records)} sends, {len(bad)} failed in all")
        traffic.save_state(state_path, state)
        try:
            traffic.cmd_verify(argparse.Namespace(state=state_path))
            passed += 1
        except traffic.CheckFailed as e:
            say(f"FAILED: {e}")
            failed += 1
        cluster.print_table(steps.steps, say)
    except (traffic.CheckFailed, OSError, KeyError, ValueError) as e:
        say(f"FAILED: {e}")
        failed += 1
    finally:
        if stream is not None:
            stream.end()
        if failed and made_swarm:
            print(
                run("docker", "stack", "ps", "--no-trunc", STACK, check=False)[-3000:], flush=True
            )
        if made_swarm and not args.keep:
            run("docker", "stack", "rm", STACK, check=False)
            # The stack's containers go first; then its volumes can be removed.
            for _ in range(120):
                if not run(
                    "docker",
                    "ps",
                    "-aq",
                    "--filter",
                    f"label=com.docker.stack.namespace={STACK}",
                    check=False,
                ).strip():
                    break
                time.sleep(0.5)
            run("docker", "swarm", "leave", "--force", check=False)
            for volume in VOLUMES:
                run("docker", "volume", "rm", f"{STACK}_{volume}", check=False)
            say("stack removed, swarm left")
        Path(state_path).unlink(missing_ok=True)
    say(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def run_quiet(read: object) -> str | None:
    """*read*() or None while it fails (the token is not written yet)."""
    try:
        return read() or None  # type: ignore[operator, no-any-return]
    except traffic.CheckFailed:
        return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
