"""
Producers that stream a reply body to a transport: bytes already in memory,
or a range of an open file, with the send buffer bounded whatever the size.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IPullProducer,
    IPushProducer,
)
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from filecache.daemon.sockets import buffer_empty, direct_socket, set_cork, unwrapped

SLICE = 64 * 1024
"""Bytes handed to a transport per write when we go through Twisted's buffer."""

FILE_CHUNK = 64 * 1024
"""Bytes read from disk per FileSender step."""

TURN = 8 * 1024 * 1024
"""Most bytes one connection sends per reactor turn on the direct path, so
that one fast reader does not starve the others."""


class TransferFailed(Exception):
    """
    The body could not be sent whole: the file ended early or the peer left.

    @ivar sent: body bytes that went out before it stopped.
    """

    def __init__(self, message: str, sent: int = 0) -> None:
        super().__init__(message)
        self.sent = sent


@dataclass(frozen=True)
class TransferResult:
    """
    What a finished body transfer saw.

    @ivar sent: body bytes sent.
    @ivar digest: SHA-256 hex of the bytes sent, when they were hashed.
    @ivar data: the bytes sent, when they were collected.
    """

    sent: int
    digest: str | None = None
    data: bytes | bytearray | None = None


@implementer(IPullProducer)
class _DirectSender:
    """
    Sends straight to the socket, called by Twisted only when its own buffer
    is empty, so nothing written through the transport before (a status
    line, earlier pipelined replies) can be overtaken.
    """

    def __init__(
        self,
        transport: Any,
        length: int,
        step: Callable[[int, int], int],
        done: Deferred[int],
        on_progress: Callable[[], object],
    ) -> None:
        self._transport = transport
        self._length = length
        self._step = step
        self._on_progress = on_progress
        self._sent = 0
        self._done: Deferred[int] | None = done
        self._started = False

    def resumeProducing(self) -> None:
        if not self._started:
            # registerProducer calls us at once, while the transport may
            # still hold unsent bytes: then wait for its doWrite to call
            # again.  With nothing queued (the head went straight to the
            # socket), go on now: a reactor turn saved per reply.
            self._started = True
            if not buffer_empty(self._transport):
                self._transport.startWriting()
                return
        budget = TURN
        try:
            while self._sent < self._length and budget > 0:
                count = min(self._length - self._sent, budget)
                n = self._step(self._sent, count)
                if n <= 0:
                    return self._finish(TransferFailed("file ended early", self._sent))
                self._sent += n
                budget -= n
        except BlockingIOError:
            self._transport.startWriting()
            return
        except OSError as e:
            return self._finish(TransferFailed(f"send failed: {e.strerror or e}", self._sent))
        finally:
            if budget < TURN:
                self._on_progress()
        if self._sent < self._length:
            self._transport.startWriting()
            return
        self._finish(None)

    def _finish(self, error: Exception | None) -> None:
        done, self._done = self._done, None
        self._transport.unregisterProducer()
        if done is not None:
            if error is None:
                done.callback(self._sent)
            else:
                done.errback(Failure(error))

    def stopProducing(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done.errback(Failure(TransferFailed("connection lost", self._sent)))


@implementer(IPushProducer)
class _SliceSender:
    """Writes slices of in-memory bytes until the transport pushes back."""

    def __init__(
        self,
        consumer: IConsumer,
        data: bytes | bytearray | memoryview,
        start: int,
        done: Deferred[int],
        on_progress: Callable[[], object],
    ) -> None:
        self._on_progress = on_progress
        self._consumer = consumer
        self._data = data
        self._pos = start
        self._start = start
        self._paused = False
        self._done: Deferred[int] | None = done

    def resumeProducing(self) -> None:
        self._paused = False
        self._on_progress()
        end = len(self._data)
        while not self._paused and self._pos < end and self._done is not None:
            piece = self._data[self._pos : self._pos + SLICE]
            self._pos += len(piece)
            self._consumer.write(piece if isinstance(piece, bytes) else bytes(piece))
        if self._pos >= end and self._done is not None:
            done, self._done = self._done, None
            self._consumer.unregisterProducer()
            done.callback(end - self._start)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done.errback(Failure(TransferFailed("connection lost", self._pos - self._start)))


class _BoundedReader:
    """A file-like view of C{length} bytes of C{fd} from C{start}, by pread."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        self._fd = fd
        self._pos = start
        self._left = length

    def read(self, size: int) -> bytes:
        if self._left <= 0:
            return b""
        try:
            chunk = os.pread(self._fd, min(size, self._left), self._pos)
        except OSError:
            # Reads as the end of the file: the transfer comes up short
            # and fails, rather than raising into the reactor.
            return b""
        self._pos += len(chunk)
        self._left -= len(chunk)
        return chunk


def _nothing() -> None:
    pass


def send_memory(
    transport: Any,
    data: bytes | bytearray | memoryview,
    start: int,
    *,
    end: int | None = None,
    on_progress: Callable[[], object] = _nothing,
) -> Deferred[int]:
    """
    Stream C{data[start:end]} to C{transport}.  Fires with the bytes sent, or
    fails with L{TransferFailed}.  C{on_progress} is called whenever the
    peer has taken more bytes.
    """
    done: Deferred[int] = Deferred()
    if end is not None and end < len(data):
        # A range: a view, so the slices below copy only what they send.
        data = memoryview(data)[:end]
    length = len(data) - start
    sock = direct_socket(transport)
    if sock is not None:
        transport = unwrapped(transport)
        view = memoryview(data)

        def step(sent: int, count: int) -> int:
            pos = start + sent
            return sock.send(view[pos : pos + count])

        sender = _DirectSender(transport, length, step, done, on_progress)
        transport.registerProducer(sender, False)
    else:
        producer = _SliceSender(transport, data, start, done, on_progress)
        transport.registerProducer(producer, True)
        producer.resumeProducing()
    return done


def send_file(
    transport: Any,
    fd: int,
    start: int,
    length: int,
    *,
    digest_known: bool,
    collect: bool,
    on_progress: Callable[[], object] = _nothing,
) -> Deferred[TransferResult]:
    """
    Stream C{length} bytes of C{fd} from C{start} to C{transport}.

    With C{digest_known} on a plain socket the kernel copies the file with
    C{sendfile} and nothing is hashed; otherwise the bytes are read here,
    hashed, and (with C{collect}) kept for the cache.  Fails with
    L{TransferFailed} if fewer than C{length} bytes could be sent.
    """
    sock = direct_socket(transport)
    if digest_known and not collect and sock is not None and CAN_SENDFILE:
        return _sendfile(unwrapped(transport), sock, fd, start, length, on_progress)
    return _read_and_send(transport, fd, start, length, collect, on_progress)


CAN_SENDFILE = hasattr(os, "sendfile")


def sendfile_now(out: int, fd: int, start: int, length: int, most: int) -> int:
    """
    Bytes C{start} to C{start + length} of C{fd} to the socket C{out} by
    C{sendfile}, as many as it takes now, up to C{most}; how many went.
    Whatever stopped it (a full socket, an error, the file's end) is met
    again, and reported, by the producer that sends the rest.
    """
    sent = 0
    try:
        while sent < length and sent < most:
            n = os.sendfile(out, fd, start + sent, min(length - sent, most - sent))
            if n <= 0:
                break
            sent += n
    except OSError:
        pass
    return sent


def _sendfile(
    transport: Any,
    sock: socket.socket,
    fd: int,
    start: int,
    length: int,
    on_progress: Callable[[], object],
) -> Deferred[TransferResult]:
    done: Deferred[int] = Deferred()
    out = sock.fileno()
    # Corked while the kernel copies the file, as nginx's tcp_nopush does:
    # only full segments leave, whatever each sendfile call adds, and the
    # end of the transfer pushes the last one.  A large body moves about a
    # quarter faster so (each segment costs the sender the loopback's
    # receive work too).
    corked = set_cork(sock, True)

    def uncork(result: object) -> object:
        if corked:
            set_cork(sock, False)
        return result

    def step(sent: int, count: int) -> int:
        return os.sendfile(out, fd, start + sent, count)

    sender = _DirectSender(transport, length, step, done, on_progress)
    done.addBoth(uncork)
    transport.registerProducer(sender, False)
    return done.addCallback(lambda sent: TransferResult(sent))



def _read_and_send(
    transport: Any,
    fd: int,
    start: int,
    length: int,
    collect: bool,
    on_progress: Callable[[], object],
) -> Deferred[TransferResult]:
    hasher = hashlib.sha256()
    # The bytes for the cache go into one buffer of the file's size, made
    # once: no list of chunks and no joined copy beside it.
    kept = bytearray(length) if collect else None
    counted = [0]

    def see(chunk: bytes) -> bytes:
        # FileSender reads the next chunk only once the last one was taken.
        on_progress()
        hasher.update(chunk)
        position = counted[0]
        counted[0] += len(chunk)
        if kept is not None:
            kept[position : position + len(chunk)] = chunk
        return chunk

    def finished(_: object) -> TransferResult:
        if counted[0] != length:
            raise TransferFailed("file ended early", counted[0])
        return TransferResult(counted[0], hasher.hexdigest(), kept)

    def stopped(reason: Failure) -> Failure:
        # FileSender fails with a bare Exception when the consumer stops it.
        if not reason.check(TransferFailed):
            return Failure(TransferFailed("connection lost", counted[0]))
        return reason

    sender = FileSender()
    sender.CHUNK_SIZE = FILE_CHUNK
    d: Deferred[object] = sender.beginFileTransfer(
        _BoundedReader(fd, start, length), transport, see
    )
    return d.addCallback(finished).addErrback(stopped)
