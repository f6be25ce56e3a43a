"""
Whether a local file already holds what the server has: the same size,
then the same SHA-256 (the server's from HASH, ours computed or remembered).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from enum import Enum

from filecache.client.errors import LocalError
from filecache.client.localdigests import LocalDigests
from filecache.client.readers import FileHash


class Local(Enum):
    """What is under a download's final name now."""

    ABSENT = "absent"
    SAME = "same"
    """A regular file with the server's size and SHA-256: nothing to fetch."""
    OUTDATED = "outdated"
    """A file this client saved, unchanged since, that the server has changed: replaced."""
    DIFFERENT = "different"
    """Something else, which only --force replaces."""


async def compare(
    final: str,
    rel: str,
    listed_size: int | None,
    server_hash: Callable[[], Awaitable[FileHash]],
    digests: LocalDigests,
    force: bool,
) -> tuple[Local, os.stat_result | None]:
    """
    Compare C{final} (shared path C{rel}) with the server's file; return
    the verdict and the C{lstat} it was made on (None if there is no file).  The server is asked (C{server_hash})
    only when the sizes may match: C{listed_size} is the listing's size,
    if there was a listing.

    @raise LocalError: C{final} is a folder; or, without C{force}, it
        differs from the server's file (and is not the older version this
        client saved, L{Local.OUTDATED}) or is not a regular file.
    """
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return Local.ABSENT, None
    except OSError as e:
        raise LocalError(f"cannot look at {final}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise LocalError(f"{final} is a folder")
    if not stat.S_ISREG(st.st_mode):
        if force:
            return Local.DIFFERENT, st
        raise LocalError(f"{final} exists and is not a regular file (use --force to replace it)")
    same = False
    if listed_size is None or listed_size == st.st_size:
        server = await server_hash()
        if server.size == st.st_size:
            same = await digests.digest(rel, final, st) == server.digest
    if same:
        return Local.SAME, st
    if digests.saved_unchanged(rel, st):
        # The server's older version, as this client left it: no one's work is lost.
        return Local.OUTDATED, st
    if not force:
        raise LocalError(f"{final} exists and differs from the server's file (use --force to overwrite)")
    return Local.DIFFERENT, st
