"""
The files every server serves, made once under benchmarks/work/ and then reused:
small files, cold files, two large files and a folder of 100,000 for LIST.
"""

from __future__ import annotations

import os
import shutil
import time
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
DATASET_VERSION = "filecache-bench-data v1"


@dataclass
class DataSet:
    root: Path  # served by every server for workloads 1-5
    listdir: Path  # 100,000 files, for workload 6 only
    small_list: Path  # paths of the 1,000 4 KiB files
    cold_list: Path  # paths of the 10,000 cold files


def make_dataset(fresh: bool) -> DataSet:
    data = WORK / "data"
    listdir = WORK / "listdir"
    lists = WORK / "lists"
    stamp = WORK / "dataset.stamp"
    ds = DataSet(data, listdir, lists / "small.txt", lists / "cold.txt")
    spec = f"{DATASET_VERSION} {SMALL_FILES} {SMALL_SIZE} {COLD_FILES} {LIST_FILES} {BIG_SIZE} {HUGE_SIZE}"
    if not fresh and stamp.exists() and stamp.read_text() == spec:
        say(f"data set: reusing {WORK} (--fresh-data to rebuild)")
        return ds
    say(f"data set: making it in {WORK} (about 250 MiB and 111,000 small files)...")
    t0 = time.monotonic()
    stamp.unlink(missing_ok=True)
    for d in (data, listdir, lists):
        if d.exists():
            shutil.rmtree(d)
    (data / "small").mkdir(parents=True)
    (data / "cold").mkdir()
    listdir.mkdir()
    lists.mkdir()

    small = [f"small/f{i:04d}.bin" for i in range(SMALL_FILES)]
    cold = [f"cold/c{i:05d}.bin" for i in range(COLD_FILES)]
    for rel in small + cold:
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
    ds.cold_list.write_text("\n".join(cold) + "\n")
    os.sync()
    stamp.write_text(spec)
    say(f"data set: made in {time.monotonic() - t0:.1f} s")
    return ds
