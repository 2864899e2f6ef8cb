"""The Consul API client, driven through treq so that no blocking HTTP call runs on the reactor.

py-consul (the ``consul`` module) builds the requests and parses the answers; this module owns
the transport underneath it: every call is a treq request over a persistent connection pool of
its own, bounded by a timeout (both from :mod:`snet.httpcall`), and returns a Deferred that
fires with what py-consul's synchronous client would return. It also owns Consul's durations:
:func:`parse_duration` reads them, :func:`consul_duration` writes them.

- Errors from the agent keep py-consul's exceptions (``consul.base.NotFound``,
  ``ConsulException`` and its subclasses), raised by py-consul's own response callbacks.
- Not reaching the agent at all (connection refused, DNS failure, connection lost, no answer
  within the timeout) is :class:`ConsulUnavailable`, which wraps the cause.
- Cancelling a call's Deferred cancels the request and fails it with ``CancelledError``.
- Indexes (``X-Consul-Index``) come back as strings, exactly as py-consul returns them; pass
  them back unchanged as ``index=``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import consul.base
import treq.client
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from snet.config import ConsulConfig
from snet.httpcall import (
    WRAPPED,
    PooledHTTPClient,
    TimedOut,
    cancelled,
    describe,
    pooled_http_client,
    read_body,
    within,
)

__all__ = [
    "BLOCKING_QUERY_DEFAULT_WAIT",
    "ConsulUnavailable",
    "ResponseHeaders",
    "TreqConsul",
    "TreqHTTPClient",
    "consul_duration",
    "parse_duration",
]

# Consul holds a blocking query without a ``wait`` for five minutes.
BLOCKING_QUERY_DEFAULT_WAIT = 5 * 60.0

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")

# Failures that mean the agent could not be reached or did not answer: everything else is
# either an answer (py-consul maps it) or a bug of ours, which must not look like an outage.
_UNREACHABLE = (
    ConnectError,  # includes ConnectionRefusedError and TCPTimedOutError
    DNSLookupError,
    ConnectionLost,
    *WRAPPED,
)


class ConsulUnavailable(Exception):
    """The Consul agent could not be reached, or did not answer in time.

    ``cause`` (also ``__cause__``) is the underlying exception: a connection error, a lost
    connection, or a ``TimeoutError`` when the call timed out.
    """

    def __init__(self, url: str, cause: BaseException) -> None:
        super().__init__(f"Consul agent unavailable ({url}): {describe(cause)}")
        self.url = url
        self.cause = cause
        self.__cause__ = cause


def parse_duration(duration: str) -> float:
    """Seconds in a Go/Consul duration such as ``"5s"``, ``"100ms"`` or ``"1m30s"``.

    A string without any duration in it is 0.
    """
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION.findall(duration))


def consul_duration(seconds: float) -> str:
    """A duration as Consul reads it: ``1.0`` is ``"1s"``, ``0.25`` is ``"250ms"``."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


class ResponseHeaders(Mapping[str, str]):
    """Response headers as py-consul's callbacks read them: a case-insensitive str mapping.

    A header sent several times maps to its values joined with ``", "``.
    """

    def __init__(self, headers: Headers) -> None:
        self._names: dict[str, str] = {}
        self._values: dict[str, str] = {}
        for raw_name, raw_values in headers.getAllRawHeaders():
            name = raw_name.decode("latin-1")
            key = name.lower()
            values = [v.decode("latin-1") for v in raw_values]
            if key in self._values:
                values.insert(0, self._values[key])
            self._names.setdefault(key, name)
            self._values[key] = ", ".join(values)

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(self._names.values())

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"ResponseHeaders({dict(self.items())!r})"


_Callback = Callable[[Any], Any]
_Params = list[tuple[str, Any]] | None


