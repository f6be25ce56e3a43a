"""
The files every server serves, made once under benchmarks/work/ and then reused
(small files, two large files and a folder of 100,000 for LIST), and the cold
files, made afresh for each measurement.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.console import say

WORK = Path(__file__).resolve().parent / "work"

SMALL_FILES = 1_000
SMALL_SIZE = 4096
COLD_FILES = 10_000
LIST_FILES = 100_000
BIG = "big48.bin"
BIG_SIZE = 48 << 20
HUGE = "big200.bin"
HUGE_SIZE = 200 << 20
# v2: no cold files any more; they are made for each measurement (fresh_files).
DATASET_VERSION = "filecache-bench-data v2"
FRESH = "fresh"  # the folder of the shared folder that holds the cold files


@dataclass
class DataSet:
    root: Path  # served by every server for workloads 1-5
    listdir: Path  # 100,000 files, for workload 6 only
    small_list: Path  # paths of the 1,000 4 KiB files


@dataclass(frozen=True)
class ColdFiles:
    """Files no server has been asked for yet, and the list of their paths (one a line)."""

    paths: list[str]  # relative to the shared folder
    list_file: Path


@contextmanager
def fresh_files(ds: DataSet, label: str, count: int = COLD_FILES) -> Iterator[ColdFiles]:
    """
    C{count} new 4 KiB files in a folder of their own under the shared
    folder's fresh/, removed afterwards.  A measurement of cold files takes
    a new set, never the last one's: a server that caches what it opened
    (nginx's open_file_cache, filecache, rclone's directory cache) would
    otherwise find the second round's files warm.
    """
    parent = ds.root / FRESH
    parent.mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=parent))
    list_file = folder.with_suffix(".txt")
    try:
        # mkdtemp's 0700 would keep out nginx's worker, which runs as another user.
        folder.chmod(0o755)
        paths = [f"{FRESH}/{folder.name}/c{i:05d}.bin" for i in range(count)]
        for rel in paths:
            (ds.root / rel).write_bytes(os.urandom(SMALL_SIZE))
        list_file.write_text("\n".join(paths) + "\n")
        yield ColdFiles(paths, list_file)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        list_file.unlink(missing_ok=True)


def make_dataset(fresh: bool) -> DataSet:
    data = WORK / "data"
    listdir = WORK / "listdir"
    lists = WORK / "lists"
    stamp = WORK / "dataset.stamp"
    ds = DataSet(data, listdir, lists / "small.txt")
    spec = f"{DATASET_VERSION} {SMALL_FILES} {SMALL_SIZE} {LIST_FILES} {BIG_SIZE} {HUGE_SIZE}"
    if not fresh and stamp.exists() and stamp.read_text() == spec:
        say(f"data set: reusing {WORK} (--fresh-data to rebuild)")
        # Cold files left behind by a run that was killed.
        shutil.rmtree(data / FRESH, ignore_errors=True)
        return ds
    say(f"data set: making it in {WORK} (about 250 MiB and 101,000 small files)...")
    t0 = time.monotonic()
    stamp.unlink(missing_ok=True)
    for d in (data, listdir, lists):
        if d.exists():
            shutil.rmtree(d)
    (data / "small").mkdir(parents=True)
    listdir.mkdir()
    lists.mkdir()

    small = [f"small/f{i:04d}.bin" for i in range(SMALL_FILES)]
    for rel in small:
        (data / rel).write_bytes(os.urandom(SMALL_SIZE))
    for name, size in ((BIG, BIG_SIZE), (HUGE, HUGE_SIZE)):
        chunk = os.urandom(1 << 20)
        with open(data / name, "wb") as f:
            # Vary each MiB a little so no block is a copy of another.
            f.writelines(i.to_bytes(8, "little") + chunk[8:] for i in range(size >> 20))
    for i in range(LIST_FILES):
        with open(listdir / f"entry-{i:06d}.txt", "wb") as f:
            f.write(b"%d\n" % i)
    ds.small_list.write_text("\n".join(small) + "\n")
    os.sync()
    stamp.write_text(spec)
    say(f"data set: made in {time.monotonic() - t0:.1f} s")
    return ds
