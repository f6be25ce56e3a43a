"""
The NAMEs of get and list, in memory: shell-glob matching of shared paths
(property-tested against fnmatch one component at a time), and how NAMEs
select rows of a listing.
"""

from __future__ import annotations

import fnmatch

from hypothesis import given
from hypothesis import strategies as st

from filecache import wire
from filecache.client.globs import ANY_DEPTH, Glob, is_glob
from filecache.client.selection import Wanted, folder_rows, select, suggest_command

# Names made of a few letters, so that patterns and paths meet often.
NAME = st.text(alphabet="ab.-", min_size=1, max_size=4).filter(lambda n: not n.startswith("."))
PATH = st.lists(NAME, min_size=1, max_size=4).map("/".join)
PIECE = st.sampled_from(["a", "b", ".", "-", "*", "?", "[ab]", "[!a]", "[a-b]"])
# A component that is exactly ** spans folders; the doublestar tests below
# cover it, and these patterns are the ones without it.
COMPONENT = st.lists(PIECE, min_size=1, max_size=4).map("".join).filter(lambda c: c != ANY_DEPTH)
PATTERN = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)


@given(PATTERN, PATH)
def test_wildcards_never_cross_a_slash(pattern: str, path: str) -> None:
    """Without **, a pattern matches only paths with as many components as it has."""
    if Glob(pattern).matches(path):
        assert pattern.count("/") == path.count("/")


@given(PATTERN, PATH)
def test_a_pattern_without_doublestar_is_fnmatch_per_component(pattern: str, path: str) -> None:
    """*, ? and [...] mean in each component what they mean to fnmatch (and to a shell)."""
    parts, names = pattern.split("/"), path.split("/")
    expected = len(parts) == len(names) and all(
        fnmatch.fnmatchcase(name, part) for part, name in zip(parts, names)
    )
    assert Glob(pattern).matches(path) == expected


@given(PATH, st.lists(NAME, max_size=3))
def test_doublestar_spans_any_number_of_folders(path: str, folders: list[str]) -> None:
    """C{**/x} matches x at any depth, the top included; C{d/**} everything under d."""
    leaf = path.rsplit("/", 1)[-1]
    deep = "/".join([*folders, leaf])
    assert Glob("**/" + leaf).matches(deep)
    assert Glob("d/**").matches("d/" + deep)
    assert not Glob("d/**").matches("e/" + deep)


@given(PATH)
def test_a_name_without_wildcards_matches_only_itself(path: str) -> None:
    """A plain path is no glob and matches exactly that path."""
    assert not is_glob(path)
    assert Glob(path).matches(path)
    assert not Glob(path).matches(path + "x")


def test_glob_forms_the_issue_names() -> None:
    """logs/*.txt, **/*.bin, ? and [...] as a shell has them; an unclosed [ is literal."""
    assert Glob("logs/*.txt").matches("logs/a.txt")
    assert not Glob("logs/*.txt").matches("logs/old/a.txt")
    assert Glob("**/*.bin").matches("a.bin") and Glob("**/*.bin").matches("x/y/a.bin")
    assert Glob("f?.txt").matches("f1.txt") and not Glob("f?.txt").matches("f12.txt")
    assert Glob("f[0-3].txt").matches("f2.txt") and not Glob("f[0-3].txt").matches("f7.txt")
    assert Glob("f[!0-3].txt").matches("f7.txt") and Glob("f[^0-3].txt").matches("f7.txt")
    assert Glob("a[1.txt").matches("a[1.txt")
    assert Glob("[*]").matches("*") and not Glob("[*]").matches("x")
    assert Glob("x/[ab]*/y").literal == ("x",)


def rows(*paths: str) -> list[wire.ListRow]:
    return [wire.ListRow(size=len(p), mtime=0, cached=False, path=p) for p in paths]


LISTING = rows("docs/a.txt", "docs/sub/b.txt", "docsx/c.txt", "logs/1.txt", "logs/old/2.txt", "top.bin", "a[1].txt")


def paths(found: list[wire.ListRow]) -> list[str]:
    return [row.path for row in found]


def test_a_trailing_slash_or_r_means_a_folder_tree() -> None:
    """docs/ and -r docs select the whole tree under docs/, and not docsx/."""
    assert paths(select([Wanted("docs/")], LISTING).rows) == ["docs/a.txt", "docs/sub/b.txt"]
    assert paths(select([Wanted("docs", recursive=True)], LISTING).rows) == ["docs/a.txt", "docs/sub/b.txt"]
    assert paths(folder_rows("docs", LISTING)) == ["docs/a.txt", "docs/sub/b.txt"]


def test_a_bare_name_that_is_a_folder_is_that_folder() -> None:
    """`docs`, which is no file but a folder, selects its tree and is understood as docs/."""
    chosen = select([Wanted("docs")], LISTING)
    assert paths(chosen.rows) == ["docs/a.txt", "docs/sub/b.txt"]
    assert chosen.wanted == [Wanted("docs/")]


def test_patterns_select_and_those_matching_nothing_are_named() -> None:
    """Each NAME's rows, once each, in path order; a NAME with no match is in unmatched."""
    chosen = select([Wanted("logs/*.txt"), Wanted("**/*.txt"), Wanted("nope/*")], LISTING)
    assert paths(chosen.rows) == [
        "a[1].txt", "docs/a.txt", "docs/sub/b.txt", "docsx/c.txt", "logs/1.txt", "logs/old/2.txt"
    ]
    assert chosen.unmatched == [Wanted("nope/*")]


def test_a_glob_with_r_takes_the_folders_it_matches() -> None:
    """As `cp -r logs/*`: with -r, a pattern matching a folder takes its tree; without, only files."""
    assert paths(select([Wanted("logs/*")], LISTING).rows) == ["logs/1.txt"]
    assert paths(select([Wanted("logs/*", recursive=True)], LISTING).rows) == ["logs/1.txt", "logs/old/2.txt"]


def test_a_name_with_wildcard_characters_that_is_a_file_is_that_file() -> None:
    """a[1].txt matches nothing as a pattern (it means a1.txt) but is a shared file: that file."""
    assert paths(select([Wanted("a[1].txt")], LISTING).rows) == ["a[1].txt"]


def test_a_mistyped_command_is_recognised() -> None:
    """lst -> list, stat -> stats, gte -> get; a real file name gets no suggestion."""
    commands = ("list", "get", "stats")
    assert suggest_command("lst", commands) == "list"
    assert suggest_command("stat", commands) == "stats"
    assert suggest_command("gte", commands) == "get"
    assert suggest_command("report.pdf", commands) is None
