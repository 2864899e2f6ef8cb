#!/usr/bin/env python3
"""The deployment's one-shot set-up steps, run by compose.yml on every `docker compose up`.

    snet-init secrets      random passwords for MySQL and Redis, written once, kept after
    snet-init consul-acl   Consul's ACL bootstrap, a policy and a token per role, the agent's
                           token, and the intentions snet-server -> snet-chat allow, * deny
    snet-init rotate NAME  a new value for one password (see docs/deploying.md)
    snet-init rotate-token consul-chat|consul-server|consul-operator
                           a new Consul token for a role; the old one stays valid until the
                           operator deletes it (its accessor id is printed)

Both set-up steps are idempotent: what exists and still works is kept, what is missing (or
a token Consul no longer knows) is made again. Secrets go to files only, one per volume
that only their consumers mount: nothing is printed, passed in the environment or baked into
an image. Every file is ``root:GROUP`` mode 0440 in a directory ``root:GROUP`` mode 0750,
GROUP being the group its consumer runs with (compose.yml's ``group_add``, or snet's 10001),
so the consumers read them whatever user id their image runs as; this process needs
CAP_CHOWN and nothing else.

Standard library only: it runs on the plain base image (python3).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Mount points in the init containers (compose.yml) and the group that may read each.
MYSQL = Path("/secrets/mysql")  # -> the mysql container
REDIS = Path("/secrets/redis")  # -> the redis container
SERVER = Path("/secrets/server")  # -> the monolith
CHAT = Path("/secrets/chat")  # -> every chat instance
OPERATOR = Path("/secrets/operator")  # -> nobody but these init steps (and the operator)
# Mounted by compose.cluster.yml only: the gossip key and the client agents' token, both read
# by the Consul agents (the consul group, 1000).
GOSSIP = Path("/secrets/gossip")
AGENT = Path("/secrets/agent")
GROUPS = {
    MYSQL: 10901,
    REDIS: 10902,
    SERVER: 10001,
    CHAT: 10001,
    OPERATOR: 0,
    GOSSIP: 1000,
    AGENT: 1000,
}

CONSUL = os.environ.get("CONSUL_HTTP_ADDR", "http://consul:8500")
if "://" not in CONSUL:
    CONSUL = "http://" + CONSUL
CHAT_SERVICE = os.environ.get("SNET_CHAT_SERVICE", "snet-chat")
SERVER_SERVICE = os.environ.get("SNET_SERVER_SERVICE", "snet-server")
CONSUL_NODE = os.environ.get("SNET_CONSUL_NODE", "consul")
# A cluster: the node name prefixes its agents may write (their own catalogue entries), and
# the agents whose own token this step sets through their API (the servers; client agents
# read theirs from the agent-secrets volume as they start).
CONSUL_NODE_PREFIXES = [p for p in os.environ.get("SNET_CONSUL_NODE_PREFIXES", "").split(",") if p]
CONSUL_AGENTS = [
    a if "://" in a else "http://" + a
    for a in os.environ.get("SNET_CONSUL_AGENTS", CONSUL).split(",")
    if a
]
GLOBAL_MANAGEMENT = "00000000-0000-0000-0000-000000000001"


def say(message: str) -> None:
    print(f"snet-init: {message}", flush=True)


class InitError(Exception):
    """A step cannot finish; the message says why and what to do."""


# Files


def prepare(directory: Path) -> None:
    os.chown(directory, 0, GROUPS[directory])
    directory.chmod(0o750)


def write_secret(directory: Path, name: str, value: str) -> None:
    """Write *value* to directory/name atomically, readable by the directory's group only."""
    path = directory / name
    scratch = directory / f".{name}.new"
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.chown(scratch, 0, GROUPS[directory])
    scratch.chmod(0o440)
    scratch.replace(path)


def read_secret(directory: Path, name: str) -> str | None:
    path = directory / name
    if not path.exists():
        return None
    return path.read_text().strip() or None


def new_password() -> str:
    # Hex: safe in URLs, SQL strings, shell words and Redis's ACL syntax without quoting.
    return secrets.token_hex(24)


