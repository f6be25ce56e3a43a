"""
Carrying out a command: list and stats over one connection, get over a
session that reconnects, one file after another, reporting per-file errors.
"""

from __future__ import annotations

import os
import shlex
from typing import IO, Any

from twisted.internet.error import ConnectError

from filecache import wire
from filecache.client.arguments import Invocation
from filecache.client.connection import connect
from filecache.client.destination import destination
from filecache.client.download import Session, fetch
from filecache.client.errors import (
    BrokenReply,
    ConnectionLostEarly,
    LocalError,
    ServerError,
)
from filecache.client.exits import EXIT_OK, describe, exit_status
from filecache.client.interrupt import Interrupted, Stop
from filecache.client.output import print_listing, print_stats, say
from filecache.client.partfile import part_names
from filecache.client.progress import TqdmProgress


async def run(
    reactor: Any, inv: Invocation, out: IO[str], err: IO[str], stop: Stop | None = None
) -> int:
    """Carry out C{inv}; return the exit status.  Errors propagate."""
    if inv.command != "get":
        client = await connect(reactor, inv, err)
        try:
            if inv.command == "list":
                print_listing(await client.list(inv.cached), inv.json, out)
            else:
                print_stats(await client.stats(), inv.json, out)
        finally:
            await client.quit()
        return EXIT_OK
    session = Session(lambda: connect(reactor, inv, err))
    try:
        return await get_all(session, inv, out, err, reactor, stop or Stop())
    finally:
        await session.close()


async def get_all(
    session: Session, inv: Invocation, out: IO[str], err: IO[str], reactor: Any, stop: Stop
) -> int:
    """
    Fetch every name; a per-file error is reported and the rest go on.

    @raise Interrupted: once C{stop} is requested, saying what is unfinished.
    """
    status = EXIT_OK
    # tqdm's None: a bar only when stderr is a terminal.
    no_bar = True if inv.quiet else None

    def retrying(name: str, error: BaseException, delay: float) -> None:
        say(err, f"{name}: {describe(error)}; retrying in {delay:g} s")

    for index, name in enumerate(inv.names):
        try:
            if stop.signum is not None:
                raise Interrupted(stop.signum)
            saved, _result = await fetch(
                session,
                name,
                inv.folder,
                force=inv.force,
                progress=lambda: TqdmProgress(err, disable=no_bar),
                retries=inv.retries,
                clock=reactor,
                on_retry=retrying,
                interrupted=lambda: stop.requested,
            )
        except BaseException as e:
            if stop.signum is not None:
                raise Interrupted(stop.signum, unfinished(inv, index)) from None
            if not isinstance(e, (ServerError, LocalError, BrokenReply, ConnectionLostEarly, ConnectError)):
                raise
            say(err, f"{name}: {describe(e)}")
            status = status or exit_status(e)
            if isinstance(e, (ConnectionLostEarly, ConnectError)):
                # Retries are spent: the server is out of reach for the rest too.
                return status
            continue
        out.write(f"{wire.printable(saved)}\n")
    return status


def unfinished(inv: Invocation, index: int) -> list[str]:
    """What is left undone when C{inv.names[index]} was being fetched."""
    name = inv.names[index]
    lines = [f"{name}: not finished"]
    try:
        part, _ = part_names(destination(inv.folder, name))
    except LocalError:
        part = ""
    if part and os.path.isfile(part):
        lines[0] += f"; {part} is kept: the same get resumes it"
    rest = inv.names[index + 1 :]
    if rest:
        lines.append(f"not started ({len(rest)}): {shlex.join(rest)}")
    return lines
