"""HTTP plumbing shared by snet's Klein apps, one module per job; import from the module:

- ``snet.web.requests``: request ids, headers, status and JSON answers;
- ``snet.web.errors``: the error codes, the ``ApiError`` family and ``error_response``, the
  one place exceptions become JSON error answers;
- ``snet.web.inputs``: what clients send: JSON bodies, ids, query arguments, texts;
- ``snet.web.draining``: ``InFlight``, the requests a stopping service waits for;
- ``snet.web.metrics``: ``HTTPMetrics``, the Prometheus metrics of an app;
- ``snet.web.service``: ``ServiceApp`` (the base of both apps), ``ObservedResource``,
  ``/health`` and ``/metrics``, and ``uncancellable``;
- ``snet.web.direct``: ``DirectRoutes``, the hot routes ``ObservedResource`` runs without
  Klein (an app names them in ``direct_endpoints``);
- ``snet.web.limits``: ``LimitedSite``, the Site every listener uses: body size, header and
  body deadlines, a connection cap, no form parsing, no version in ``Server``, no access log.

An app built on it looks like this::

    class SomeAPI(ServiceApp):
        app = RoutedKlein()

        @app.handle_errors(Exception)
        def _error(self, request: IRequest, failure: Failure) -> bytes:
            return error_response(request, failure, DOMAIN_ERRORS)

``ServiceApp.resource()`` wraps the app in ``ObservedResource``, which runs around every
request, matched or not: it gives the request its id, counts it in flight (for draining), and
at its end records its metrics and logs it once; it runs the handlers an app names in
``direct_endpoints`` itself, for an exact match of their route, and hands every other request
to Klein. Handlers raise ``ApiError`` subclasses for
client and availability errors, stores raise their own exceptions that each app's table
turns into ``ApiError``; everything else becomes a logged 500 whose body never carries a
traceback.
"""