# Secrets for MySQL and Redis

# name -> the files that hold it (the same value in each consumer's volume).
PASSWORDS: dict[str, list[tuple[Path, str]]] = {
    "mysql-root": [(MYSQL, "root-password")],
    "mysql-server": [(MYSQL, "server-password"), (SERVER, "mysql-password")],
    "mysql-chat": [(MYSQL, "chat-password"), (CHAT, "mysql-password")],
    "redis-server": [(SERVER, "redis-password")],
    "redis-chat": [(CHAT, "redis-password")],
    "redis-healthcheck": [(REDIS, "healthcheck-password")],
}


# Each service's Redis keys. A new key prefix in the code needs its pattern here (and a
# restart of redis to load it); tests/e2e/compose.sh exercises the dialog path.
SERVER_KEYS = "~snet:feed:* ~snet:post:* ~snet:rate:*"  # feed cache, post bodies, rate limits
CHAT_KEYS = "~snet:unread:* ~snet:read:*"  # unread counters and read marks


def redis_acl(passwords: dict[str, str]) -> str:
    """Redis's users: no anonymous access, each service its own keys, a PING-only user for
    the health check. Service passwords appear only as SHA-256 hashes."""

    def digest(name: str) -> str:
        return "#" + hashlib.sha256(passwords[name].encode()).hexdigest()

    return "\n".join(
        [
            "user default off resetpass resetkeys resetchannels -@all",
            f"user snet-server on {digest('redis-server')} resetchannels {SERVER_KEYS}"
            " +@all -@dangerous",
            f"user snet-chat on {digest('redis-chat')} resetchannels {CHAT_KEYS} +@all -@dangerous",
            f"user healthcheck on {digest('redis-healthcheck')} resetchannels -@all +ping",
            "",
        ]
    )


def ensure_secrets(rotate: str | None = None) -> None:
    for directory in (MYSQL, REDIS, SERVER, CHAT):
        prepare(directory)
    values: dict[str, str] = {}
    for name, places in PASSWORDS.items():
        found = {read_secret(d, f) for d, f in places}
        if rotate != name and len(found) == 1 and None not in found:
            values[name] = found.pop()  # type: ignore[assignment]
            continue
        # Missing (first start), half written, or rotated: one new value for every copy.
        if rotate != name and found - {None}:
            raise InitError(
                f"the copies of {name} differ or some are missing; `snet-init rotate {name}`"
                " makes them agree (docs/deploying.md)"
            )
        values[name] = new_password()
        for directory, file in places:
            write_secret(directory, file, values[name])
        say(f"{name}: {'rotated' if rotate == name else 'generated'}")
    if GOSSIP.is_dir():
        prepare(GOSSIP)
        if read_secret(GOSSIP, "key") is None:
            # Consul's gossip encryption key: 32 random bytes, base64 (what `consul keygen`
            # makes).
            write_secret(GOSSIP, "key", base64.b64encode(secrets.token_bytes(32)).decode())
            say("consul gossip key: generated")
    acl = redis_acl(values)
    if (REDIS / "users.acl").exists() and (REDIS / "users.acl").read_text() == acl:
        say("secrets present: kept; redis users.acl unchanged")
        return
    write_secret(REDIS, "users.acl", acl.rstrip("\n"))
    say("redis users.acl written")


# Consul


def consul(
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
    timeout: float = 10.0,
    at: str = CONSUL,
) -> tuple[int, Any]:
    """Call the agent at *at*; OSError if it cannot be reached."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{at}{path}", data=data, method=method)  # noqa: S310
    if token:
        request.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace").strip()


def retrying(what: str, attempt: Callable[[], Any | None], timeout: float = 90.0) -> Any:
    """Call *attempt* until it returns something other than None, or fail after *timeout*."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = attempt()
            if result is not None:
                return result
        except OSError as e:
            last = e
        time.sleep(0.5)
    raise InitError(f"{what}: no success within {timeout:.0f} s (last: {last})")


