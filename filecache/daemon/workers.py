"""
Using every core: the parent process listens, then starts worker processes
that adopt its listening socket, so the kernel spreads connections over them.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReadDescriptor,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:]+[+-]\d{4} ")

# A worker that dies sooner than this after its start will most likely die
# the same way again (a bad install, a broken option), so each such death in
# a row doubles the wait before the next start.  procmon's 1 s is too short
# here: a worker's Python and Twisted take about a second just to start.
HEALTHY_AFTER = 10.0
# 1 s, 2 s, 4 s ... 60 s.  No jitter: the workers are our own local
# processes, there is no crowd of clients to spread out.
RESTART_DELAY = backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0, jitter=lambda: 0.0)


def address_family(port: IListeningPort) -> int:
    """The socket family of a listening port (from its address type)."""
    host = port.getHost()
    kind = type(host).__name__
    if kind == "UNIXAddress":
        return socket.AF_UNIX
    if kind == "IPv6Address":
        return socket.AF_INET6
    return socket.AF_INET


@implementer(IReadDescriptor)
class _ParentWatch:
    """
    Reads the worker's standard input, a pipe whose other end only the
    parent holds: when it closes, the parent is gone, and so should we be.
    """

    _log = Logger()

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def fileno(self) -> int:
        return 0

    # Returns the exception that ends the descriptor, as Twisted's own
    # doRead methods do and as the reactor expects; IReadDescriptor's
    # annotation says Failure instead.
    def doRead(self) -> ConnectionDone | None:  # type: ignore[override]
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        return None if data else ConnectionDone()

    def connectionLost(self, reason: Failure) -> None:
        self._log.warn("the parent process is gone; stopping")
        if self._reactor.running:
            self._reactor.stop()

    def logPrefix(self) -> str:
        return "parent-watch"


class AdoptedPortService(Service):
    """
    Serves C{factory} on a listening socket inherited from the parent, for
    as long as the parent lives.
    """

    def __init__(
        self, reactor: Any, fd: int, family: int, factory: IProtocolFactory, *, proxied: bool = False
    ) -> None:
        self._reactor = reactor
        self._fd = fd
        self._family = family
        self._factory = factory
        self._proxied = proxied
        self._port: Any = None

    def startService(self) -> None:
        super().startService()
        if self._proxied:
            # A PROXY protocol port: the parent's haproxy: endpoint wrapped
            # its listener; the worker wraps the one it adopts the same way.
            # (The endpoint adopts a duplicate and closes ours; it fires at once.)
            endpoint = proxyEndpoint(AdoptedStreamServerEndpoint(self._reactor, self._fd, self._family))
            endpoint.listen(self._factory).addCallback(self._adopted)
        else:
            self._port = self._reactor.adoptStreamPort(self._fd, self._family, self._factory)
            # adoptStreamPort works on a duplicate; ours is no longer needed.
            os.close(self._fd)
        self._reactor.addReader(_ParentWatch(self._reactor))

    def _adopted(self, port: Any) -> None:
        self._port = port

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()  # type: ignore[no-any-return]
        return None


class _Worker(ProcessProtocol):
    """One worker process: relays its log lines, tells the pool when it ends."""

    _log = Logger()

    def __init__(self, pool: WorkerPool, number: int, started: float) -> None:
        self._pool = pool
        self.number = number
        self.started = started
        self.ended: Deferred[None] = Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        self._relay(data)

    def errReceived(self, data: bytes) -> None:
        self._relay(data)

    def _relay(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            # The worker's own time stamp is dropped: ours is on the line.
            text = _STAMP.sub("", line.decode("utf-8", "replace")).strip()
            if text:
                self._log.info("worker {number}: {line}", number=self.number, line=text)

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self._relay(b"\n")
        self._pool.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """
    Listens on C{endpoints} itself, then keeps C{count} worker processes
    serving the same socket (restarting any that dies, later each time one
    dies soon after its start), and stops them with SIGTERM so each drains
    its own connections.

    @param worker_args: the plugin's arguments for a worker, to which
        C{--inherit-fd FD:FAMILY} is added (C{FD:FAMILY:proxy} for a
        PROXY protocol port, as C{proxied} says of each endpoint).
    @param restart_delay: the seconds to wait before starting a dead
        worker's successor, given how many deaths of that worker number in
        a row came less than C{healthy_after} seconds after a start, not
        counting this one (0 if this one came later).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        endpoints: IStreamServerEndpoint | Sequence[IStreamServerEndpoint],
        factory: IProtocolFactory | Sequence[IProtocolFactory],
        count: int,
        worker_args: Sequence[str],
        stop_timeout: float,
        restart_delay: Callable[[int], float] = RESTART_DELAY,
        healthy_after: float = HEALTHY_AFTER,
        proxied: Sequence[bool] = (),
    ) -> None:
        self._reactor = reactor
        self._endpoints = list(endpoints) if isinstance(endpoints, Sequence) else [endpoints]
        # One factory for every endpoint, or one each (a PROXY port's differs).
        self._factories = list(factory) if isinstance(factory, Sequence) else [factory] * len(self._endpoints)
        self._proxied = list(proxied) or [False] * len(self._endpoints)
        self._count = count
        self._worker_args = list(worker_args)
        self._stop_timeout = stop_timeout
        self._restart_delay = restart_delay
        self._healthy_after = healthy_after
        self._ports: list[Any] = []
        self._workers: dict[int, tuple[_Worker, Any]] = {}
        # By worker number: deaths soon after the start, in a row; restarts due.
        self._quick_deaths: dict[int, int] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        listens = [endpoint.listen(factory) for endpoint, factory in zip(self._endpoints, self._factories)]
        d = DeferredList(listens, fireOnOneErrback=True, consumeErrors=True)
        d.addCallbacks(self._listening_all, self._cannot_listen_any)

    def _listening_all(self, results: list[tuple[bool, Any]]) -> None:
        self._listening([port for _, port in results])

    def _cannot_listen_any(self, reason: Failure) -> None:
        # DeferredList wraps the first listen's failure in a FirstError.
        self._cannot_listen(getattr(reason.value, "subFailure", reason))

    def _cannot_listen(self, reason: Failure) -> None:
        self._log.failure("cannot listen", reason)
        if self._reactor.running:
            self._reactor.stop()

    def _listening(self, ports: list[Any]) -> None:
        self._ports = ports
        for number in range(1, self._count + 1):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        inherited = []
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        for port, proxied in zip(self._ports, self._proxied):
            fd = port.fileno()
            inherited += ["--inherit-fd", f"{fd}:{address_family(port)}" + (":proxy" if proxied else "")]
            child_fds[fd] = fd
        args = [
            sys.executable,
            "-m",
            "twisted",
            "--log-format=text",
            "filecache",
            *self._worker_args,
            *inherited,
            "--worker-index",
            str(number),
        ]
        worker = _Worker(self, number, self._reactor.seconds())
        process = self._reactor.spawnProcess(
            worker,
            sys.executable,
            args,
            env=dict(os.environ),
            childFDs=child_fds,
        )
        self._workers[number] = (worker, process)
        self._log.info("started worker {number} (pid {pid})", number=number, pid=process.pid)

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        number = worker.number
        self._workers.pop(number, None)
        if self._stopping:
            return
        if self._reactor.seconds() - worker.started < self._healthy_after:
            in_a_row = self._quick_deaths.get(number, 0)
            self._quick_deaths[number] = in_a_row + 1
        else:
            in_a_row = self._quick_deaths[number] = 0
        delay = self._restart_delay(in_a_row)
        self._log.warn(
            "worker {number} ended unexpectedly ({why}); starting another in {delay:g} s",
            number=number,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        self._restarts[number] = self._reactor.callLater(delay, self._respawn, number)

    def _respawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        if not self._stopping and self._ports and number not in self._workers:
            self._spawn(number)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        waits: list[Deferred[Any]] = []
        for port in self._ports:
            waits.append(port.stopListening() or succeed(None))
        ended = []
        for worker, process in list(self._workers.values()):
            ended.append(worker.ended)
            try:
                process.signalProcess("TERM")
            except Exception:  # noqa: BLE001, S110 - it may have ended already
                pass

        def kill_stragglers() -> None:
            for _, process in list(self._workers.values()):
                try:
                    process.signalProcess("KILL")
                except Exception:  # noqa: BLE001, S110 - it may have ended already
                    pass

        if ended:
            call = self._reactor.callLater(self._stop_timeout, kill_stragglers)
            all_ended = DeferredList(ended)

            def done(result: object) -> object:
                if call.active():
                    call.cancel()
                return result

            waits.append(all_ended.addBoth(done))
        return DeferredList(waits)
