"""
Where a download goes: the local file a shared path is saved to, and the
folders made on the way, refusing any that leads outside the destination.
"""

from __future__ import annotations

import os

from filecache.client.errors import LocalError
from filecache.wire import PathError, split_path


def destination(folder: str, path: str) -> str:
    """
    The local file that shared C{path} is saved to inside C{folder},
    sub-folders kept (C{a/b.txt} -> C{folder/a/b.txt}).

    @raise LocalError: if C{path} could name something outside C{folder}.
    """
    try:
        parts = split_path(path)
    except PathError:
        raise LocalError(f"refusing to save '{path}': not a plain relative path") from None
    return os.path.join(folder, *parts)


def _inside(root: str, path: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _make_folder(folder: str) -> list[str]:
    """Create C{folder} and its missing ancestors; return those made here, outermost first."""
    missing: list[str] = []
    current = os.path.abspath(folder)
    while not os.path.lexists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    created: list[str] = []
    for level in reversed(missing):
        try:
            os.mkdir(level)
        except FileExistsError:
            continue
        except OSError as e:
            remove_empty_folders(created)
            raise LocalError(f"cannot create {folder}: {e.strerror}") from None
        created.append(level)
    if not os.path.isdir(folder):
        raise LocalError(f"cannot save into {folder}: not a folder")
    return created


class Folders:
    """
    The folders many downloads into one destination have made (for
    L{remove_empty_folders} once they are all over) and found to lead
    nowhere outside it, so that each is checked once per run, not once per
    file saved in it.
    """

    def __init__(self) -> None:
        self.made: list[str] = []
        self.checked: set[str] = set()


def make_parents(folder: str, path: str, folders: Folders | None = None) -> list[str]:
    """
    Create the sub-folders of C{path} inside C{folder} one level at a time,
    refusing any level that leads outside (a symlink), before creating the
    next.  Return the folders made here, outermost first, so that a failed
    download can take them away again (L{remove_empty_folders}).  With
    C{folders}, the levels it has checked already are not checked again.

    @raise LocalError: if a level leads outside or cannot be made (nothing
        made here is left behind then).
    """
    parts = split_path(path)[:-1]
    if folders is not None and os.path.join(folder, *parts) in folders.checked:
        return []
    created = _make_folder(folder)
    try:
        root = os.path.realpath(folder)
        current = folder
        for part in parts:
            current = os.path.join(current, part)
            if not _inside(root, current):
                raise LocalError(f"refusing to save '{path}': {current} leads outside {folder}")
            try:
                os.mkdir(current)
            except FileExistsError:
                if not os.path.isdir(current):
                    raise LocalError(f"cannot save '{path}': {current} is not a folder") from None
            except OSError as e:
                raise LocalError(f"cannot create {current}: {e.strerror}") from None
            else:
                created.append(current)
            if not _inside(root, current):
                raise LocalError(f"refusing to save '{path}': {current} leads outside {folder}")
    except BaseException:
        remove_empty_folders(created)
        raise
    if folders is not None:
        folders.checked.update(os.path.join(folder, *parts[:n]) for n in range(len(parts) + 1))
    return created


def remove_empty_folders(created: list[str]) -> None:
    """Remove the folders in C{created} (outermost first) that are empty, innermost first."""
    for folder in reversed(created):
        try:
            os.rmdir(folder)
        except OSError:
            # Not empty (a kept partial file, someone else's file) or gone
            # already: its parents then hold it, or are not ours to judge.
            pass
