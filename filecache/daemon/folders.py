"""
One level of the shared folder opened for a folder page: its sorted names,
read once per version of the folder and shared by every page listing that
version meanwhile, then its entries' states a bounded step at a time.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from typing import NamedTuple

from filecache.daemon.foldernames import (
    FOLDER_NAMES,
    NAMES_STEP,
    FolderNames,
    FolderNamesStore,
    NamesReading,
)
from filecache.daemon.walk import MAX_WALK_ENTRIES, WALK_STEP, link_target


class FolderEntry(NamedTuple):
    """One entry of a folder level: its name, whether it is a subfolder, its state."""

    name: str
    folder: bool
    stat: os.stat_result


class OpenedFolder:
    """
    One folder of the shared tree, open by its descriptor, read a bounded
    step at a time: first the names of its entries (L{read_names}, until it
    says they are all read), sorted by their UTF-8 bytes, subfolders first;
    then their states (L{next_entries}).  Only what may be shared is kept:
    real subfolders (never a symlink to one) and regular files (or symlinks
    whose target is a regular file inside the shared folder), no name that
    starts with C{.}, holds a backslash or is not UTF-8.  The names come from
    C{store}, shared with every other page of the same version of the
    folder (L{FolderNamesStore}); the states are this page's own, taken as
    it goes.

    One thread at a time reads; L{close} may be called from another thread
    meanwhile: the descriptor is then closed as soon as the step under way
    returns, by whichever thread is last.  The owner must L{close} it.

    @ivar path: the folder's path inside the shared folder (C{""}: the root).
    @ivar fd: its descriptor.
    @param store: where the names are shared (the process's own by default).
    """

    def __init__(
        self,
        path: str,
        fd: int,
        inside: Callable[[str], bool],
        proc_fds: bool,
        *,
        store: FolderNamesStore = FOLDER_NAMES,
    ) -> None:
        self.path = path
        self.fd = fd
        self._inside = inside
        self._proc_fds = proc_fds
        self._store = store
        self._lock = threading.Lock()
        self._closing = False
        self._closed = False
        self._reading: NamesReading | None = None
        self._names: FolderNames | None = None
        self._at = 0

    @property
    def names(self) -> FolderNames | None:
        """The folder's names once L{read_names} has said C{True}, until L{close}."""
        return self._names

    def read_names(self, max_entries: int = MAX_WALK_ENTRIES, step: int = NAMES_STEP) -> bool:
        """
        Read the names of up to C{step} more entries (unless another page of
        the same folder has); C{True} once every name is read and sorted
        (and from then on).

        @raise WalkTooLarge: past C{max_entries} directory entries.
        @raise OSError: if the folder cannot be read.
        """
        with self._lock:
            if self._closing or self._names is not None:
                done = True
            else:
                if self._reading is None:
                    self._reading = self._store.join(self.fd)
                self._names = self._reading.step(self.fd, max_entries, step)
                done = self._names is not None
        if self._closing:
            self.close()
        return done

    def next_entries(self, step: int = WALK_STEP) -> list[FolderEntry] | None:
        """
        The next (up to) C{step} entries, in order, each with its state as
        it is now (an entry gone or changed into something unshared since
        its name was read is left out); C{None} once they are all given.
        Call it once L{read_names} has said C{True}.

        @raise OSError: if descriptors run out.
        """
        with self._lock:
            found = None if self._closing else self._next_entries(step)
        if self._closing:
            self.close()
        return found

    def _next_entries(self, step: int) -> list[FolderEntry] | None:
        names = self._names
        assert names is not None, "read_names first"
        start = self._at
        end = min(start + step, len(names))
        if start >= end:
            return None
        found: list[FolderEntry] = []
        fd = self.fd
        folders = names.folders
        for i, name in enumerate(names.names(start, end), start):
            folder = i < folders
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if folder:
                    if not stat.S_ISDIR(st.st_mode):
                        continue
                elif stat.S_ISLNK(st.st_mode):
                    target = link_target(fd, name, self._inside, self._proc_fds)
                    if target is None:
                        continue
                    st = target
                elif not stat.S_ISREG(st.st_mode):
                    continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                    raise
                continue
            found.append(FolderEntry(name, folder, st))
        self._at = end
        return found

    def close(self) -> None:
        """Close the descriptor and leave the names; reading ends here.  Safe to call more than once."""
        self._closing = True
        if self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._closed = True
                    os.close(self.fd)
                    reading, self._reading = self._reading, None
                    self._names = None
                    if reading is not None:
                        self._store.leave(reading)
            finally:
                self._lock.release()
