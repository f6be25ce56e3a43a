"""
`get NAME -o -`: one file's bytes written to stdout as they come, no partial
file; a lost connection resumes at the byte it stopped at, and the whole
file's SHA-256 is still checked (against bytes that already went out).
"""

from __future__ import annotations

import hashlib
from typing import IO, Any, BinaryIO

from twisted.internet.error import ConnectError

from filecache.client.download import Session, ask
from filecache.client.errors import BrokenReply, NoMatch, UsageError, VersionChanged
from filecache.client.progress import Progress
from filecache.client.readers import Download
from filecache.client.retrying import RETRYABLE, Retrying
from filecache.client.selection import Wanted, select


class StdoutSink:
    """A L{BodySink} that writes to a binary stream and hashes all it wrote, across resumes."""

    def __init__(self, stream: BinaryIO, name: str, progress: Progress) -> None:
        self._stream = stream
        self._name = name
        self._progress = progress
        self.written = 0
        self.version: str | None = None
        self.hasher = hashlib.sha256()

    def begin(self, size: int, version: str) -> None:
        if self.version is not None and version != self.version:
            raise VersionChanged(f"{self._name} changed on the server")
        self.version = version
        self._progress.start(self._name, self.written + size, self.written)

    def write(self, data: bytes) -> None:
        self._stream.write(data)
        self.written += len(data)
        self.hasher.update(data)
        self._progress.advance(len(data))


def _went_out(error: BaseException, sink: StdoutSink) -> BrokenReply:
    return BrokenReply(
        f"{error}; the {sink.written:,} bytes already written to stdout are not the "
        "server's file: discard them"
    )


async def resolve_one(session: Session, name: str, recursive: bool, retrying: Retrying) -> str:
    """
    The one shared path C{name} stands for: itself when bare, else the one
    file it matches.

    @raise NoMatch: nothing matches.
    @raise UsageError: more than one file matches.
    """
    want = Wanted(name, recursive)
    if want.plain:
        return name
    rows = await ask(session, lambda client: client.list(), "the listing", retrying)
    chosen = select([want], rows)
    if chosen.unmatched:
        raise NoMatch(name)
    if len(chosen.rows) != 1:
        raise UsageError(f"-o - writes one file, and {name} matches {len(chosen.rows):,}")
    return chosen.rows[0].path


async def send_to_stdout(
    session: Session,
    path: str,
    stream: BinaryIO,
    progress: Progress,
    retrying: Retrying,
) -> Download:
    """
    Write shared C{path} to C{stream}.  A first reply that comes whole is
    checked against its END digest; after a lost connection the rest is
    asked for from the byte reached, if the server still has that version,
    and the whole stream is checked against HASH's SHA-256.

    @raise BrokenReply: a digest did not match, or the file changed after
        bytes went out; the message says they did.
    """
    sink = StdoutSink(stream, path, progress)
    attempt = 0
    try:
        while True:
            try:
                client = await session.client()
                if sink.version is None:
                    return await client.get(path, sink)
                whole = await client.hash(path)
                if whole.version != sink.version or whole.size < sink.written:
                    raise BrokenReply(f"{path} changed on the server during the transfer")
                await client.get(path, sink, sink.written)
                if sink.hasher.hexdigest() != whole.digest:
                    raise BrokenReply("SHA-256 of the bytes written does not match the server's")
                return Download(whole.size, whole.version, whole.digest)
            except VersionChanged as e:
                raise BrokenReply(str(e)) from None
            except (*RETRYABLE, ConnectError) as e:
                attempt += 1
                await retrying.wait(e, attempt, path)
    except BrokenReply as e:
        if sink.written:
            raise _went_out(e, sink) from None
        raise
    finally:
        progress.close()


def binary_stream(out: IO[str]) -> BinaryIO:
    """The bytes beneath a text stdout (C{sys.stdout.buffer}); flushed of text first."""
    out.flush()
    stream: Any = getattr(out, "buffer", None)
    if stream is None:
        raise UsageError("-o -: this stdout takes no bytes")
    result: BinaryIO = stream
    return result
