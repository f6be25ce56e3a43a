"""
Downloading a shared file: the connection downloads go over, and the fetch
loop that reconnects and resumes a lost transfer, then verifies and saves.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

from twisted.application.internet import backoffPolicy
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from filecache.client.destination import destination, make_parents, remove_empty_folders
from filecache.client.errors import (
    BrokenReply,
    ConnectionLostEarly,
    HandshakeFailed,
    LocalError,
    ServerError,
    VersionChanged,
)
from filecache.client.partfile import PartFile
from filecache.client.progress import Progress
from filecache.client.protocol import FileCacheClientProtocol
from filecache.client.readers import Download

Connect = Callable[[], Awaitable[FileCacheClientProtocol]]


class Session:
    """
    The connection downloads go over: made on first use and made again
    after it is lost (through a load balancer, maybe to another server).
    """

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._client: FileCacheClientProtocol | None = None

    async def client(self) -> FileCacheClientProtocol:
        if self._client is None or not self._client.usable:
            self._client = await self._connect()
        return self._client

    async def close(self) -> None:
        if self._client is not None and self._client.usable:
            await self._client.quit()


RETRYABLE = (ConnectionLostEarly, ConnectError, VersionChanged)


# No jitter: one client retrying one file has no herd to spread, and the
# delay it announces ("retrying in 0.25 s") is the delay it waits.
_DOUBLING = backoffPolicy(initialDelay=0.25, maxDelay=5.0, factor=2.0, jitter=lambda: 0.0)


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retry number C{attempt} (1, 2, ...): 0.25, doubling, at most 5."""
    return _DOUBLING(attempt - 1)


async def fetch(
    session: Session,
    path: str,
    folder: str,
    *,
    clock: IReactorTime,
    force: bool = False,
    progress: Callable[[], Progress] = Progress,
    retries: int = 0,
    on_retry: Callable[[str, BaseException, float], None] = lambda *a: None,
    interrupted: Callable[[], bool] = lambda: False,
) -> tuple[str, Download]:
    """
    Download shared C{path} into C{folder}; return the saved file's name and
    what was received last.

    A lost connection is retried up to C{retries} times (none once
    C{interrupted()} is true), each after L{retry_delay} on C{clock},
    resuming from the partial file when the server still has the same
    version; a resumed file is checked against the server's whole-file
    SHA-256 before it is moved into place.  Folders made for a download that fails are removed again
    when empty (a kept partial file keeps its folder).

    @raise LocalError: unsafe name, existing destination without C{force},
        someone else's file under our temporary names, or a local error.
    @raise ServerError: the server answered an error.
    @raise BrokenReply: the bytes failed the size or digest check.
    @raise ConnectionLostEarly: the connection was lost past the retries.
    """
    final = destination(folder, path)
    if os.path.lexists(final) and not force:
        raise LocalError(f"{final} exists (use --force to overwrite)")
    created = make_parents(folder, path)
    try:
        if os.path.isdir(final):
            raise LocalError(f"{final} is a folder")
        sink = PartFile(final, path, progress(), force=force)
        sink.claim()
        result = await _fetch_with_retries(
            session, path, sink, retries, clock, on_retry, interrupted
        )
        sink.commit()
    except BaseException:
        remove_empty_folders(created)
        raise
    return final, result


async def _fetch_with_retries(
    session: Session,
    path: str,
    sink: PartFile,
    retries: int,
    clock: IReactorTime,
    on_retry: Callable[[str, BaseException, float], None],
    interrupted: Callable[[], bool],
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
            if attempt > retries or isinstance(e, HandshakeFailed) or interrupted():
                if isinstance(e, VersionChanged):
                    raise ConnectionLostEarly(str(e)) from None
                raise
            delay = retry_delay(attempt)
            on_retry(path, e, delay)
            await deferLater(clock, delay)
            continue
        except BrokenReply:
            if not restarted and sink.have() and attempt < retries and not interrupted():
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
