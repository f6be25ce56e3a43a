"""
Linux inotify, read without the reactor: one non-blocking descriptor, watches
added and removed by path, and its queue drained on demand.  Our own reader,
because Twisted's (L{twisted.internet.inotify}) drops the queue-overflow
event and closes its whole descriptor when one watched folder goes away.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
import termios
from array import array
from collections.abc import Iterator

# Event bits (linux/inotify.h).
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len: struct inotify_event
_READ_SIZE = 64 * 1024


class InotifyUnavailable(Exception):
    """This system has no inotify (not Linux, no libc symbol, or no instance left)."""


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


class Inotify:
    """
    One inotify instance.  L{pending} is one C{ioctl} and raises nothing, so
    asking before every cache hit is cheap; L{events} reads what is queued.

    @raise InotifyUnavailable: if there is none to be had.
    """

    def __init__(self) -> None:
        libc = _libc()
        if libc is None:
            raise InotifyUnavailable("no inotify in this C library")
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise InotifyUnavailable(os.strerror(code))
        self._libc = libc
        self.fd = fd
        self._count = array("i", [0])

    def add(self, path: str, mask: int) -> int:
        """
        Watch C{path} for the events in C{mask}; its watch descriptor (the
        same one again for an inode already watched, with C{mask} now).

        @raise OSError: C{ENOSPC} when the user's watch limit is reached,
            C{ENOENT}, C{ENOTDIR} (with L{IN_ONLYDIR}) and so on.
        """
        wd: int = self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        return wd

    def remove(self, wd: int) -> None:
        """Stop watching C{wd} (an L{IN_IGNORED} event for it follows); gone already is fine."""
        if self._libc.inotify_rm_watch(self.fd, wd) < 0 and ctypes.get_errno() != errno.EINVAL:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    def pending(self) -> int:
        """The bytes of events queued now (C{FIONREAD}); 0 after L{close}."""
        if self.fd < 0:
            return 0
        fcntl.ioctl(self.fd, termios.FIONREAD, self._count, True)
        return self._count[0]

    def events(self) -> Iterator[tuple[int, int, bytes]]:
        """
        Every event queued now, as (watch descriptor, mask, name), in the
        order they happened.  An overflow is an event with descriptor -1
        and L{IN_Q_OVERFLOW}: events were lost.
        """
        while self.fd >= 0:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            if not data:
                return  # pragma: no cover - inotify never reads empty
            offset = 0
            while offset + _HEADER.size <= len(data):
                wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                name = data[start : start + length].rstrip(b"\0")
                offset = start + length
                yield wd, mask, name

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
