"""
What the client writes for the user: messages on stderr, the listing and the
figures as a table or as JSON on stdout, sizes in binary units.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import IO

from filecache import wire


def say(err: IO[str], text: str) -> None:
    """
    One line on stderr.  Everything said goes through wire.printable, since
    most of it can hold what a server sent (ERR texts, TLS errors) or a name
    that may hold control characters; messages quote names with '...', not
    repr(), so nothing is escaped twice.
    """
    err.write(f"filecache-client: {wire.printable(text)}\n")


def write_json(data: object, out: IO[str]) -> None:
    """
    C{data} as indented JSON on C{out}, with every character that is not
    printable (DEL, C1 controls such as U+009B, which json leaves raw) as a
    \\u escape: still the same JSON value, and safe on a terminal.  Written
    in the encoder's small pieces: one huge write to a pipe whose reader
    has gone can end in a short write that Python does not report.
    """
    for piece in json.JSONEncoder(indent=1, ensure_ascii=False).iterencode(data):
        if not piece.replace("\n", "").isprintable():
            piece = "".join(
                ch if ch.isprintable() or ch == "\n" else "".join(
                    f"\\u{unit:04x}" for unit in _utf16_units(ch)
                )
                for ch in piece
            )
        out.write(piece)
    out.write("\n")


def _utf16_units(ch: str) -> list[int]:
    raw = ch.encode("utf-16-be", "surrogatepass")
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def human_size(size: int) -> str:
    """C{1536} -> C{1.5 KiB}."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def print_listing(rows: Sequence[wire.ListRow], as_json: bool, out: IO[str]) -> None:
    """The listing, sorted by path (by its UTF-8 bytes, as the daemon once did)."""
    rows = sorted(rows, key=lambda r: r.path.encode("utf-8"))
    if as_json:
        data = [
            {"path": r.path, "size": r.size, "mtime": r.mtime, "cached": r.cached}
            for r in rows
        ]
        write_json(data, out)
        return
    sizes = [human_size(r.size) for r in rows]
    width = max([len(s) for s in sizes] + [4])
    out.write(f"{'SIZE':>{width}}  C  NAME\n")
    for row, size in zip(rows, sizes):
        out.write(f"{size:>{width}}  {'C' if row.cached else '-'}  {wire.printable(row.path)}\n")
    total = sum(r.size for r in rows)
    cached = sum(1 for r in rows if r.cached)
    out.write(f"{len(rows)} files, {human_size(total)}, {cached} cached\n")


def print_stats(stats: Sequence[tuple[str, wire.StatValue]], as_json: bool, out: IO[str]) -> None:
    if as_json:
        write_json(dict(stats), out)
        return
    shown = [(wire.printable(key), wire.printable(str(value))) for key, value in stats]
    width = max([len(k) for k, _ in shown] + [1])
    for key, value in shown:
        out.write(f"{key:<{width}}  {value}\n")
