"""The local stack (python -m snet.stack) as a person sees it."""

from __future__ import annotations

from snet.stack import worth_showing


def test_the_local_stack_shows_what_a_person_needs_and_hides_probes() -> None:
    probe = "2026-12-02T17:40:26+0000 [snet.web#debug] [abc] GET /health 200 in 1.1 ms"
    request = "2026-12-02T17:40:26+0000 [snet.web#info] [abc] POST /login 200 in 9.0 ms"
    factory = "2026-12-02T17:40:26+0000 [_HTTP11ClientFactory#info] Starting factory <x>"
    assert not worth_showing(probe) and not worth_showing(factory)
    assert worth_showing(request)
    assert worth_showing("Traceback (most recent call last):")
    assert not worth_showing("    2026-12-02T17:40:24Z [INFO]  agent: Synced node info", "consul")
    assert worth_showing("    2026-12-02T17:40:24Z [WARN]  agent.server.raft: timeout", "consul")
