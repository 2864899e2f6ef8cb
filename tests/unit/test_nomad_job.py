"""deploy/nomad/snet.nomad.hcl, parsed with python-hcl2 and checked against what the services
read: Nomad cannot run on these machines, so this is what stands between the job file and a
typo (an environment variable no option reads, a port label no network declares, a kill
timeout shorter than the drain)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hcl2
import pytest

from snet.chat.tap import Options as ChatOptions
from snet.connect.wiring import PLAINTEXT_ENVIRONMENT
from snet.server.tap import Options as ServerOptions

JOB = Path(__file__).resolve().parents[2] / "deploy" / "nomad" / "snet.nomad.hcl"
EXTRA_ENVIRONMENT = {
    "SNET_HEALTH_URL",  # read by the image's health check (docker/healthcheck.py)
    PLAINTEXT_ENVIRONMENT,
}


def plain(value: Any) -> Any:
    """python-hcl2's tree without its quotes and block markers; a list of labelled blocks
    (``[{'"name"': {...}}]``) becomes ``{name: {...}}``."""
    if isinstance(value, str):
        return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    if isinstance(value, list):
        items = [plain(v) for v in value]
        labelled = all(
            isinstance(v, dict) and len(v) == 1 and next(iter(v)).startswith('"') for v in value
        )
        if value and labelled:
            return {k: v for i in items for k, v in i.items()}
        return items
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items() if not k.startswith("__")}
    return value


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    with JOB.open() as f:
        tree = plain(hcl2.load(f))
    jobs = tree["job"]
    assert list(jobs) == ["snet"]
    return dict(jobs["snet"])


def seconds(duration: str) -> float:
    found = re.fullmatch(r"([0-9.]+)(ms|s|m|h)", duration)
    assert found, duration
    return float(found.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[found.group(2)]


def task(job: dict[str, Any], group: str) -> dict[str, Any]:
    tasks = job["group"][group]["task"]
    assert list(tasks) == [group]
    return dict(tasks[group])


def env(job: dict[str, Any], group: str) -> dict[str, str]:
    (block,) = task(job, group)["env"]
    return dict(block)


def known_environment(options: type) -> set[str]:
    return set(options()._merged("environment").values())


def test_both_services_are_groups_with_counts_and_one_instance_per_host(
    job: dict[str, Any],
) -> None:
    assert set(job["group"]) == {"chat", "server"}
    for name, group in job["group"].items():
        assert group["count"] == f"${{var.{name}_count}}"
        assert {"operator": "distinct_hosts", "value": "true"} in group["constraint"]


def test_updates_roll_one_at_a_time_behind_a_canary_and_revert_on_failure(
    job: dict[str, Any],
) -> None:
    (update,) = job["update"]
    assert update["max_parallel"] == 1
    assert update["canary"] >= 1
    assert update["auto_revert"] is True
    assert update["health_check"] == "checks"


@pytest.mark.parametrize(("group", "options"), [("chat", ChatOptions), ("server", ServerOptions)])
def test_every_variable_is_one_the_service_reads_and_the_required_ones_are_set(
    job: dict[str, Any], group: str, options: type
) -> None:
    variables = env(job, group)
    unknown = set(variables) - known_environment(options) - EXTRA_ENVIRONMENT
    assert not unknown, f"{group}: no option reads {sorted(unknown)}"
    for required in (
        "SNET_LISTEN",
        "SNET_ADMIN_LISTEN",
        "CONSUL_HTTP_ADDR",
        "CONSUL_HTTP_TOKEN_FILE",
        "SNET_MYSQL",
        "SNET_MYSQL_PASSWORD_FILE",
        "SNET_REDIS",
        "SNET_REDIS_PASSWORD_FILE",
    ):
        assert required in variables, f"{group}: {required} is not set"
    assert variables["CONSUL_HTTP_ADDR"] == "http://127.0.0.1:8500", "the host's own agent"
    assert PLAINTEXT_ENVIRONMENT not in variables, "Connect TLS stays on"


@pytest.mark.parametrize("group", ["chat", "server"])
def test_listeners_use_the_ports_the_group_declares_and_a_check_watches_health(
    job: dict[str, Any], group: str
) -> None:
    (network,) = job["group"][group]["network"]
    labels = set(network["port"])
    variables = env(job, group)
    for name in ("SNET_LISTEN", "SNET_ADMIN_LISTEN"):
        used = set(re.findall(r"\$\{NOMAD_PORT_([a-z]+)\}", variables[name]))
        assert used and used <= labels, f"{name} uses {used}, the group has {labels}"
    (service,) = job["group"][group]["service"]
    assert service["port"] in labels
    (check,) = service["check"]
    assert (check["type"], check["path"]) == ("http", "/health")


@pytest.mark.parametrize("group", ["chat", "server"])
def test_secrets_come_from_files_the_templates_write(job: dict[str, Any], group: str) -> None:
    variables = env(job, group)
    written = {t["destination"] for t in task(job, group)["template"]}
    for name, value in variables.items():
        if name.endswith("_FILE"):
            assert value in written, f"{name}: nothing writes {value}"
    assert not any(
        re.search(r"password|token", value, re.I) and not name.endswith("_FILE")
        for name, value in variables.items()
    ), "a secret in the environment"


def test_the_kill_timeout_covers_the_deregistration_grace_and_the_drain(
    job: dict[str, Any],
) -> None:
    for group in ("chat", "server"):
        variables = env(job, group)
        needed = float(variables.get("SNET_DEREGISTER_GRACE", 0)) + float(
            variables["SNET_DRAIN_TIMEOUT"]
        )
        assert task(job, group)["kill_signal"] == "SIGTERM"
        assert seconds(task(job, group)["kill_timeout"]) > needed, group


def test_the_chat_instances_register_themselves_and_advertise_the_host(
    job: dict[str, Any],
) -> None:
    """No Consul service block (the instance registers itself, Connect-native); Nomad's
    own catalogue carries the deployment check."""
    for group in job["group"].values():
        assert all(s["provider"] == "nomad" for s in group["service"])
    variables = env(job, "chat")
    assert variables["SNET_ADVERTISE"] == "${NOMAD_IP_api}:${NOMAD_PORT_api}"
    assert variables["SNET_SERVICE_NAME"] == "snet-chat"
    assert env(job, "server")["SNET_CHAT_SERVICE"] == "snet-chat"
