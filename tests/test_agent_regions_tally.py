"""The region table's caps, kept as running tallies (O(1) per registration, not a scan of
the node's entries): counts and bytes stay right through replacements and removals."""

from __future__ import annotations

import os

import pytest

from backdoors.agent.regions import RegionRefused, RegionTable

NODE = "n0"


def _memfd(size: int) -> int:
    fd = os.memfd_create("r", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


@pytest.fixture
def table():
    t = RegionTable([NODE], max_regions=2, max_region_bytes=4096, max_node_bytes=4000,
                    max_sessions=3)
    yield t
    t.close()


def _keep(table: RegionTable, name: str, kind: str, size: int) -> None:
    fd = _memfd(size)
    try:
        table.keep(NODE, name, kind, fd, os.getpid())
    finally:
        os.close(fd)


def test_counts_and_bytes_follow_adds_replacements_and_removals(table):
    _keep(table, "cb-a", "cb", 1000)
    _keep(table, "cb-b", "cb", 1000)
    _keep(table, "r1", "region", 500)
    assert table.usage(NODE) == (1, 2500)  # boxes are not counted as regions; bytes are
    _keep(table, "cb-a", "cb", 2000)  # replaced by its registrant: counted once, new size
    assert table.usage(NODE) == (1, 3500)
    table.remove(NODE, "cb-b")
    table.remove(NODE, "r1")
    assert table.usage(NODE) == (0, 2000)


def test_caps_refuse_by_the_tallies(table):
    for name in ("cb-a", "cb-b", "cb-c"):
        _keep(table, name, "cb", 100)
    with pytest.raises(RegionRefused, match="3 Continuation Boxes, the cap is 3"):
        _keep(table, "cb-d", "cb", 100)
    _keep(table, "cb-c", "cb", 100)  # a replacement is not one more
    _keep(table, "r1", "region", 100)
    _keep(table, "r2", "region", 100)
    with pytest.raises(RegionRefused, match="2 regions, the cap is 2"):
        _keep(table, "r3", "region", 100)
    table.remove(NODE, "r2")
    with pytest.raises(RegionRefused, match="would hold 4100 bytes"):
        _keep(table, "r3", "region", 3700)  # beyond max_node_bytes in all
    assert table.usage(NODE) == (1, 400)
