"""
How the client ends: the one place that turns an exception into the line
said on stderr and the exit status.
"""

from __future__ import annotations

from typing import IO

from twisted.internet.error import ConnectError, DNSLookupError

from filecache.client.errors import (
    BrokenReply,
    ConnectionLostEarly,
    LocalError,
    NoMatch,
    ServerError,
    UsageError,
)
from filecache.client.interrupt import Interrupted
from filecache.client.output import say

EXIT_OK = 0
EXIT_SERVER_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_INTEGRITY = 4
EXIT_LOCAL = 5
EXIT_BROKEN_PIPE = 141
"""stdout was closed before all output was written (C{list | head -1}):
what a shell reports for a tool that SIGPIPE ended; nothing is printed."""
EXIT_SIGNAL_BASE = 128
"""Stopped by a signal: 128 + its number, as a shell reports it (130 for
SIGINT, 143 for SIGTERM)."""


def report(error: BaseException, err: IO[str]) -> None:
    """Say on C{err} why the client stops (nothing when stdout was closed: the reader left)."""
    if isinstance(error, BrokenPipeError):
        return
    say(err, describe(error))
    if isinstance(error, Interrupted):
        for line in error.unfinished:
            say(err, line)


def describe(error: BaseException) -> str:
    if isinstance(error, ServerError):
        text = {"not-found": "not found on the server"}.get(error.code)
        return text or f"server error {error.code}: {error.message}"
    if isinstance(error, BrokenReply):
        return f"integrity check failed: {error}"
    if isinstance(error, DNSLookupError):
        return "cannot resolve the host name"
    if isinstance(error, ConnectError):
        return f"cannot connect: {error}".rstrip(".")
    return str(error) or type(error).__name__


def exit_status(error: BaseException) -> int:
    """The one place that maps an exception to an exit status."""
    if isinstance(error, (ServerError, NoMatch)):
        return EXIT_SERVER_ERROR
    if isinstance(error, UsageError):
        return EXIT_USAGE
    if isinstance(error, (ConnectError, ConnectionLostEarly, DNSLookupError)):
        return EXIT_CONNECTION
    if isinstance(error, BrokenReply):
        return EXIT_INTEGRITY
    if isinstance(error, LocalError):
        return EXIT_LOCAL
    if isinstance(error, Interrupted):
        return EXIT_SIGNAL_BASE + error.signum
    if isinstance(error, BrokenPipeError):
        return EXIT_BROKEN_PIPE
    return EXIT_CONNECTION
