"""
C{filecache-client}, the console script: parse the command line, run it on
the reactor with SIGINT and SIGTERM handled, exit with its status.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from filecache.client.arguments import Invocation, build_parser
from filecache.client.commands import run
from filecache.client.errors import UsageError
from filecache.client.exits import (
    EXIT_BROKEN_PIPE,
    EXIT_CONNECTION,
    EXIT_SIGNAL_BASE,
    EXIT_USAGE,
    exit_status,
    report,
)
from filecache.client.interrupt import Interrupted, Stop
from filecache.client.output import say


def drive(reactor: Any, inv: Invocation, out: IO[str], err: IO[str]) -> int:
    """
    Run C{inv} on C{reactor} until it is done or a signal stops it; return
    the exit status.  SIGINT and SIGTERM are ours, not the reactor's: its
    own handlers would stop the reactor under a download, which then looked
    like a lost connection, was "retried" and exited 0.
    """
    stop = Stop()
    outcome: list[int] = []

    def finished(result: object) -> None:
        if isinstance(result, Failure):
            error = result.value
            assert error is not None  # a Failure always holds its exception
            if stop.signum is not None and not isinstance(error, Interrupted):
                error = Interrupted(stop.signum)
            report(error, err)
            outcome.append(exit_status(error))
        else:
            assert isinstance(result, int)
            outcome.append(result)
        reactor.stop()

    def start() -> None:
        work = Deferred.fromCoroutine(run(reactor, inv, out, err, stop))
        stop.watch(work)
        work.addBoth(finished)

    def on_signal(signum: int, frame: object) -> None:
        # Python runs this between two bytecodes of whatever the reactor is
        # doing: hand the request to the reactor's own loop.
        reactor.callFromThread(stop.request, signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        reactor.callWhenRunning(start)
        reactor.run(installSignalHandlers=False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcome[0] if outcome else EXIT_CONNECTION


def load_reactor(tls: bool) -> Any:
    """
    The global reactor, imported (with the endpoints module) without
    pyOpenSSL unless C{tls}: Twisted's TCP and endpoints modules import it,
    and through it cryptography and service_identity, whenever it is
    installed, which took about 40 ms of the client's 0.25 s start
    (measured 2026-12-02) for TLS a run without --tls never uses.
    """
    if tls or "OpenSSL" in sys.modules or "twisted.internet.tcp" in sys.modules:
        from twisted.internet import reactor

        return reactor
    # A None entry makes "import OpenSSL" raise ImportError, the case
    # Twisted handles as "no TLS here"; it is taken out again at once.
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]
    try:
        from twisted.internet import endpoints, reactor  # noqa: F401
    finally:
        del sys.modules["OpenSSL"]
    return reactor


def main(argv: Sequence[str] | None = None) -> None:
    """The console script."""
    try:
        status = _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before drive() took SIGINT over (while starting up).
        say(sys.stderr, "interrupted by SIGINT")
        raise SystemExit(EXIT_SIGNAL_BASE + signal.SIGINT) from None
    exit_at_once(status)


def exit_at_once(status: int) -> NoReturn:
    """
    End the process with C{status} now, stdout and stderr flushed.  The run
    is over: every file it wrote is closed, the reactor has stopped and
    joined its threads.  Python's own exit would then take apart every
    module and object of the run, which took about 0.1 s of a 0.5 s re-run
    of the benchmark's mirror (measured 2026-12-02).
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # nothing more can be said there
    os._exit(status)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        inv = Invocation(args)
    except UsageError as e:
        say(sys.stderr, str(e))
        raise SystemExit(EXIT_USAGE) from None

    reactor = load_reactor(inv.tls)
    # What the imports made lives until the end: out of the collector's way.
    gc.freeze()
    status = drive(reactor, inv, sys.stdout, sys.stderr)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = status or EXIT_BROKEN_PIPE
    if status == EXIT_BROKEN_PIPE:
        # What is still buffered cannot be written; without this, Python's
        # flush at exit would print "Exception ignored ... Broken pipe".
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return status
