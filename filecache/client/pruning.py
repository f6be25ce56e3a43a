"""
--delete: the local files under what the NAMEs mirror that the server no
longer has, found and removed by descriptor, never following a symlink.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from filecache.client.errors import LocalError
from filecache.client.selection import Wanted


@dataclass(frozen=True)
class Extra:
    """A local entry the server does not have: its path relative to the destination."""

    rel: str

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.rel.split("/"))


def _open_folder(name: str, dir_fd: int | None) -> int | None:
    """Open folder C{name} without following a symlink; None if it is not a folder."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    return fd


def _walk(fd: int, prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """Every entry under the folder open as C{fd} that is not a folder, dot-names left out."""
    try:
        entries = list(os.scandir(fd))
    except OSError:
        return
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name.startswith("."):
            # Never shared, so never covered: partial files, the state
            # file, and whatever hidden files are the user's own.
            continue
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode):
            child = _open_folder(entry.name, fd)
            if child is None:
                continue
            try:
                yield from _walk(child, (*prefix, entry.name))
            finally:
                os.close(child)
        else:
            yield (*prefix, entry.name)


def find_extras(folder: str, wanted: Sequence[Wanted], server: Collection[str]) -> list[Extra]:
    """
    The local entries under C{folder} that some NAME in C{wanted} covers
    (L{Wanted.matches}) and whose path the server does not list, in path
    order.  Each NAME is looked for only under the folder its leading
    literal components name.  Dot-names are never looked at.
    """
    top = _open_top(folder)
    if top is None:
        return []
    found: set[str] = set()
    try:
        for want in wanted:
            literal = want.glob.literal
            fd = _descend(top, literal)
            if fd is None:
                continue
            try:
                for parts in _walk(fd, literal):
                    rel = "/".join(parts)
                    if rel not in server and want.matches(rel):
                        found.add(rel)
            finally:
                os.close(fd)
    finally:
        os.close(top)
    return [Extra(rel) for rel in sorted(found)]


def _open_top(folder: str) -> int | None:
    # The destination itself may be a symlink the user made; below it, none is followed.
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def remove_extras(folder: str, extras: Sequence[Extra]) -> tuple[list[Extra], list[LocalError]]:
    """
    Remove C{extras} (a symlink itself, never its target), then the folders
    this emptied, innermost first; return those removed, and why others
    could not be.
    """
    top = _open_top(folder)
    if top is None:
        return [], []
    removed: list[Extra] = []
    emptied: set[tuple[str, ...]] = set()
    problems: list[LocalError] = []
    try:
        for extra in extras:
            parent = _descend(top, extra.parts[:-1])
            if parent is None:
                continue
            try:
                os.unlink(extra.parts[-1], dir_fd=parent)
            except FileNotFoundError:
                continue
            except OSError as e:
                problems.append(LocalError(f"cannot delete {os.path.join(folder, extra.rel)}: {e.strerror}"))
                continue
            finally:
                os.close(parent)
            removed.append(extra)
            for depth in range(1, len(extra.parts)):
                emptied.add(extra.parts[:depth])
        for parts in sorted(emptied, key=len, reverse=True):
            parent = _descend(top, parts[:-1])
            if parent is None:
                continue
            try:
                os.rmdir(parts[-1], dir_fd=parent)
            except OSError:
                pass  # not empty: it holds what the server still has, or the user's own
            finally:
                os.close(parent)
    finally:
        os.close(top)
    return removed, problems


def _descend(top: int, parts: tuple[str, ...]) -> int | None:
    fd: int | None = os.dup(top)
    for part in parts:
        assert fd is not None
        child = _open_folder(part, fd)
        os.close(fd)
        fd = child
        if fd is None:
            return None
    return fd
