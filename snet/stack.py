"""``python -m snet.stack``: the whole system as local processes, for trying it without Docker.

Starts a Consul dev agent, MariaDB and Redis (private servers in temporary directories, from
their real binaries), then N ``twistd -n snet-chat`` instances and the monolith
(``twistd -n snet-server``), and follows every log in one terminal with a prefix per process.
Ctrl-C stops the monolith and the chat instances (each deregisters and drains first), then
the servers.

Like a deployment, it speaks Consul Connect (docs/trust.md): it creates the intentions
``* -> snet-chat`` deny and ``snet-server -> snet-chat`` allow, the chat instances serve
TLS only and the monolith calls them as ``snet-server``; ``--insecure-plaintext`` runs both
in plain HTTP instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from snet.testing.fleet import ChatFleet, monolith
from snet.testing.servers import ConsulAgent, MariaDB, Redis, free_port

NOISE = re.compile(
    r"#debug\]"  # health probes and metric scrapes, every second from every instance
    r"|\] (Starting|Stopping) (factory|protocol) "  # Twisted's connection chatter
    r"|\[(INFO|DEBUG|TRACE)\] +agent"  # Consul's own info lines
)
"""Log lines a person does not need to see by default (``--verbose`` shows them)."""


CONSUL_PROBLEM = re.compile(r"\[(WARN|ERROR)\]")


def worth_showing(line: str, source: str = "") -> bool:
    """Whether a log line matters to a person watching the stack: requests, starts and stops,
    warnings and errors (and traceback lines, which carry no level); of Consul's own log, its
    warnings and errors only."""
    if source == "consul":
        return CONSUL_PROBLEM.search(line) is not None
    return NOISE.search(line) is None


def follow(
    prefix: str, path: Path, out: TextIO, stop: threading.Event, verbose: bool = False
) -> None:
    """Copy new lines of *path* to *out*, each behind *prefix*, until *stop* is set; only
    those ``worth_showing`` unless *verbose*."""
    while not path.exists() and not stop.is_set():
        time.sleep(0.1)
    with path.open(errors="replace") as log:
        while not stop.is_set():
            line = log.readline()
            if line:
                if verbose or worth_showing(line, prefix.split("|")[0].strip()):
                    out.write(f"{prefix} {line}")
                    out.flush()
            else:
                time.sleep(0.1)


@contextlib.contextmanager
def followed(logs: dict[str, Path], out: TextIO, verbose: bool = False) -> Iterator[None]:
    stop = threading.Event()
    width = max(len(name) for name in logs)
    threads = [
        threading.Thread(
            target=follow, args=(f"{name:<{width}} |", path, out, stop, verbose), daemon=True
        )
        for name, path in logs.items()
    ]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        time.sleep(0.3)  # let the last lines (deregistered, drained) reach the terminal
        stop.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snet.stack", description=__doc__)
    parser.add_argument("--chat", type=int, default=3, help="chat instances to run (default 3)")
    parser.add_argument(
        "--chat-port", type=int, default=9001, help="first chat port (default 9001; 0: any free)"
    )
    parser.add_argument("--port", type=int, default=8080, help="the monolith's port (default 8080)")
    parser.add_argument(
        "--verbose", action="store_true", help="show every log line (health probes included)"
    )
    parser.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="run the monolith and the chat instances without Connect (plain HTTP)",
    )
    args = parser.parse_args(argv)
    if args.verbose:  # the services drop debug events unless asked (snet.jsonlog)
        os.environ.setdefault("SNET_LOG_LEVEL", "debug")
    out = sys.stdout
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    # Every process gets a session of its own, so that Ctrl-C reaches only this one, which
    # then stops them in order: the monolith, the chat instances (deregistering from a Consul
    # that still runs, draining against a MySQL that still runs), then the servers.
    _since = [time.monotonic()]

    def ready(what: str) -> None:
        now = time.monotonic()
        print(f"started {what} in {now - _since[0]:.1f} s", file=out)
        _since[0] = now

    with (
        ConsulAgent(own_session=True) as consul,
        MariaDB(own_session=True) as mariadb,
        Redis(own_session=True) as redis,
    ):
        ready("Consul, MariaDB and Redis")
        mysql_url = mariadb.create_database("snet_chat")
        server_mysql_url = mariadb.create_database("snet")
        ports = [args.chat_port + i if args.chat_port else free_port() for i in range(args.chat)]
        fleet = ChatFleet(
            consul_url=consul.url,
            mysql_url=mysql_url,
            redis_url=redis.url,
            count=0,
            service="snet-chat",
            own_session=True,
            plaintext=args.insecure_plaintext,
        )
        chats = [fleet.add_instance_at(port) for port in ports]
        server = monolith(
            rate_limited=True,
            admin_port=args.port + 1,
            consul_url=consul.url,
            mysql_url=server_mysql_url,
            redis_url=redis.url.replace("/0", "/1"),
            chat_service=fleet.service,
            port=args.port,
            own_session=True,
            plaintext=args.insecure_plaintext,
        )
        server.name = "monolith"
        logs = {
            "consul": consul.log_path,
            "monolith": server.log_path,
            **{c.name: c.log_path for c in chats},
        }
        with followed(logs, out, verbose=args.verbose):
            try:
                for chat in chats:
                    chat.start(ready_timeout=None)
                for chat in chats:
                    chat.wait_healthy(30)
                ready(f"{len(chats)} chat instances ({', '.join(c.name for c in chats)})")
                server.start()
                ready("the monolith")
                web, admin = f"http://127.0.0.1:{args.port}", server.admin_url
                banner = [
                    f"web pages      {web}/web/",
                    f"JSON API       {web}/  (OpenAPI: {web}/openapi.json)",
                    f"operator view  {admin}/fleet/  (metrics: {admin}/metrics)",
                    f"Consul UI      {consul.url}/ui/",
                    f"MariaDB        127.0.0.1:{mariadb.port}  (databases snet, snet_chat)",
                    f"Redis          {redis.url}",
                    "security       "
                    + (
                        f"Connect mutual TLS; intentions {'; '.join(fleet.intentions)}"
                        if fleet.intentions
                        else "plaintext: any process that reaches a chat port is trusted"
                    ),
                ]
                rule = "=" * max(len(line) for line in banner)
                print("\n".join(["", rule, *banner, rule, "Ctrl-C stops it.", ""]), file=out)
                while server.running() and all(chat.running() for chat in chats):
                    time.sleep(0.5)
                print("a process exited; stopping the stack", file=out)
                return 1
            except KeyboardInterrupt:
                print("stopping: chat instances deregister and drain first", file=out)
                return 0
            finally:
                # A second Ctrl-C must not cut the orderly stop short.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                server.stop()
                for chat in chats:
                    chat.signal(signal.SIGTERM)
                for chat in chats:
                    chat.stop()


if __name__ == "__main__":
    sys.exit(main())