def valid(token: str | None) -> bool:
    if not token:
        return False
    status, _ = consul("GET", "/v1/acl/token/self", token)
    return status == 200


def management_token() -> str:
    """The bootstrap token: the one saved at the first start, or a new bootstrap."""
    saved = read_secret(OPERATOR, "consul-bootstrap-token")
    if valid(saved):
        return saved  # type: ignore[return-value]

    def bootstrap() -> str | None:
        status, answer = consul("PUT", "/v1/acl/bootstrap")
        if status == 200:
            return str(answer["SecretID"])
        if status == 403 or "no longer allowed" in str(answer):
            raise InitError(
                "Consul's ACLs were bootstrapped before, but the bootstrap token saved in the"
                f" operator-secrets volume is missing or revoked (Consul: {answer}). Reset the"
                " bootstrap (docs/deploying.md, 'Lost the bootstrap token') or start afresh"
                " with `docker compose down -v`."
            )
        # 500s while a leader is elected or the ACL system leaves legacy mode: try again.
        return None

    token: str = retrying("ACL bootstrap", bootstrap)
    write_secret(OPERATOR, "consul-bootstrap-token", token)
    say("ACLs bootstrapped; the bootstrap token is in the operator-secrets volume")
    return token


def policies() -> dict[str, str]:
    return {
        # Register, check and deregister its own service, nothing else; with service:write
        # on its own name it may also fetch its Connect leaf certificate and ask the agent
        # to authorize callers (intention reads for its own name come with it). The CA roots
        # need no token. It reads no other service and no node.
        "snet-chat": f'service "{CHAT_SERVICE}" {{ policy = "write" }}\n',
        # Read the chat instances and their health (health answers are filtered by node
        # read too); service:write on its own name only for its Connect leaf certificate
        # (Consul 1.8 issues a leaf to a token that may write the service).
        "snet-server": (
            f'service "{CHAT_SERVICE}" {{ policy = "read" }}\n'
            f'service "{SERVER_SERVICE}" {{ policy = "write" }}\n'
            'node_prefix "" { policy = "read" }\n'
        ),
        # The Consul agent's own token: its node's catalogue entry, and reading services
        # for anti-entropy.
        "snet-consul-agent": (
            "".join(f'node_prefix "{p}" {{ policy = "write" }}\n' for p in CONSUL_NODE_PREFIXES)
            or f'node "{CONSUL_NODE}" {{ policy = "write" }}\n'
        )
        + 'service_prefix "" { policy = "read" }\n',
    }


def ensure_policies(token: str) -> None:
    status, existing = consul("GET", "/v1/acl/policies", token)
    if status != 200:
        raise InitError(f"listing ACL policies: {status} {existing}")
    by_name = {p["Name"]: p["ID"] for p in existing}
    for name, rules in policies().items():
        body = {"Name": name, "Description": "snet (docker/snet-init.py)", "Rules": rules}
        if name not in by_name:
            status, answer = consul("PUT", "/v1/acl/policy", token, body)
            action = "created"
        else:
            status, current = consul("GET", f"/v1/acl/policy/{by_name[name]}", token)
            if status == 200 and current.get("Rules") == rules:
                continue
            status, answer = consul("PUT", f"/v1/acl/policy/{by_name[name]}", token, body)
            action = "updated"
        if status != 200:
            raise InitError(f"policy {name}: {status} {answer}")
        say(f"policy {name} {action}")


def ensure_token(
    token: str,
    place: tuple[Path, str],
    description: str,
    policy_ids: list[dict[str, str]],
    rotate: bool = False,
) -> str:
    """The role's token saved at *place* (directory, file) if Consul still knows it, else a
    new one (saved there). *rotate* makes a new one anyway and leaves the old one valid."""
    directory, file = place
    saved = read_secret(directory, file)
    if valid(saved) and not rotate:
        return saved  # type: ignore[return-value]
    if rotate and saved:
        status, old = consul("GET", "/v1/acl/token/self", saved)
        if status == 200:
            say(
                f"token {description!r} replaced; once its users run with the new one, delete"
                f" the old one: accessor id {old['AccessorID']} (docs/deploying.md)"
            )
    body = {"Description": description, "Policies": policy_ids, "Local": False}
    status, answer = consul("PUT", "/v1/acl/token", token, body)
    if status != 200:
        raise InitError(f"token {description!r}: {status} {answer}")
    write_secret(directory, file, answer["SecretID"])
    say(f"token {description!r} created ({directory.name}-secrets volume, {file})")
    return str(answer["SecretID"])


