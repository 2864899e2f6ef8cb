"""Direct routes: the few hot routes that ``ObservedResource`` runs itself, without Klein.

Klein's work around a handler (binding werkzeug's map to the request, matching it, adapting
the request, four Deferreds and their callbacks, the rendering of the result) cost about as
much as Twisted's whole HTTP parsing and answer: measured alone over loopback
(``bench/httpstack.py``, docs/performance.md, step 13), a trivial JSON route costs 220-227
us of the server's CPU per request through Klein and 156-158 us run directly. For the
handlers an app names (``ServiceApp.direct_endpoints``: the dialog sends of both services),
``ObservedResource`` matches the request itself and calls the handler Klein registered, with
the route's arguments, and answers a failure with the first of the app's Klein error
handlers that takes it, as Klein would.

Only an exact match is direct: the route's method, and a path of plain characters equal to
the route's template, each ``<name>`` one segment without a percent escape. Anything else
(an escape, a trailing slash, ``HEAD``, a method the route does not take, any other route)
goes to Klein as before, so redirects, 404s, 405s and the decoding of escapes stay Klein's.
A route some other route of the app could shadow (``/items/special`` beside
``/items/<name>``, which werkzeug prefers) cannot be direct. Unlike Klein, a direct route
does not look at the ``Host`` header (werkzeug refuses a host name IDNA cannot encode).

A direct handler answers bytes (or str, or None for an empty body), as snet's handlers do;
Klein's other answers (resources, renderables) are not for direct routes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from attrs import frozen
from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from snet.web.errors import error_response

_PARAMETER = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>")
"""A route parameter with werkzeug's default converter; others are refused."""

_SEGMENT = rb"([A-Za-z0-9._~!$&'()*+,;=:@-]+)"
"""One path segment that percent-decoding would not change: RFC 3986's path characters
without ``%``, and never ``/``."""


@frozen
class DirectRoute:
    """One direct route: the paths *pattern* matches in full (for the methods it is listed
    under in ``DirectRoutes``), answered by *handler* (``handler(request, **arguments)``);
    *template* names it in metrics and logs."""

    template: str
    pattern: re.Pattern[bytes]
    names: tuple[str, ...]
    handler: Callable[..., Any]

    def match(self, path: bytes) -> dict[str, str] | None:
        """The route's arguments if *path* is exactly one of its paths, else None."""
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        return {
            name: value.decode("ascii")
            for name, value in zip(self.names, found.groups(), strict=True)
        }


def compile_template(template: str) -> tuple[re.Pattern[bytes], tuple[str, ...]]:
    """The pattern of a route *template* such as ``/v1/dialogs/<peer_id>/messages`` and
    the names of its parameters.

    :raises ValueError: for a template with a converter (``<int:id>``) or an unclosed ``<``.
    """
    literals: list[str] = []
    names: list[str] = []
    at = 0
    for parameter in _PARAMETER.finditer(template):
        literals.append(template[at : parameter.start()])
        names.append(parameter.group(1))
        at = parameter.end()
    literals.append(template[at:])
    if any("<" in part or ">" in part for part in literals):
        raise ValueError(f"route {template!r}: only <name> parameters can be direct")
    pattern = _SEGMENT.join(re.escape(part.encode("ascii")) for part in literals)
    return re.compile(pattern), tuple(names)


@frozen
class DirectRoutes:
    """The direct routes of one app, by method, and the app's error handler."""

    by_method: dict[bytes, tuple[DirectRoute, ...]]
    errors: Callable[[IRequest, Failure], Any]

    @classmethod
    def none(cls) -> DirectRoutes:
        """No direct route: every request goes to Klein."""
        return cls({}, _no_errors)

    @classmethod
    def of(cls, app: Klein, endpoints: Iterable[str]) -> DirectRoutes:
        """The routes of Klein *app* (bound to its instance, as ``instance.app`` is) whose
        endpoints are in *endpoints*, each answered by the handler Klein registered for it
        and failing as Klein would (``answer_failure``).

        :raises ValueError: for an endpoint *app* has no route for, a route without methods,
            or a route that cannot be direct (``compile_template``; one another route of
            *app* could shadow).
        """
        wanted = set(endpoints)
        rules = list(app.url_map.iter_rules())
        routes: dict[bytes, list[DirectRoute]] = {}
        for rule in rules:
            if rule.endpoint not in wanted:
                continue
            if not rule.methods:
                raise ValueError(f"route {rule.rule!r}: a direct route names its methods")
            pattern, names = compile_template(rule.rule)
            for other in rules:
                shared = other.methods is None or other.methods & rule.methods
                if other is not rule and shared and pattern.fullmatch(_example_path(other.rule)):
                    raise ValueError(f"route {rule.rule!r}: {other.rule!r} could shadow it")
            route = DirectRoute(
                rule.rule, pattern, names, partial(_run_endpoint, app, rule.endpoint)
            )
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                routes.setdefault(method.encode("ascii"), []).append(route)
            wanted.discard(rule.endpoint)
        if wanted:
            raise ValueError(f"no route for the direct endpoints {sorted(wanted)}")
        return cls(
            {method: tuple(found) for method, found in routes.items()},
            partial(answer_failure, app),
        )

    def match(self, method: bytes, path: bytes) -> tuple[DirectRoute, dict[str, str]] | None:
        """The direct route *method* and *path* are an exact match for, and its arguments."""
        for route in self.by_method.get(method, ()):
            arguments = route.match(path)
            if arguments is not None:
                return route, arguments
        return None


def _no_errors(request: IRequest, failure: Failure) -> Any:
    raise AssertionError("no direct route, so no error to answer")


def _run_endpoint(app: Klein, endpoint: str, request: IRequest, **arguments: str) -> Any:
    """Klein's own call of *endpoint*'s handler (a ``RoutedKlein`` would also remember the
    rule for the metrics' label, which a direct route knows)."""
    return Klein.execute_endpoint(app, endpoint, request, **arguments)


def answer_failure(app: Klein, request: IRequest, failure: Failure) -> Any:
    """*failure*'s answer from the first of *app*'s error handlers that takes it, in the
    order Klein tries them; the JSON 500 of ``snet.web.errors`` if none does."""
    for exceptions, handler in app._error_handlers:
        if failure.check(*exceptions):  # type: ignore[no-untyped-call]
            return app.execute_error_handler(handler, request, failure)
    return error_response(request, failure)


def _example_path(template: str) -> bytes:
    """A path *template* matches, each parameter given as ``1``: what a direct route must not
    match unless it is its own."""
    return re.sub(r"<[^>]*>", "1", template).encode("utf-8", "replace")
