"""
Carrying out a command: list (of everything, or of what NAMEs match) and
stats over one connection; get as a mirror over parallel lanes, or to stdout.
"""

from __future__ import annotations

from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from filecache.client.arguments import Invocation
from filecache.client.connection import Dialer, connect
from filecache.client.download import Session
from filecache.client.exits import EXIT_OK, EXIT_SERVER_ERROR, describe
from filecache.client.interrupt import Stop
from filecache.client.lanes import PIPELINE_DEPTH
from filecache.client.localdigests import RunBlocking
from filecache.client.mirror import Mirror
from filecache.client.output import print_listing, print_stats, say
from filecache.client.progress import TqdmProgress
from filecache.client.retrying import Retrying
from filecache.client.selection import Wanted, select
from filecache.client.tostdout import binary_stream, resolve_one, send_to_stdout


async def run(
    reactor: Any,
    inv: Invocation,
    out: IO[str],
    err: IO[str],
    stop: Stop | None = None,
    run_blocking: RunBlocking | None = None,
) -> int:
    """Carry out C{inv}; return the exit status.  Errors propagate."""
    stop = stop or Stop()
    if inv.command != "get":
        return await _list_or_stats(reactor, inv, out, err)
    if inv.to_stdout:
        return await _to_stdout(reactor, inv, out, err, stop)
    if run_blocking is None:

        def run_blocking(work: Any) -> Deferred[Any]:
            return deferToThreadPool(reactor, reactor.getThreadPool(), work)

    dial = Dialer(reactor, inv, err, pipeline=PIPELINE_DEPTH)
    return await Mirror(reactor, inv, out, err, stop, dial, run_blocking).run()


async def _list_or_stats(reactor: Any, inv: Invocation, out: IO[str], err: IO[str]) -> int:
    status = EXIT_OK
    client = await connect(reactor, inv, err)
    try:
        if inv.command == "list":
            rows = await client.list(inv.cached)
            if inv.names:
                chosen = select([Wanted(name, inv.recursive) for name in inv.names], rows)
                rows = chosen.rows
                for want in chosen.unmatched:
                    say(err, f"{want.text}: matches nothing on the server")
                    status = EXIT_SERVER_ERROR
            print_listing(rows, inv.json, out)
        else:
            print_stats(await client.stats(), inv.json, out)
    finally:
        await client.quit()
    return status


async def _to_stdout(reactor: Any, inv: Invocation, out: IO[str], err: IO[str], stop: Stop) -> int:
    session = Session(Dialer(reactor, inv, err))
    # tqdm's disable: True never draws, False always, None only on a terminal.
    no_bar = True if inv.quiet or inv.progress in ("plain", "none") else False if inv.progress == "bars" else None

    def retrying_said(name: str, error: BaseException, delay: float) -> None:
        say(err, f"{name}: {describe(error)}; retrying in {delay:g} s")

    retrying = Retrying(reactor, inv.retries, retrying_said, lambda: stop.requested)
    try:
        path = await resolve_one(session, inv.names[0], inv.recursive, retrying)
        stream = binary_stream(out)
        await send_to_stdout(session, path, stream, TqdmProgress(err, disable=no_bar), retrying)
        stream.flush()
    finally:
        await session.close()
    return EXIT_OK
