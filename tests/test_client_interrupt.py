"""
Stopping the client, in memory: a cancelled request ends its connection and
fails with CancelledError (what a signal does to a download in progress),
an interrupted fetch is never retried, and a retry waits its doubling delay
on an injected Clock.  The signals themselves are tested on a real terminal
in test_cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import connected_client
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from filecache.client.download import Session, fetch
from filecache.client.errors import ConnectionLostEarly
from filecache.client.protocol import FileCacheClientProtocol
from filecache.client.retrying import Retrying, retry_delay

VERSION = b"2a-64-18ea3fdc92c71808"


class Sink:
    def begin(self, size: int, version: str) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass


def outcome(d: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def test_cancelling_the_request_in_flight_drops_the_connection() -> None:
    """
    Cancelling a GET mid-body fails it with CancelledError at once, aborts
    the connection (the rest of that reply cannot be told from the next),
    and the request queued behind it fails with ConnectionLostEarly.
    """
    proto, transport = connected_client()
    get = proto.get("f.bin", Sink())
    queued = outcome(proto.list())
    proto.dataReceived(b"OK 100 " + VERSION + b"\r\n" + b"x" * 10)
    seen = outcome(get)
    get.cancel()
    assert isinstance(seen[0], Failure) and seen[0].check(CancelledError)
    assert transport.disconnecting
    assert not proto.usable
    proto.connectionLost(Failure(ConnectionAborted()))
    assert isinstance(queued[0].value, ConnectionLostEarly)
    assert transport.value() == b"GET f.bin\r\n"


def test_cancelling_a_queued_request_leaves_the_one_in_flight() -> None:
    """A request still in the queue is just taken out: the one in flight completes, nothing else is sent."""
    proto, transport = connected_client()
    stats = outcome(proto.stats())
    listing = proto.list()
    seen = outcome(listing)
    listing.cancel()
    assert seen[0].check(CancelledError)
    proto.dataReceived(b"OK 1\r\nhits 1\r\n")
    assert stats == [[("hits", 1)]]
    assert transport.value() == b"STATS\r\n"
    assert not transport.disconnecting


class LostSession(Session):
    """A session whose every connection is lost at once."""

    def __init__(self) -> None:
        super().__init__(self._connect_lost)
        self.attempts = 0

    async def _connect_lost(self) -> FileCacheClientProtocol:
        self.attempts += 1
        raise ConnectionLostEarly("connection lost")


def test_an_interrupted_fetch_is_not_retried(tmp_path: Path) -> None:
    """
    With retries left but interrupted() true, a lost connection ends the
    fetch at once: no retry message, no wait, one attempt.
    """
    session = LostSession()
    retried: list[object] = []
    clock = Clock()
    d = Deferred.fromCoroutine(
        fetch(
            session,
            "f.bin",
            str(tmp_path / "out"),
            retrying=Retrying(clock, 5, lambda *a: retried.append(a), lambda: True),
        )
    )
    seen = outcome(d)
    assert seen[0].check(ConnectionLostEarly)
    assert retried == [] and session.attempts == 1
    assert clock.getDelayedCalls() == []
    assert not (tmp_path / "out").exists()


def test_without_an_interrupt_the_same_fetch_is_retried(tmp_path: Path) -> None:
    """
    The control case: the same lost connection is retried up to --retries,
    each retry announced with its delay and made once that much time has
    passed on the clock (0.25 s, then 0.5 s), not before.
    """
    session = LostSession()
    retried: list[tuple[Any, ...]] = []
    clock = Clock()
    d = Deferred.fromCoroutine(
        fetch(
            session,
            "f.bin",
            str(tmp_path / "out"),
            retrying=Retrying(clock, 2, lambda *a: retried.append(a)),
        )
    )
    seen = outcome(d)
    assert session.attempts == 1 and [a[2] for a in retried] == [0.25]
    clock.advance(0.24)
    assert session.attempts == 1
    clock.advance(0.01)
    assert session.attempts == 2 and [a[2] for a in retried] == [0.25, 0.5]
    clock.advance(0.49)
    assert session.attempts == 2 and seen == []
    clock.advance(0.01)
    assert seen[0].check(ConnectionLostEarly)
    assert len(retried) == 2 and session.attempts == 3
    assert clock.getDelayedCalls() == []


def test_retry_delays_double_from_a_quarter_second_up_to_five() -> None:
    """The one retry delay: 0.25 s before the first retry, doubling, never over 5 s."""
    assert [retry_delay(n) for n in range(1, 9)] == [0.25, 0.5, 1, 2, 4, 5, 5, 5]
    assert retry_delay(1000) == 5


def test_cancelling_a_fetch_while_it_waits_to_retry_stops_the_wait(tmp_path: Path) -> None:
    """
    A signal during the wait before a retry (the CLI cancels the work):
    the fetch fails with CancelledError at once, the timer is gone, and no
    retry is made.
    """
    session = LostSession()
    clock = Clock()
    d = Deferred.fromCoroutine(
        fetch(session, "f.bin", str(tmp_path / "out"), retrying=Retrying(clock, 3))
    )
    seen = outcome(d)
    assert session.attempts == 1 and len(clock.getDelayedCalls()) == 1
    d.cancel()
    assert seen[0].check(CancelledError)
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert session.attempts == 1


@pytest.mark.parametrize("signum, status", [(2, 130), (15, 143)])
def test_exit_status_of_a_signal(signum: int, status: int) -> None:
    """Interrupted by signal N exits 128 + N: 130 for SIGINT, 143 for SIGTERM."""
    from filecache.client.exits import exit_status
    from filecache.client.interrupt import Interrupted

    assert exit_status(Interrupted(signum)) == status