def ensure_intention(token: str, source: str, action: str) -> None:
    status, existing = consul("GET", "/v1/connect/intentions", token)
    if status != 200:
        raise InitError(f"listing intentions: {status} {existing}")
    body = {
        "SourceName": source,
        "DestinationName": CHAT_SERVICE,
        "Action": action,
        "Description": "snet (docker/snet-init.py)",
    }
    for intention in existing or []:
        if (intention["SourceName"], intention["DestinationName"]) == (source, CHAT_SERVICE):
            if intention["Action"] == action:
                return
            status, answer = consul("PUT", f"/v1/connect/intentions/{intention['ID']}", token, body)
            break
    else:
        status, answer = consul("POST", "/v1/connect/intentions", token, body)
    if status != 200:
        raise InitError(f"intention {source} -> {CHAT_SERVICE}: {status} {answer}")
    say(f"intention {source} -> {CHAT_SERVICE}: {action}")


ROLES = {
    "consul-chat": ((CHAT, "consul-token"), "snet chat", [{"Name": "snet-chat"}]),
    "consul-server": ((SERVER, "consul-token"), "snet monolith", [{"Name": "snet-server"}]),
    "consul-operator": ((OPERATOR, "consul-token"), "snet operator", [{"ID": GLOBAL_MANAGEMENT}]),
    "consul-agent": (
        (AGENT if AGENT.is_dir() else OPERATOR, "consul-agent-token"),
        "consul agent",
        [{"Name": "snet-consul-agent"}],
    ),
}


def ensure_consul_acl(rotate: str | None = None) -> None:
    for directory in (SERVER, CHAT, OPERATOR, AGENT):
        if directory.is_dir() or directory is not AGENT:
            prepare(directory)

    def leader() -> str | None:
        status, answer = consul("GET", "/v1/status/leader")
        return answer if status == 200 and answer else None

    retrying("waiting for Consul's leader", leader)
    management = management_token()
    ensure_policies(management)
    tokens = {role: ensure_token(management, *ROLES[role], rotate=role == rotate) for role in ROLES}
    agent = tokens["consul-agent"]
    # Persisted by each agent (acl.enable_token_persistence), so a restart keeps it.
    for address in CONSUL_AGENTS:

        def set_token(address: str = address) -> bool | None:
            status, answer = consul(
                "PUT", "/v1/agent/token/agent", management, {"Token": agent}, at=address
            )
            if status == 200:
                return True
            raise InitError(f"setting the agent token of {address}: {status} {answer}")

        retrying(f"setting the agent token of {address}", set_token)
    ensure_intention(management, SERVER_SERVICE, "allow")
    ensure_intention(management, "*", "deny")
    say("Consul ACLs and intentions in place")


def main(argv: list[str]) -> int:
    try:
        if argv == ["secrets"]:
            ensure_secrets()
        elif argv == ["consul-acl"]:
            ensure_consul_acl()
        elif len(argv) == 2 and argv[0] == "rotate" and argv[1] in PASSWORDS:
            ensure_secrets(rotate=argv[1])
        elif len(argv) == 2 and argv[0] == "rotate-token" and argv[1] in ROLES:
            ensure_consul_acl(rotate=argv[1])
        else:
            print(__doc__.split("\n\n")[1], file=sys.stderr)
            print(f"rotate takes one of: {', '.join(PASSWORDS)}", file=sys.stderr)
            print(f"rotate-token takes one of: {', '.join(ROLES)}", file=sys.stderr)
            return 2
    except InitError as e:
        say(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
