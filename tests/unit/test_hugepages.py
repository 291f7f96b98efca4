"""hugepages.py: collapsing the worker's dense anonymous memory into huge pages."""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from celery_forkguard import hugepages

pytestmark = pytest.mark.timeout(60)

SCRIPT = r"""
import ctypes, json, mmap, os
from celery_forkguard import hugepages

MiB = 1 << 20

def anon_huge_kib():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])

def resident_pages(buffer):
    # Pages of *buffer* in memory, by mincore(2).
    libc = hugepages._libc()
    pages = len(buffer) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.addressof(ctypes.c_char.from_buffer(buffer)), len(buffer), vec) == 0
    return sum(byte & 1 for byte in vec)

dense = mmap.mmap(-1, 16 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
dense.write(b"x" * (16 * MiB))  # every page resident
sparse = mmap.mmap(-1, 16 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
sparse[0] = 1  # one page resident
before = anon_huge_kib()
sparse_before = resident_pages(sparse)
done = hugepages.collapse_heap()
pid = os.fork()
if pid == 0:
    dense[0:5] = b"child"  # a write after the fork copies, the parent keeps its bytes
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({
    "collapsed": done.collapsed, "refused": done.refused,
    "huge_kib_before": before, "huge_kib_after": anon_huge_kib(),
    "sparse_before": sparse_before, "sparse_after": resident_pages(sparse),
    "dense_intact": dense[0:5] == b"xxxxx",
}))
"""


def test_unsupported_reason_reads_the_kernels_switch(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hugepages, "THP", tmp_path)
    monkeypatch.setattr(hugepages.os, "uname", lambda: os.uname_result(
        ("Linux", "host", "6.1.0-test", "#1", "x86_64")))
    assert hugepages.unsupported_reason() == "the kernel has no transparent huge pages"
    (tmp_path / "enabled").write_text("always madvise [never]\n")
    assert "off ([never])" in str(hugepages.unsupported_reason())
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert hugepages.unsupported_reason() is None
    assert hugepages.huge_page_size() == 2 << 20  # no hpage_pmd_size: x86-64's
    (tmp_path / "hpage_pmd_size").write_text("524288\n")
    assert hugepages.huge_page_size() == 524288
    monkeypatch.setattr(hugepages.os, "uname", lambda: os.uname_result(
        ("Linux", "host", "5.15.0-91-generic", "#1", "x86_64")))
    assert hugepages.unsupported_reason() == "Linux 5.15.0-91-generic has no MADV_COLLAPSE (6.1+)"


@pytest.mark.skipif(hugepages.unsupported_reason() is not None,
                    reason=str(hugepages.unsupported_reason()))
def test_dense_memory_is_collapsed_and_sparse_memory_left_alone() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=50, check=False)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    # At least 7 of the dense region's 8 aligned 2 MiB stretches are huge pages now.
    assert got["collapsed"] >= 14 << 20, got
    assert got["huge_kib_after"] - got["huge_kib_before"] >= 14 << 10, got
    # The sparse region was not filled in (a stretch it shares with the dense one may be).
    assert got["sparse_before"] >= 1 and got["sparse_after"] <= 2 * 512, got
    assert got["dense_intact"], got


class FakeLibc:
    """mincore says every page is resident; madvise fails with *error*."""

    def __init__(self, error: int) -> None:
        self.error = error
        self.collapses = 0

    def mincore(self, addr: int, length: int, vec: Any) -> int:
        for i in range(len(vec)):
            vec[i] = 1
        return 0

    def madvise(self, addr: int, length: int, advice: int) -> int:
        self.collapses += 1
        ctypes.set_errno(self.error)
        return -1


@pytest.mark.parametrize(("error", "tried"), [(errno.EINVAL, 2), (errno.EAGAIN, 6)])
def test_a_refused_mapping_is_left_at_its_first_stretch(
    monkeypatch: pytest.MonkeyPatch, error: int, tried: int,
) -> None:
    size = 2 << 20
    libc = FakeLibc(error)
    monkeypatch.setattr(hugepages, "_libc", lambda: libc)
    monkeypatch.setattr(hugepages, "huge_page_size", lambda: size)
    # Two mappings of three aligned stretches each.
    monkeypatch.setattr(hugepages, "_anonymous_regions",
                        lambda: iter([(size, 4 * size), (10 * size, 13 * size)]))
    done = hugepages.collapse_heap()
    # EINVAL: this mapping (or this kernel) takes none, try the next mapping.
    # Anything else (no huge page free now): try the next stretch.
    assert (libc.collapses, done.refused, done.collapsed) == (tried, tried, 0)


def test_the_pool_forks_as_before_when_collapsing_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from celery_forkguard.prefork import forkguard

    def broken() -> None:
        raise OSError(errno.EACCES, "Permission denied", "/proc/self/maps")

    monkeypatch.setattr(hugepages, "collapse_heap", broken)
    with caplog.at_level(logging.WARNING):
        forkguard._collapse_into_huge_pages()
    assert "huge pages skipped" in caplog.text
