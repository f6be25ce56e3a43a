"""
Shell-glob patterns over shared paths: C{*}, C{?} and C{[...]} stay inside
one path component, C{**} alone as a component spans any number of them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_SPECIAL = frozenset("*?[")

ANY_DEPTH = "**"
"""A whole component that matches zero or more components."""


def is_glob(text: str) -> bool:
    """
    Whether C{text} may hold a wildcard (C{*}, C{?}, C{[}).  There is no
    backslash escape: a shared path never holds a backslash, and C{[*]}
    matches a literal C{*} as in a shell.
    """
    return any(ch in _SPECIAL for ch in text)


def _class_end(text: str, start: int) -> int:
    """
    The index just past the C{]} that closes the class opened at
    C{text[start] == "["}, or -1 if it is never closed (then C{[} is literal).
    """
    i = start + 1
    if i < len(text) and text[i] in "!^":
        i += 1
    if i < len(text) and text[i] == "]":
        i += 1  # a ] first in the class is one of its characters
    while i < len(text):
        if text[i] == "]":
            return i + 1
        i += 1
    return -1


def _class_regex(body: str) -> str:
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    out = []
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            low, high = body[i], body[i + 2]
            # A reversed range matches nothing in a shell; so it does here.
            out.append(f"{re.escape(low)}-{re.escape(high)}" if low <= high else "")
            i += 3
        else:
            out.append(re.escape(body[i]))
            i += 1
    inner = "".join(out)
    if negate:
        return f"[^/{inner}]"
    return f"[{inner}]" if inner else "(?!)"


@functools.lru_cache(maxsize=1024)
def _component_regex(component: str) -> re.Pattern[str]:
    """One component's pattern as an anchored regex; C{/} never matches."""
    out = []
    i = 0
    while i < len(component):
        ch = component[i]
        if ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "[" and (end := _class_end(component, i)) > 0:
            out.append(_class_regex(component[i + 1 : end - 1]))
            i = end
        else:
            out.append(re.escape(ch))
            i += 1
    return re.compile("".join(out), re.DOTALL)


@dataclass(frozen=True)
class Glob:
    """
    A pattern over C{/}-separated paths, matched component by component.
    C{literal} is the leading run of components without wildcards: the
    folder the pattern cannot leave.
    """

    text: str

    @functools.cached_property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.text.split("/"))

    @functools.cached_property
    def literal(self) -> tuple[str, ...]:
        out = []
        for part in self.parts:
            if _has_wildcard(part):
                break
            out.append(part)
        return tuple(out)

    def matches(self, path: str) -> bool:
        """Whether C{path} as a whole matches."""
        return _match(self.parts, tuple(path.split("/")))

    def matches_folder_of(self, path: str) -> bool:
        """Whether some folder that holds C{path} (a proper prefix of it) matches."""
        names = tuple(path.split("/"))
        return any(_match(self.parts, names[:n]) for n in range(1, len(names)))



def _has_wildcard(component: str) -> bool:
    i = 0
    while i < len(component):
        ch = component[i]
        if ch in "*?":
            return True
        if ch == "[" and _class_end(component, i) > 0:
            return True
        i += 1
    return False


def _match(pattern: tuple[str, ...], names: tuple[str, ...]) -> bool:
    """Component-wise match with C{**}; memoised on positions, so linear in practice."""
    seen: set[tuple[int, int]] = set()

    def at(p: int, n: int) -> bool:
        while True:
            if (p, n) in seen:
                return False
            seen.add((p, n))
            if p == len(pattern):
                return n == len(names)
            if pattern[p] == ANY_DEPTH:
                # Zero components, or one more and try again.
                if at(p + 1, n):
                    return True
                if n == len(names):
                    return False
                n += 1
                continue
            if n == len(names) or not _component_regex(pattern[p]).fullmatch(names[n]):
                return False
            p, n = p + 1, n + 1

    return at(0, 0)
