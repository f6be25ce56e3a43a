"""
benchmarks/cachebench.py's pieces that need no daemon: the Zipf draw, the
in-process replay, and its section of results.md.
"""

from __future__ import annotations

import random

from benchmarks import cachebench
from benchmarks.report import replace_section


def test_zipf_draw_is_skewed_and_seeded() -> None:
    """The most popular file is drawn far more often than the median one, the same way for one seed."""
    ranks = cachebench.zipf_ranks(500, 20_000, random.Random(1))
    assert ranks == cachebench.zipf_ranks(500, 20_000, random.Random(1))
    assert min(ranks) >= 0 and max(ranks) < 500
    assert ranks.count(0) > 20 * max(ranks.count(250), 1)


def test_trace_mixes_in_each_scan_file_once() -> None:
    """With the scan, every scan file appears once, after hot request SCAN_START, and the hot requests are unchanged."""
    plain = list(cachebench.trace(False, random.Random(3)))
    mixed = list(cachebench.trace(True, random.Random(3)))
    scan = [path for path, _, n in mixed if n == -1]
    assert len(scan) == len(set(scan)) == cachebench.SCAN_FILES
    assert [item for item in mixed if item[2] != -1] == plain
    first = next(i for i, item in enumerate(mixed) if item[2] == -1)
    assert mixed[first + 1][2] == cachebench.SCAN_START


def test_merge_replaces_only_its_own_section() -> None:
    """--write adds the cache policies section at the end once, then replaces only it."""
    old = "# results\n\nnative figures\n"
    first = replace_section(old, f"{cachebench.BEGIN}\none\n{cachebench.END}\n", cachebench.BEGIN, cachebench.END)
    assert first.startswith(old) and first.count(cachebench.BEGIN) == 1
    second = replace_section(
        first + "\n## later\n", f"{cachebench.BEGIN}\ntwo\n{cachebench.END}\n", cachebench.BEGIN, cachebench.END
    )
    assert "one" not in second and "two" in second
    assert second.startswith(old) and second.endswith("## later\n")
