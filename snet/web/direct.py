"""Direct routes: the few hot routes that ``ObservedResource`` runs itself, without Klein.

Klein's work around a handler (binding werkzeug's map to the request, matching it, adapting
the request, four Deferreds and their callbacks, the rendering of the result) cost about as
much as Twisted's whole HTTP parsing and answer: measured alone, a trivial JSON route cost
about 185 us of CPU through Klein against 115 us as a plain Twisted resource
(docs/performance.md, step 13). For the handlers an app names (``ServiceApp.
direct_endpoints``: the dialog sends on both services), ``ObservedResource`` matches the
request itself and calls the handler as Klein would, with the route's arguments, and
answers its failures with the app's error handler.

Only an exact match is direct: the route's method, and a path of plain characters equal to
the route's template, each ``<name>`` one segment without a percent escape. Anything else
(an escape, a trailing slash, ``HEAD``, a method the route does not take, any other route)
goes to Klein as before, so redirects, 404s, 405s and the decoding of escapes stay Klein's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from attrs import frozen
from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

_PARAMETER = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>")
"""A route parameter with werkzeug's default converter; others are refused."""

_SEGMENT = rb"([A-Za-z0-9._~!$&'()*+,;=:@-]+)"
"""One path segment that percent-decoding would not change: RFC 3986's path characters
without ``%``, and never ``/``."""


@frozen
class DirectRoute:
    """One direct route: *method* on the paths *pattern* matches in full, answered by
    *handler* (``handler(request, **arguments)``); *template* names it in metrics and logs."""

    method: bytes
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
    def of(
        cls,
        app: Klein,
        handlers: Callable[[str], Callable[..., Any]],
        endpoints: Iterable[str],
        errors: Callable[[IRequest, Failure], Any],
    ) -> DirectRoutes:
        """The routes of Klein *app* whose endpoints are in *endpoints*, each answered by
        ``handlers(endpoint)`` (the bound method); *errors* answers their failures.

        :raises ValueError: for an endpoint *app* has no route for, or a route that cannot
            be direct (see ``compile_template``).
        """
        wanted = set(endpoints)
        routes: dict[bytes, list[DirectRoute]] = {}
        for rule in app.url_map.iter_rules():
            if rule.endpoint not in wanted:
                continue
            pattern, names = compile_template(rule.rule)
            handler = handlers(rule.endpoint)
            for method in sorted(rule.methods or ()):
                if method in ("HEAD", "OPTIONS"):
                    continue
                encoded = method.encode("ascii")
                route = DirectRoute(encoded, rule.rule, pattern, names, handler)
                routes.setdefault(encoded, []).append(route)
            wanted.discard(rule.endpoint)
        if wanted:
            raise ValueError(f"no route for the direct endpoints {sorted(wanted)}")
        return cls({method: tuple(found) for method, found in routes.items()}, errors)

    def match(self, method: bytes, path: bytes) -> tuple[DirectRoute, dict[str, str]] | None:
        """The direct route *method* and *path* are an exact match for, and its arguments."""
        for route in self.by_method.get(method, ()):
            arguments = route.match(path)
            if arguments is not None:
                return route, arguments
        return None


def _no_errors(request: IRequest, failure: Failure) -> Any:
    raise AssertionError("no direct route, so no error to answer")
