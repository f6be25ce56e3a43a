"""
Downloading a shared file: the connection downloads go over, and the fetch
loop that reconnects and resumes a lost transfer, then verifies and saves.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.python.failure import Failure

from filecache.client.destination import Folders, destination, make_parents, remove_empty_folders
from filecache.client.errors import (
    BrokenReply,
    ConnectionLostEarly,
    LocalError,
    ServerError,
    VersionChanged,
)
from filecache.client.localdigests import Stamp
from filecache.client.partfile import PartFile
from filecache.client.progress import Progress
from filecache.client.protocol import FileCacheClientProtocol
from filecache.client.readers import Download
from filecache.client.retrying import RETRYABLE, Retrying

Connect = Callable[[], Awaitable[FileCacheClientProtocol]]
_T = TypeVar("_T")


class Session:
    """
    The connection downloads go over: made on first use and made again
    after it is lost (through a load balancer, maybe to another server).
    """

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._client: FileCacheClientProtocol | None = None
        # While a connection is being made: the others waiting for it.
        self._waiting: list[Deferred[FileCacheClientProtocol]] | None = None

    async def client(self) -> FileCacheClientProtocol:
        """The connection, made (once, for every caller waiting) if there is none usable."""
        if self._client is not None and self._client.usable:
            return self._client
        if self._waiting is not None:
            waiter: Deferred[FileCacheClientProtocol] = Deferred()
            self._waiting.append(waiter)
            return await waiter
        self._waiting = []
        try:
            self._client = await self._connect()
        except BaseException as e:
            waiting, self._waiting = self._waiting, None
            for other in waiting:
                if not other.called:
                    other.errback(Failure(e))
            raise
        waiting, self._waiting = self._waiting, None
        for other in waiting:
            if not other.called:
                other.callback(self._client)
        return self._client

    async def close(self) -> None:
        if self._client is not None and self._client.usable:
            await self._client.quit()


async def fetch(
    session: Session,
    path: str,
    folder: str,
    *,
    retrying: Retrying,
    force: bool = False,
    replacing: Stamp | None = None,
    progress: Callable[[], Progress] = Progress,
    folders: Folders | None = None,
    absent: bool = False,
) -> tuple[str, Download]:
    """
    Download shared C{path} into C{folder}; return the saved file's name and
    what was received last.

    A lost connection is retried as C{retrying} says, resuming from the
    partial file when the server still has the same
    version; a resumed file is checked against the server's whole-file
    SHA-256 before it is moved into place.  Folders made for a download
    that fails are removed again when empty (a kept partial file keeps its
    folder); with C{folders}, they are noted there instead, for the caller
    to remove once no download under way needs them.

    With C{replacing}, the file under the final name may be replaced if
    it still has that stamp (L{Local.OUTDATED}: the older version this
    client saved).  C{absent}: the caller has just found nothing under the
    final name, so it is not looked at again here (the move into place
    still refuses anything that appeared there since).

    @raise LocalError: unsafe name, existing destination without C{force},
        someone else's file under our temporary names, or a local error.
    @raise ServerError: the server answered an error.
    @raise BrokenReply: the bytes failed the size or digest check.
    @raise ConnectionLostEarly: the connection was lost past the retries.
    """
    final = destination(folder, path)
    if not absent and os.path.lexists(final) and not force and replacing is None:
        raise LocalError(f"{final} exists (use --force to overwrite)")
    created = make_parents(folder, path, folders)
    if folders is not None:
        # The caller removes them, when no other download needs them.
        folders.made.extend(created)
        created = []
    try:
        if not absent and os.path.isdir(final):
            raise LocalError(f"{final} is a folder")
        sink = PartFile(final, path, progress(), force=force, replacing=replacing)
        sink.claim()
        result = await _fetch_with_retries(session, path, sink, retrying)
        sink.commit()
    except BaseException:
        remove_empty_folders(created)
        raise
    return final, result


async def ask(
    session: Session,
    request: Callable[[FileCacheClientProtocol], Deferred[_T]],
    name: str,
    retrying: Retrying,
) -> _T:
    """
    Send C{request} (a HASH, a LIST) over C{session} and return its reply,
    reconnecting after a lost connection as L{fetch} does.
    """
    attempt = 0
    while True:
        try:
            client = await session.client()
            return await request(client)
        except (ConnectionLostEarly, ConnectError) as e:
            attempt += 1
            await retrying.wait(e, attempt, name)


async def _fetch_with_retries(
    session: Session,
    path: str,
    sink: PartFile,
    retrying: Retrying,
) -> Download:
    attempt = 0
    restarted = False
    while True:
        try:
            client = await session.client()
            return await _fetch_once(client, path, sink, fresh=restarted)
        except RETRYABLE as e:
            sink.keep()
            attempt += 1
            if isinstance(e, VersionChanged) and not retrying.allows(e, attempt):
                raise ConnectionLostEarly(str(e)) from None
            await retrying.wait(e, attempt, path)
            continue
        except BrokenReply as e:
            if not restarted and sink.have() and retrying.allows(e, attempt + 1):
                # What an earlier attempt left may be bad: start over once.
                sink.discard()
                restarted = True
                attempt += 1
                continue
            sink.discard()
            raise
        except (LocalError, ServerError):
            sink.discard()
            raise
        except BaseException:
            sink.keep()
            raise


async def _fetch_once(
    client: FileCacheClientProtocol, path: str, sink: PartFile, fresh: bool
) -> Download:
    info = None if fresh else sink.resumable()
    have = sink.have() if info is not None else 0
    if info is None or have == 0:
        sink.prepare(0, None)
        return await client.get(path, sink)
    current = await client.hash(path)
    if current.version != info.version or have > current.size:
        # The file changed since the partial file was written: start over.
        sink.prepare(0, None)
        return await client.get(path, sink)
    sink.prepare(have, current.version)
    await client.get(path, sink, have)
    sink.keep()
    if sink.digest() != current.digest:
        raise BrokenReply("SHA-256 of the resumed file does not match the server's")
    return Download(current.size, current.version, current.digest)
