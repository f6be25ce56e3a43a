"""
Packaging: the wheel carries the plugin file, and never a plugin cache or an
__init__.py that would hide Twisted's own plugins.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_has_the_plugin_and_no_cache(tmp_path: Path) -> None:
    """
    `pip wheel .` packs twisted/plugins/filecache_plugin.py, no dropin.cache,
    no twisted/__init__.py.  Built from a copy of the checkout, so that the
    stray cache planted here never touches the checkout itself.
    """
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", "__pycache__", "build", "work", "*.egg-info", ".*cache"),
    )
    # What twistd leaves behind after a run.
    (source / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("filecache-*.whl")
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
