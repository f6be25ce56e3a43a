"""
Packaging: the wheel carries the plugin file, and never a plugin cache or an
__init__.py that would hide Twisted's own plugins.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_has_the_plugin_and_no_cache(tmp_path: Path) -> None:
    """`pip wheel .` packs twisted/plugins/filecache_plugin.py, no dropin.cache, no twisted/__init__.py."""
    stray = REPO / "twisted" / "plugins" / "dropin.cache"
    made_stray = not stray.exists()
    if made_stray:
        stray.write_bytes(b"stale")  # what twistd leaves behind after a run
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
            check=True,
            capture_output=True,
            timeout=300,
        )
    finally:
        if made_stray:
            stray.unlink()
    (wheel,) = tmp_path.glob("filecache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/filecache_plugin.py" in names
    assert "filecache/py.typed" in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names


def test_plugin_is_found() -> None:
    """Twisted's plugin system finds the filecache tap in this install."""
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    names = [p.tapname for p in getPlugins(IServiceMaker)]
    assert "filecache" in names
