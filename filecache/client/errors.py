"""
What can go wrong in the client, one exception per kind of failure.
exits.py turns each into the message and exit status the user sees.
"""

from __future__ import annotations


class ServerError(Exception):
    """The server answered C{ERR <code> <message>}."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class NoMatch(Exception):
    """A NAME (a pattern, a folder, a file) that nothing on the server matches."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name}: matches nothing on the server")
        self.name = name


class BrokenReply(Exception):
    """The server broke the protocol: a malformed line, a wrong size or digest."""


class MalformedReply(BrokenReply):
    """A reply line that breaks the wire format (docs/protocol.md)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"malformed reply from server: {what}")


class ConnectionLostEarly(Exception):
    """The connection ended, or stalled past the timeout, before the reply was whole."""


class HandshakeFailed(ConnectionLostEarly):
    """TLS could not be set up: the certificate was refused.  Not worth retrying."""


class LocalError(Exception):
    """The download cannot be saved: unsafe name, existing file, disk error."""


class VersionChanged(Exception):
    """The file changed on the server between two parts of one download."""


class UsageError(Exception):
    """A command line that cannot be run."""