class TreqHTTPClient(consul.base.HTTPClient):  # type: ignore[misc]
    """py-consul's transport over treq: ``get``/``put``/``delete``/``post`` return Deferreds.

    *timeout* bounds every call (connect, send, answer and body); a blocking query (``index``
    and ``wait`` parameters) gets ``wait + wait/16`` on top, since Consul adds up to wait/16 of
    jitter before it answers. *token*, when set, goes in ``X-Consul-Token`` on every request
    that does not carry one already (some py-consul endpoints do not pass the client's token).
    """

    def __init__(
        self,
        host: str,
        port: int,
        scheme: str,
        *,
        http: treq.client.HTTPClient,
        clock: IReactorTime,
        timeout: float,
        token: str | None = None,
        verify: bool | str = True,
        cert: object = None,
    ) -> None:
        super().__init__(host, port, scheme, verify, cert)
        self._http = http
        self._clock = clock
        self.timeout = timeout
        self.token = token
        self._in_flight: set[Deferred[Any]] = set()

    def request_timeout(self, params: _Params, override: float | None = None) -> float:
        """How long one call with these query parameters may take before it fails.

        *override* replaces the base timeout (py-consul's per-call ``connections_timeout``).
        """
        base = override if override else self.timeout
        query = dict(params or ())
        if "wait" in query:
            wait = parse_duration(str(query["wait"]))
        elif "index" in query:
            wait = BLOCKING_QUERY_DEFAULT_WAIT
        else:
            return base
        return base + wait + wait / 16

    def _headers(self, headers: Mapping[str, str] | None) -> Headers:
        result = Headers()
        for name, value in (headers or {}).items():
            result.addRawHeader(name, value)
        if self.token and not result.hasHeader("X-Consul-Token"):
            result.setRawHeaders("X-Consul-Token", [self.token])
        return result

    def _request(
        self,
        callback: _Callback,
        method: str,
        path: str,
        params: _Params = None,
        headers: Mapping[str, str] | None = None,
        data: str | bytes | None = None,
        raw: bool = False,
        connections_timeout: float | None = None,
    ) -> Deferred[Any]:
        uri = self.uri(path, params)
        body = data.encode("utf-8") if isinstance(data, str) else data
        timeout = self.request_timeout(params, connections_timeout)

        def answered(response: IResponse) -> Deferred[consul.base.Response]:
            def respond(content: bytes) -> consul.base.Response:
                text: str | bytes = content if raw else content.decode("utf-8", "replace")
                return consul.base.Response(response.code, ResponseHeaders(response.headers), text)

            return read_body(response).addCallback(respond)

        def failed(failure: Failure) -> Failure:
            error = failure.value
            if isinstance(error, TimedOut):
                raise ConsulUnavailable(uri, TimeoutError(str(error))) from error.cause
            if error is None:
                return failure
            if cancelled(error):
                raise CancelledError() from error
            if isinstance(error, _UNREACHABLE):
                raise ConsulUnavailable(uri, error) from error
            return failure

        def settled(result: object) -> object:
            self._in_flight.discard(d)
            return result

        d: Deferred[Any] = self._http.request(
            method,
            uri,
            headers=self._headers(headers),
            data=body or None,
            unbuffered=True,
            allow_redirects=False,
        )
        self._in_flight.add(d)
        d.addCallback(answered)
        within(d, timeout, self._clock)
        d.addBoth(settled)
        d.addErrback(failed)
        d.addCallback(callback)
        return d

    def get(
        self,
        callback: _Callback,
        path: str,
        params: _Params = None,
        headers: dict[str, str] | None = None,
        raw: bool = False,
        connections_timeout: float | None = None,
    ) -> Deferred[Any]:
        return self._request(
            callback, "GET", path, params, headers, raw=raw, connections_timeout=connections_timeout
        )

    def put(
        self,
        callback: _Callback,
        path: str,
        params: _Params = None,
        data: str | bytes = "",
        headers: dict[str, str] | None = None,
        connections_timeout: float | None = None,
    ) -> Deferred[Any]:
        return self._request(
            callback, "PUT", path, params, headers, data, connections_timeout=connections_timeout
        )

    def delete(
        self,
        callback: _Callback,
        path: str,
        params: _Params = None,
        data: str | bytes = "",
        headers: dict[str, str] | None = None,
        connections_timeout: float | None = None,
    ) -> Deferred[Any]:
        return self._request(
            callback, "DELETE", path, params, headers, data, connections_timeout=connections_timeout
        )

    def post(
        self,
        callback: _Callback,
        path: str,
        params: _Params = None,
        data: str | bytes = "",
        headers: dict[str, str] | None = None,
        connections_timeout: float | None = None,
    ) -> Deferred[Any]:
        return self._request(
            callback, "POST", path, params, headers, data, connections_timeout=connections_timeout
        )

    def cancel_all(self) -> None:
        """Cancel every call still waiting for its answer."""
        for d in list(self._in_flight):
            d.cancel()

    def close(self) -> Deferred[None]:
        self.cancel_all()
        return succeed(None)


class TreqConsul(consul.base.Consul):  # type: ignore[misc]
    """A py-consul client whose every call returns a Deferred (see the module docstring).

    *config* says where the agent is and which ACL token to send; it is authoritative: unlike
    py-consul's own constructor, ``CONSUL_HTTP_ADDR``/``CONSUL_HTTP_TOKEN`` are read where the
    config is made, not here. *reactor* (``IReactorTime`` and ``IReactorTCP``; the global
    reactor by default) times the calls and, unless *http* is given, makes the connections.
    *http* replaces the treq client (tests pass ``treq.testing.StubTreq``); then *reactor* is
    only the clock. *timeout* bounds every call, blocking queries get their wait on top.
    """

    def __init__(
        self,
        config: ConsulConfig,
        *,
        reactor: IReactorTime | None = None,
        http: treq.client.HTTPClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        assert reactor is not None
        self._reactor = reactor
        self._own_http: PooledHTTPClient | None = None
        if http is None:
            http = self._own_http = pooled_http_client(reactor, connect_timeout=timeout)
        self._treq = http
        self._timeout = timeout
        self.config = config
        # py-consul 1.8.0: Consul(host, port, token, scheme, consistency, dc, verify, cert);
        # it calls self.http_connect(host, port, scheme, verify, cert) and then takes its
        # token from CONSUL_HTTP_TOKEN before the argument, hence the assignment after it.
        super().__init__(
            host=config.host, port=config.port, token=config.token, scheme=config.scheme
        )
        self.token = config.token
        self.http.token = config.token

    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: object = None
    ) -> TreqHTTPClient:
        return TreqHTTPClient(
            host,
            port,
            scheme,
            http=self._treq,
            clock=self._reactor,
            timeout=self._timeout,
            verify=verify,
            cert=cert,
        )

    def close(self) -> Deferred[None]:
        """Cancel calls in flight and close the connection pool; fires when it is closed."""
        client: TreqHTTPClient = self.http
        client.cancel_all()
        if self._own_http is None:
            return succeed(None)
        return self._own_http.close()
