"""
What the NAMEs of `get` and `list` ask for, matched against the server's
LIST: a file, a folder's tree, or a shell-glob pattern; and what --delete covers.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from filecache import wire
from filecache.client.globs import Glob, is_glob


@dataclass(frozen=True)
class Wanted:
    """
    One NAME as typed.  C{folder}: it ends in C{/} (or C{-r} was given and
    it names a folder), so it means every file under it.
    """

    text: str
    recursive: bool = False

    @property
    def folder(self) -> bool:
        return self.text.endswith("/")

    @functools.cached_property
    def glob(self) -> Glob:
        return Glob(self.text.rstrip("/") or self.text)

    @property
    def plain(self) -> bool:
        """A name that needs no listing to be fetched: no wildcard, no folder form."""
        return not self.folder and not self.recursive and not is_glob(self.text)

    def matches(self, path: str) -> bool:
        """
        Whether shared file C{path} is one this NAME asks for: the file
        itself (not in folder form), or a file under a folder it matches
        (in folder form, or with C{-r}).  The same rule says which local
        files --delete may remove.
        """
        glob = self.glob
        if not self.folder and glob.matches(path):
            return True
        if self.folder or self.recursive:
            return glob.matches_folder_of(path)
        return False


@dataclass
class Selection:
    """
    The rows every NAME asked for, in path order; the NAMEs as they were
    understood (a bare name that is a folder becomes C{name/}); and those
    that matched nothing.
    """

    rows: list[wire.ListRow] = field(default_factory=list)
    wanted: list[Wanted] = field(default_factory=list)
    unmatched: list[Wanted] = field(default_factory=list)


def select(wanted: Sequence[Wanted], rows: Iterable[wire.ListRow]) -> Selection:
    """
    Match every NAME against the listing.  A NAME with wildcards that
    matches nothing but is itself the name of a shared file (C{a[1].txt})
    is that file; a bare name that is no file but a folder is that folder.
    A row asked for by several NAMEs is taken once.
    """
    rows = list(rows)
    by_path = {row.path: row for row in rows}
    chosen: dict[str, wire.ListRow] = {}
    understood: list[Wanted] = []
    unmatched: list[Wanted] = []
    for want in wanted:
        found = [row for row in rows if want.matches(row.path)]
        if not found and not want.folder and want.text in by_path:
            found = [by_path[want.text]]
        if not found and want.plain:
            want = Wanted(want.text + "/")
            found = [row for row in rows if want.matches(row.path)]
        understood.append(want)
        if not found:
            unmatched.append(want)
        for row in found:
            chosen.setdefault(row.path, row)
    ordered = sorted(chosen.values(), key=lambda r: r.path.encode("utf-8"))
    return Selection(ordered, understood, unmatched)


def folder_rows(name: str, rows: Iterable[wire.ListRow]) -> list[wire.ListRow]:
    """The rows under folder C{name} (a plain name that was not a file), in path order."""
    return select([Wanted(name.rstrip("/") + "/")], rows).rows


def suggest_command(word: str, commands: Sequence[str]) -> str | None:
    """The command C{word} was probably meant to be (C{lst} -> C{list}), if any is close."""
    close = difflib.get_close_matches(word.lower(), commands, n=1, cutoff=0.6)
    return close[0] if close else None
