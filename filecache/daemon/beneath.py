"""
Opening a file beneath the shared folder's descriptor with Linux's
C{openat2} (5.6 and later): the kernel refuses a path that would leave the
folder or pass a symlink, so no check of where the open led is needed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

_SYS_OPENAT2 = 437
"""The system call's number: one for every architecture (it came after the
numbers were unified, in Linux 5.6)."""

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    # struct open_how, include/uapi/linux/openat2.h
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class BeneathOpener:
    """
    Opens paths relative to the folder descriptor C{folder_fd} for reading,
    refusing any that passes a symlink (C{ELOOP}) or leaves the folder
    (C{EXDEV}): a path this opens leads where it says, inside.
    """

    def __init__(self, folder_fd: int, flags: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
        self._how = _OpenHow(flags, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
        self._how_at = ctypes.addressof(self._how)
        self._how_size = ctypes.sizeof(self._how)
        self._fd = folder_fd

    def open(self, relative: str) -> int:
        """
        A descriptor of C{relative} (no leading slash), opened beneath the folder.

        @raise OSError: as C{open} would, C{ELOOP} for a symlink on the way,
            C{EXDEV} for a path that would leave the folder.
        """
        fd: int = self._syscall(_SYS_OPENAT2, self._fd, os.fsencode(relative), self._how_at, self._how_size)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), relative)
        return fd


def beneath_opener(folder_fd: int, flags: int) -> BeneathOpener | None:
    """
    A L{BeneathOpener} for C{folder_fd}, or C{None} where C{openat2} cannot
    be used (not Linux, a kernel before 5.6, a sandbox that forbids it):
    asked once, by opening the folder itself.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        opener = BeneathOpener(folder_fd, flags)
        os.close(opener.open("."))
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG, errno.EACCES):
            return None
        raise
    except (AttributeError, TypeError):
        return None  # no C library to call through
    return opener
