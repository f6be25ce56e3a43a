"""
The client's place in the layout: it imports nothing of the daemon, the
daemon nothing of it, and only filecache.wire is shared; its modules stay
small rooms named for what they do.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "filecache"
MAX_LINES = 400


def modules(side: str) -> list[Path]:
    return sorted((PACKAGE / side).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module C{path} imports, at the top or inside a function, by its full name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from filecache import daemon` names the package in the alias.
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def reaching(names: set[str], package: str) -> set[str]:
    return {name for name in names if name == package or name.startswith(package + ".")}


@pytest.mark.parametrize(
    "side, other",
    [("client", "filecache.daemon"), ("daemon", "filecache.client")],
)
def test_neither_side_imports_the_other(side: str, other: str) -> None:
    """No module of filecache/client imports filecache.daemon, and no daemon module the client."""
    found = {
        path.name: sorted(reaching(imported(path), other))
        for path in modules(side)
        if reaching(imported(path), other)
    }
    assert found == {}


def test_the_shared_grammar_imports_neither_side() -> None:
    """filecache/wire.py, which both sides import, imports neither of them."""
    names = imported(PACKAGE / "wire.py")
    assert reaching(names, "filecache.client") == set()
    assert reaching(names, "filecache.daemon") == set()


def test_client_modules_are_small_and_say_what_they_are() -> None:
    """
    Every client module is at most 400 lines, opens with a docstring, and
    is not named utils, helpers or manager.
    """
    for path in modules("client"):
        lines = path.read_text().count("\n")
        assert lines <= MAX_LINES, f"{path.name} has {lines} lines"
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no docstring"
        assert path.stem not in ("utils", "helpers", "manager")
