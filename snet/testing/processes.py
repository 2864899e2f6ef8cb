"""Run snet's own twistd plugins as real processes, for integration tests and the local stack."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from attrs import define, field

from snet.testing.waiting import wait_until


def tls_probe_context() -> ssl.SSLContext:
    """A TLS client that presents no certificate and verifies none, like Consul's HTTPS check
    with ``TLSSkipVerify``: enough for a Connect chat instance's ``/health`` and ``/metrics``,
    never for its ``/v1`` routes (401)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_PROBE = tls_probe_context()


def opener(tls: ssl.SSLContext | None = None) -> urllib.request.OpenerDirector:
    """An opener that talks to this machine's servers directly, whatever proxy the
    environment names; ``https://`` with *tls* (by default :func:`tls_probe_context`)."""
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=tls or _PROBE)
    )


_opener = opener()


class ProcessFailed(RuntimeError):
    """A process exited or never became ready; the message carries the tail of its log."""


def http_get(
    url: str, timeout: float = 2.0, tls: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    """GET *url* with a timeout; HTTP errors are answers too (status, body). An ``https://``
    URL is called with *tls* (by default a probe without a certificate)."""
    try:
        with (opener(tls) if tls else _opener).open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def http_json(
    method: str,
    url: str,
    body: object | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
    raw: bytes | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], Any]:
    """Make one JSON request; returns (status, headers, decoded body or None).

    *raw* is sent as the body instead of *body*'s JSON, for malformed-input tests; an
    ``https://`` URL is called with *tls* (by default a probe without a certificate).
    """
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with (opener(tls) if tls else _opener).open(request, timeout=timeout) as response:
            status, raw, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        status, raw, got = e.code, e.read(), dict(e.headers)
    return status, got, (json.loads(raw) if raw else None)


def twistd_command() -> list[str]:
    """``twistd`` of the running Python's environment (the one this package is installed in)."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


TEXT_LOGGER = "snet.jsonlog.text_observer"
"""twistd's text log lines, for a fifth of the CPU of its own observer (snet.jsonlog)."""


@define
class TwistdProcess:
    """``twistd -n PLUGIN ARGS`` as a child process, logging to a file of its own."""

    plugin: str
    args: Sequence[str]
    environ: Mapping[str, str] = field(factory=dict)
    health_url: str | None = None
    admin_url: str | None = None
    """``http://host:port`` of its admin listener (``/metrics``), if the test knows it."""
    name: str = ""
    own_session: bool = False
    """Start in a session of its own, out of reach of a terminal's Ctrl-C (see servers)."""
    log_path: Path = field(init=False)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix=f"snet-{self.plugin}-"))
        self.log_path = directory / "twistd.log"

    @property
    def base_url(self) -> str:
        """``scheme://host:port`` of the process's HTTP API (its health URL without the path)."""
        assert self.health_url is not None
        return self.health_url.removesuffix("/health")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, ready_timeout: float | None = 20.0) -> TwistdProcess:
        """Start the process; wait for its health URL unless *ready_timeout* is None."""
        environment = {**os.environ, **self.environ}
        command = [
            *twistd_command(), "--nodaemon", "--pidfile=", f"--logger={TEXT_LOGGER}",
            self.plugin, *self.args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=environment, cwd=self.log_path.parent,
                start_new_session=self.own_session,
            )  # fmt: skip
        if self.health_url is not None and ready_timeout is not None:
            self.wait_healthy(ready_timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        """Wait until the health URL answers 200, and the admin listener's too when the test
        knows it (the admin listener starts with the workers, after the schema is applied,
        so it comes up after the public port), or fail with the log's tail."""
        assert self.health_url is not None
        urls = [self.health_url]
        if self.admin_url is not None:
            urls.append(f"{self.admin_url}/health")

        def healthy() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise ProcessFailed(
                    f"{self} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                return all(http_get(url, timeout=1.0)[0] == 200 for url in urls)
            except OSError:
                return False

        try:
            wait_until(healthy, timeout, f"{self} to be healthy", interval=0.05)
        except TimeoutError:
            raise ProcessFailed(
                f"{self} not healthy after {timeout}s:\n{self.log_tail()}"
            ) from None

    def signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within *timeout*; returns its exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> TwistdProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __str__(self) -> str:
        return f"twistd {self.plugin} {self.name}".strip()
