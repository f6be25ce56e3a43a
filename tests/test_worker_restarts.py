"""
--workers in memory: a dead worker's successor starts after a delay that
doubles with each death soon after a start, and is back to 1 s once a
worker has lived; no process is started and no real time passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IListeningPort, IProcessProtocol, IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from filecache.daemon.workers import WorkerPool


class _Process:
    """A worker process that exists only in memory; L{die} ends it."""

    def __init__(self, protocol: IProcessProtocol, pid: int, args: Sequence[str]) -> None:
        self.protocol = protocol
        self.pid = pid
        self.args = list(args)
        self.signals: list[str] = []

    def signalProcess(self, signal: str) -> None:
        self.signals.append(signal)

    def die(self) -> None:
        self.protocol.processEnded(Failure(ProcessTerminated(signal=9)))


class _Reactor(MemoryReactorClock):
    """A memory reactor and clock that also "spawns" processes, keeping them in L{spawned}."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[_Process] = []

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> _Process:
        process = _Process(processProtocol, 1000 + len(self.spawned), args)
        processProtocol.makeConnection(process)  # type: ignore[arg-type]
        self.spawned.append(process)
        return process


class _Port:
    """The parent's listening port, as far as the pool looks at it."""

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 5000)

    def fileno(self) -> int:
        return 7

    def stopListening(self) -> None:
        return None


class _Endpoint:
    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return succeed(_Port())  # type: ignore[arg-type]


def start_pool(reactor: _Reactor, count: int = 1) -> WorkerPool:
    """A started pool of C{count} workers on C{reactor}."""
    pool = WorkerPool(reactor, _Endpoint(), Factory(), count, ["--dir", "shared"], stop_timeout=5)  # type: ignore[arg-type]
    pool.startService()
    assert len(reactor.spawned) == count
    return pool


def worker_index(process: _Process) -> str:
    return process.args[process.args.index("--worker-index") + 1]


def restarted_after(reactor: _Reactor, delay: float) -> _Process:
    """
    Assert that the last worker, which has just died, gets its successor
    C{delay} seconds later and not sooner; the successor.
    """
    spawned = len(reactor.spawned)
    reactor.advance(delay - 0.001)
    assert len(reactor.spawned) == spawned, f"restarted before {delay} s"
    reactor.advance(0.001)
    assert len(reactor.spawned) == spawned + 1, f"not restarted after {delay} s"
    return reactor.spawned[-1]


def test_a_worker_that_keeps_dying_at_once_waits_twice_as_long_each_time() -> None:
    """A worker dying right after each start is restarted after 1, 2, 4 ... s, never more than 60 s."""
    reactor = _Reactor()
    start_pool(reactor)
    process = reactor.spawned[0]
    for delay in (1, 2, 4, 8, 16, 32, 60, 60, 60):
        process.die()
        process = restarted_after(reactor, delay)
        assert worker_index(process) == "1"


def test_a_worker_that_has_lived_is_restarted_after_1_s_again() -> None:
    """
    A death 10 s or more after the start counts as a worker that has lived:
    its successor starts after 1 s, as does the next one if it dies at once,
    and the doubling starts over from there; 9.9 s does not count.
    """
    reactor = _Reactor()
    start_pool(reactor)
    process = reactor.spawned[0]
    for delay in (1, 2, 4):
        process.die()
        process = restarted_after(reactor, delay)
    reactor.advance(9.9)
    process.die()
    process = restarted_after(reactor, 8)
    reactor.advance(10)
    process.die()
    process = restarted_after(reactor, 1)
    for delay in (1, 2, 4):
        process.die()
        process = restarted_after(reactor, delay)


def test_each_worker_has_its_own_delay() -> None:
    """One worker dying over and over does not make another wait: each number keeps its own count."""
    reactor = _Reactor()
    start_pool(reactor, count=2)
    first, second = reactor.spawned
    for delay in (1, 2, 4):
        first.die()
        first = restarted_after(reactor, delay)
        assert worker_index(first) == "1"
    second.die()
    second = restarted_after(reactor, 1)
    assert worker_index(second) == "2"


def test_stopping_cancels_a_restart_that_is_due() -> None:
    """A restart still waiting when the pool stops is cancelled: nothing is started, no call is left."""
    reactor = _Reactor()
    pool = start_pool(reactor, count=2)
    first, second = reactor.spawned
    first.die()
    stopped: list[Any] = []
    pool.stopService().addCallback(stopped.append)
    assert second.signals == ["TERM"] and not stopped
    second.die()
    assert stopped
    assert reactor.getDelayedCalls() == []
    reactor.advance(120)
    assert len(reactor.spawned) == 2


def test_the_log_says_when_the_successor_starts() -> None:
    """The warning about a dead worker says why it ended and in how many seconds the next one starts."""
    reactor = _Reactor()
    start_pool(reactor)
    with capturedLogs() as events:
        reactor.spawned[0].die()
        restarted_after(reactor, 1).die()
    warnings = [formatEvent(event) for event in events if "ended unexpectedly" in formatEvent(event)]
    assert warnings == [
        f"worker 1 ended unexpectedly (A process has ended with a probable error condition: "
        f"process ended by signal 9.); starting another in {delay} s"
        for delay in (1, 2)
    ]
