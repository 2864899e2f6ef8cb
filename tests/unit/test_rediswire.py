"""RedisWire's logic with an in-memory connection and a fake clock: RESP2 in and out, answers
in order, scripts by SHA-1, logging in first, and every way a call fails. The same client
against a real Redis: tests/integration/test_rediswire_redis.py."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from snet.config import RedisConfig
from snet.rediswire import (
    MalformedReply,
    RedisError,
    RedisUnavailable,
    RedisWire,
    Script,
    encode_command,
    parse_reply,
    redis_wire,
)
from snet.storage import is_unavailable

# --- RESP2 ----------------------------------------------------------------------------------


def test_a_command_is_an_array_of_bulk_strings() -> None:
    assert encode_command(["SET", "k", 42, b"\x00\r\n"]) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n42\r\n$3\r\n\x00\r\n\r\n"
    )
    with pytest.raises(TypeError, match="str, int or bytes"):
        encode_command(["SET", "k", 1.5])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        encode_command(["SET", "k", True])


def test_each_kind_of_reply_is_read() -> None:
    assert parse_reply(b":-12\r\n") == (-12, 6)
    assert parse_reply(b"+OK\r\n") == ("OK", 5)
    assert parse_reply(b"$3\r\na\r\n\r\n") == (b"a\r\n", 9)
    assert parse_reply(b"$-1\r\n") == (None, 5)
    assert parse_reply(b"*-1\r\n") == (None, 5)
    assert parse_reply(b"*2\r\n:1\r\n*1\r\n$1\r\nx\r\n") == ([1, [b"x"]], 19)
    error, _end = parse_reply(b"-NOSCRIPT No matching script\r\n") or (None, 0)
    assert isinstance(error, RedisError) and str(error) == "NOSCRIPT No matching script"


replies = st.recursive(
    st.integers() | st.binary() | st.none(),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=10,
)


def resp(value: Any) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(resp(item) for item in value)


@given(replies)
def test_a_reply_is_read_whole_and_never_from_part_of_it(value: Any) -> None:
    data = resp(value) + b":7\r\n"
    first = len(resp(value))
    assert parse_reply(data) == (value, first)
    assert parse_reply(data, first) == (7, len(data))
    for cut in range(first):
        assert parse_reply(data[:cut]) is None


def test_bytes_that_are_not_resp_are_refused() -> None:
    nested = b"*1\r\n" * 40 + b":1\r\n"
    for data in (b"?what\r\n", b":x\r\n", b"$abc\r\n", b"$-2\r\n", b"*-5\r\n", nested):
        with pytest.raises(MalformedReply):
            parse_reply(data)


def test_a_script_is_named_by_the_sha1_of_its_source() -> None:
    # The SHA-1 of "return 1", as Redis's SCRIPT LOAD answers it.
    assert Script("return 1").sha == "e0e1f9fabfc9d4800c877a703b823ac0578ff8db"


# --- the client -----------------------------------------------------------------------------


class FakeEndpoint:
    """Connects at once (or fails, or waits) to an in-memory transport the test reads."""

    def __init__(self) -> None:
        self.transports: list[StringTransport] = []
        self.protocols: list[Protocol] = []
        self.refuse: BaseException | None = None
        self.hold: Deferred[Protocol] | None = None

    def connect(self, factory: Factory) -> Deferred[Protocol]:
        if self.refuse is not None:
            return fail(self.refuse)
        protocol = factory.buildProtocol(None)
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        self.protocols.append(protocol)
        if self.hold is not None:
            return self.hold.addCallback(lambda _: protocol)
        return succeed(protocol)

    @property
    def written(self) -> bytes:
        return self.transports[-1].value()

    def answer(self, data: bytes) -> None:
        self.protocols[-1].dataReceived(data)


def wire_for(config: RedisConfig | None = None) -> tuple[RedisWire, FakeEndpoint, Clock]:
    endpoint, clock = FakeEndpoint(), Clock()
    config = config or RedisConfig("127.0.0.1", 6379)
    return RedisWire(config, endpoint, clock, timeout=2.0), endpoint, clock  # type: ignore[arg-type]


def outcome(d: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def test_calls_are_pipelined_on_one_connection_and_answered_in_order() -> None:
    wire, endpoint, _clock = wire_for()
    first, second = outcome(wire.call("GET", "a")), outcome(wire.call("INCR", "b"))
    assert len(endpoint.transports) == 1
    assert endpoint.written == encode_command(["GET", "a"]) + encode_command(["INCR", "b"])
    endpoint.answer(b"$1\r\nx\r\n:")
    assert first == [b"x"] and second == []
    endpoint.answer(b"3\r\n")
    assert second == [3]


def test_an_error_answer_fails_only_its_call() -> None:
    wire, endpoint, _clock = wire_for()
    bad, good = outcome(wire.call("NOPE")), outcome(wire.call("PING"))
    endpoint.answer(b"-ERR unknown command 'NOPE'\r\n+PONG\r\n")
    assert isinstance(bad[0], Failure) and bad[0].check(RedisError)
    assert good == ["PONG"]


def test_a_script_runs_by_sha_and_by_its_source_when_redis_does_not_know_it() -> None:
    wire, endpoint, _clock = wire_for()
    script = Script("return KEYS[1]")
    result = outcome(wire.eval(script, ["k"], [5]))
    assert endpoint.written == encode_command(["EVALSHA", script.sha, 1, "k", 5])
    endpoint.transports[-1].clear()
    endpoint.answer(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
    assert endpoint.written == encode_command(["EVAL", script.source, 1, "k", 5])
    endpoint.answer(b"$1\r\nk\r\n")
    assert result == [b"k"]


def test_a_script_that_fails_otherwise_is_not_run_again() -> None:
    wire, endpoint, _clock = wire_for()
    result = outcome(wire.eval(Script("error"), [], []))
    endpoint.transports[-1].clear()
    endpoint.answer(b"-ERR user_script:1: Script attempted to access nonexistent global\r\n")
    assert endpoint.written == b""
    assert result[0].check(RedisError)


def test_the_connection_logs_in_and_selects_its_database_before_any_call() -> None:
    wire, endpoint, _clock = wire_for(
        RedisConfig("127.0.0.1", 6379, db=3, password="secret", username="snet-chat")
    )
    result = outcome(wire.call("PING"))
    assert endpoint.written == encode_command(["AUTH", "snet-chat", "secret"]) + encode_command(
        ["SELECT", 3]
    )
    endpoint.answer(b"+OK\r\n+OK\r\n")
    assert endpoint.written.endswith(encode_command(["PING"]))
    endpoint.answer(b"+PONG\r\n")
    assert result == ["PONG"]


def test_a_password_without_a_user_logs_in_as_the_default_user() -> None:
    wire, endpoint, _clock = wire_for(RedisConfig("127.0.0.1", 6379, password="secret"))
    wire.call("PING")
    assert endpoint.written == encode_command(["AUTH", "secret"])


def test_a_refused_login_fails_the_waiting_calls_as_unavailable_in_redis_own_words() -> None:
    wire, endpoint, _clock = wire_for(RedisConfig("127.0.0.1", 6379, password="wrong"))
    result = outcome(wire.call("PING"))
    endpoint.answer(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
    assert result[0].check(RedisUnavailable) and "WRONGPASS" in str(result[0].value)
    assert is_unavailable(result[0].value), "a 503, not a bug"
    assert endpoint.transports[-1].disconnecting or endpoint.transports[-1].disconnected


def test_a_connection_that_cannot_be_made_fails_the_calls_as_unavailable() -> None:
    wire, endpoint, _clock = wire_for()
    endpoint.refuse = ConnectionRefusedError("Connection refused")
    first, second = outcome(wire.call("PING")), outcome(wire.call("PING"))
    for result in (first, second):
        assert result[0].check(RedisUnavailable)
        assert "cannot reach Redis" in str(result[0].value)
    endpoint.refuse = None
    third = outcome(wire.call("PING"))
    endpoint.answer(b"+PONG\r\n")
    assert third == ["PONG"], "the next call connects again"


def test_calls_that_come_while_connecting_wait_for_the_one_connection() -> None:
    wire, endpoint, _clock = wire_for()
    endpoint.hold = Deferred()
    first, second = outcome(wire.call("GET", "a")), outcome(wire.call("GET", "b"))
    assert len(endpoint.transports) == 1 and endpoint.written == b""
    endpoint.hold.callback(None)
    endpoint.answer(b"$1\r\n1\r\n$1\r\n2\r\n")
    assert (first, second) == ([b"1"], [b"2"])


def test_a_lost_connection_fails_its_calls_and_the_next_call_makes_a_new_one() -> None:
    wire, endpoint, _clock = wire_for()
    waiting = outcome(wire.call("GET", "a"))
    endpoint.protocols[-1].connectionLost(Failure(ConnectionResetError("reset")))
    assert waiting[0].check(RedisUnavailable)
    later = outcome(wire.call("GET", "a"))
    assert len(endpoint.transports) == 2
    endpoint.answer(b"$-1\r\n")
    assert later == [None]


def test_a_call_unanswered_in_time_fails_and_its_late_answer_goes_to_nobody() -> None:
    wire, endpoint, clock = wire_for()
    slow = outcome(wire.call("GET", "slow"))
    clock.advance(1.0)
    endpoint.answer(b"$4\r\nla")  # Redis is answering, slowly: the connection is kept
    clock.advance(1.0)
    assert slow[0].check(RedisUnavailable) and "within 2 s" in str(slow[0].value)
    assert not endpoint.transports[-1].disconnecting
    after = outcome(wire.call("GET", "after"))
    endpoint.answer(b"te\r\n$4\r\nmine\r\n")
    assert after == [b"mine"]


def test_a_connection_that_says_nothing_at_all_is_dropped_when_a_call_gives_up() -> None:
    wire, endpoint, clock = wire_for()
    stuck = outcome(wire.call("GET", "a"))
    clock.advance(2.0)
    assert stuck[0].check(RedisUnavailable)
    assert endpoint.transports[-1].disconnecting, "aborted: a frozen or vanished peer"
    endpoint.protocols[-1].connectionLost(Failure(ConnectionResetError("aborted")))
    again = outcome(wire.call("GET", "a"))
    assert len(endpoint.transports) == 2
    endpoint.answer(b"$1\r\nb\r\n")
    assert again == [b"b"]


def test_a_caller_that_stops_waiting_drops_only_its_own_call() -> None:
    wire, endpoint, clock = wire_for()
    gone, other = wire.call("GET", "gone"), outcome(wire.call("GET", "other"))
    gone.addErrback(lambda _: None)
    clock.advance(0.1)
    gone.cancel()  # its client went away, or its own shorter timeout
    assert not endpoint.transports[-1].disconnecting
    endpoint.answer(b"$4\r\ngone\r\n$5\r\nother\r\n")
    assert other == [b"other"]


def test_a_script_redis_forgot_is_run_again_within_the_one_timeout() -> None:
    wire, endpoint, clock = wire_for()
    result = outcome(wire.eval(Script("return 1"), [], []))
    clock.advance(1.5)
    endpoint.answer(b"-NOSCRIPT No matching script.\r\n")
    assert result == []
    clock.advance(0.5)
    assert result[0].check(RedisUnavailable) and "within 2 s" in str(result[0].value)


def test_a_waiter_that_cancels_another_when_the_connection_fails_breaks_nothing() -> None:
    wire, endpoint, _clock = wire_for()
    endpoint.hold = Deferred()
    first, second = wire.call("PING"), wire.call("PING")
    third = outcome(wire.call("PING"))
    first.addErrback(lambda _: second.cancel())
    second.addErrback(lambda _: None)
    endpoint.hold.errback(ConnectionRefusedError("refused"))
    assert third[0].check(RedisUnavailable), "every waiter is answered at once"


def test_a_call_made_right_after_one_timed_out_on_a_silent_connection_goes_on_a_new_one() -> None:
    wire, endpoint, clock = wire_for()
    first = outcome(wire.call("PING"))
    endpoint.answer(b"+PONG\r\n")
    assert first == ["PONG"]
    clock.advance(0.5)
    after: list[Any] = []
    stuck = wire.call("INCR", "frozen")  # Redis freezes: no answer ever
    stuck.addErrback(lambda _: wire.call("PING").addBoth(after.append))
    clock.advance(1.5)  # the watchdog looks: not yet 2 s of silence, it looks again at 2.5
    clock.advance(0.5)  # the call's timeout first: the caller calls again at once
    assert len(endpoint.transports) == 2, "the silent connection was dropped first"
    endpoint.answer(b"+PONG\r\n")
    assert after == ["PONG"]


def test_a_login_unanswered_in_time_fails_the_calls_and_drops_the_connection() -> None:
    wire, endpoint, clock = wire_for(RedisConfig("127.0.0.1", 6379, password="secret"))
    waiting = outcome(wire.call("PING"))
    clock.advance(2.0)
    assert waiting[0].check(RedisUnavailable)
    assert endpoint.transports[-1].disconnecting


def test_an_answer_nobody_asked_for_drops_the_connection() -> None:
    wire, endpoint, _clock = wire_for()
    first = outcome(wire.call("PING"))
    endpoint.answer(b"+PONG\r\n+SURPRISE\r\n")
    assert first == ["PONG"]
    assert endpoint.transports[-1].disconnecting


def test_the_wire_to_a_config_connects_through_the_reactor_it_is_given() -> None:
    reactor = MemoryReactorClock()
    wire = redis_wire(RedisConfig("127.0.0.1", 6380), reactor, timeout=1.0)
    assert reactor.tcpClients == [], "nothing before the first call"
    wire.call("PING")
    reactor.advance(0)
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("127.0.0.1", 6380)]


def test_disconnect_while_connecting_gives_the_connection_up() -> None:
    wire, endpoint, _clock = wire_for()
    endpoint.hold = Deferred()
    waiting = outcome(wire.call("PING"))
    assert outcome(wire.disconnect()) == [None]
    assert endpoint.hold.called, "the connect was cancelled"
    assert waiting[0].check(RedisUnavailable)


def test_disconnect_while_logging_in_drops_the_new_connection() -> None:
    wire, endpoint, _clock = wire_for(RedisConfig("127.0.0.1", 6379, password="secret"))
    waiting = outcome(wire.call("PING"))
    wire.disconnect()
    assert endpoint.transports[-1].disconnecting
    assert waiting[0].check(RedisUnavailable)


def test_after_disconnect_calls_fail_and_nothing_is_connected() -> None:
    wire, endpoint, _clock = wire_for()
    wire.call("PING")
    endpoint.answer(b"+PONG\r\n")
    closed = outcome(wire.disconnect())
    assert endpoint.transports[-1].disconnecting
    endpoint.protocols[-1].connectionLost(Failure(ConnectionResetError("closed")))
    assert closed == [None]
    refused = outcome(wire.call("PING"))
    assert refused[0].check(RedisUnavailable) and len(endpoint.transports) == 1
