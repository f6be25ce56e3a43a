"""
The SHA-256 of local files, computed once and remembered in a small state
file in the destination folder, C{DIR/.filecache-client-state.json}.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed

STATE_NAME = ".filecache-client-state.json"
"""The state file, in the destination folder.  The server never shares a
dot-name, so no download is ever saved under it, and --delete never
removes it."""

FORMAT = "filecache-client local digests, 1"
"""The marker our state files carry; a file without it is not ours and is
neither read nor replaced."""

_HEAD = json.dumps({"format": FORMAT}, separators=(",", ":"))[:-1].encode("utf-8")

MAX_STATE_BYTES = 64 * 1024 * 1024
INLINE_BYTES = 256 * 1024
"""Files up to this size are hashed on the reactor thread: a thread's
round trip would cost more than the reading."""

_T = TypeVar("_T")
RunBlocking = Callable[[Callable[[], Any]], "Deferred[Any]"]
"""Runs a blocking function off the reactor thread; its Deferred fires with the result."""

# Opening with these never blocks (a FIFO) and never follows a symlink.
_NO_SURPRISES = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

Stamp = tuple[int, int, int, int]
"""What must not have changed for a remembered digest to hold: size,
modification and change times in nanoseconds, inode.  Any write moves the
change time, and no program can set it back."""


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def run_inline(work: Callable[[], _T]) -> Deferred[_T]:
    """A L{RunBlocking} that runs C{work} at once (tests; tiny files)."""
    return succeed(work())


def hash_file(path: str) -> tuple[str, Stamp] | None:
    """
    SHA-256 of the regular file C{path} (not followed if a symlink) and its
    stamp; C{None} if it is not a regular file or changed while read.

    @raise OSError: if it cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | _NO_SURPRISES)
    with os.fdopen(fd, "rb") as f:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            return None
        hasher = hashlib.sha256()
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
        if stamp_of(os.fstat(fd)) != stamp_of(before):
            return None
    return hasher.hexdigest(), stamp_of(before)


class LocalDigests:
    """
    Digests of the files under C{folder}, by their path relative to it,
    each valid while the file's L{Stamp} is unchanged.  L{load} reads the
    state file, L{save} writes it back (atomically, and only over a state
    file of ours).
    """

    def __init__(self, folder: str, run_blocking: RunBlocking = run_inline) -> None:
        self.path = os.path.join(folder, STATE_NAME)
        self._folder = folder
        self._run_blocking = run_blocking
        # By path: the stamp, the digest, and whether this client saved the file.
        self._known: dict[str, tuple[Stamp, str, bool]] = {}
        self._ours = True  # no file yet, or one we wrote
        self._changed = False

    def load(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | _NO_SURPRISES)
        except FileNotFoundError:
            return
        except OSError:
            self._ours = False
            return
        try:
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ValueError("not a regular file")
                raw = f.read(MAX_STATE_BYTES + 1)
            if len(raw) > MAX_STATE_BYTES:
                raise ValueError("too large")
            data = json.loads(raw.decode("utf-8"))
            if data.get("format") != FORMAT:
                raise ValueError("not ours")
            for rel, (size, mtime, ctime, ino, digest, saved) in data["files"].items():
                stamp = (int(size), int(mtime), int(ctime), int(ino))
                self._known[str(rel)] = (stamp, str(digest), saved is True)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._known.clear()
            self._ours = False

    def digest(self, rel: str, local: str, st: os.stat_result) -> Deferred[str | None]:
        """
        The SHA-256 of C{local} (shared path C{rel}), whose C{lstat} is
        C{st}: remembered if its stamp is unchanged, else read (off the
        reactor thread when large) and remembered.  C{None} if the file
        changed while it was read.
        """
        known = self._known.get(rel)
        if known is not None and known[0] == stamp_of(st):
            return succeed(known[1])
        run = run_inline if st.st_size <= INLINE_BYTES else self._run_blocking
        d: Deferred[tuple[str, Stamp] | None] = run(lambda: hash_file(local))

        def remember(found: tuple[str, Stamp] | None) -> str | None:
            if found is None:
                self.forget(rel)
                return None
            self._known[rel] = (found[1], found[0], False)
            self._changed = True
            return found[0]

        return d.addCallback(remember)

    def remember(self, rel: str, local: str, digest: str) -> None:
        """C{local} (shared path C{rel}) was just saved by this client, with C{digest}."""
        try:
            st = os.lstat(local)
        except OSError:
            return
        self._known[rel] = (stamp_of(st), digest, True)
        self._changed = True

    def saved_unchanged(self, rel: str, st: os.stat_result) -> bool:
        """
        Whether this client saved C{rel} (a mirror of it, one run or
        another) and the file, whose C{lstat} is C{st}, has not changed since.
        """
        known = self._known.get(rel)
        return known is not None and known[2] and known[0] == stamp_of(st)

    def forget(self, rel: str) -> None:
        if self._known.pop(rel, None) is not None:
            self._changed = True

    def save(self) -> None:
        """
        Write what is known, if anything changed, the folder exists and the
        state file there is ours.  Best effort: a state file that cannot be
        written only means digests are computed again next time.
        """
        if not self._changed or not self._ours or not os.path.isdir(self._folder):
            return
        if not self._replaceable():
            self._ours = False
            return
        data = {
            "format": FORMAT,
            "files": {rel: [*st, digest, saved] for rel, (st, digest, saved) in sorted(self._known.items())},
        }
        try:
            fd, temporary = tempfile.mkstemp(prefix=STATE_NAME + ".", suffix=".tmp", dir=self._folder)
        except OSError:
            return
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                # "format" first: _replaceable reads only the start.  dumps
                # and one write: json.dump writes piece by piece, twice as
                # slow for a mirror's few thousand entries.
                f.write(json.dumps(data, separators=(",", ":")))
            os.replace(temporary, self.path)
        except OSError:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            return
        self._changed = False

    def _replaceable(self) -> bool:
        """Whether the state file is absent or still ours (nobody put a file there meanwhile)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | _NO_SURPRISES)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        with os.fdopen(fd, "rb") as f:
            head = f.read(len(_HEAD)) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        return head == _HEAD
