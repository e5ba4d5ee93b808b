"""The C header writes a Sensor Box that the Python reader reads."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from backdoors.sensors import SensorBoxReader, abi

from conftest import unavailable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    if not shutil.which("gcc"):
        unavailable("gcc is needed to compile the C Sensor Box writer")
    exe = tmp_path_factory.mktemp("c") / "sb_writer"
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-O2",
                    "-I", str(ROOT / "src/backdoors/include"), str(ROOT / "tests/c/sb_writer.c"),
                    "-o", str(exe), "-lm"], check=True)
    return exe


def check(snap):
    assert snap.box == "c-service"
    assert snap.get("requests").value == 1000 and snap.get("requests").deadline == 0.25
    mem = snap.get("cache_mb")
    assert mem.value == 300.5 and (mem.min, mem.max) == (10.0, 512.0) and not mem.violated
    low = snap.get("free_slots")
    assert low.min == 2.0 and low.max is None and low.violated
    err = snap.get("errors")
    assert err.value == 7 and err.max_events == 100 and err.window == 1.0
    assert [s.id for s in snap.sensors] == [1, 2, 3, 4]


def test_c_writer_file(writer, tmp_path):
    path = tmp_path / "cbox"
    before = time.monotonic_ns()
    subprocess.run([str(writer), str(path)], check=True)
    after = time.monotonic_ns()
    with SensorBoxReader(str(path)) as rd:
        check(rd.snapshot())
    # bd_sb_tick stamped the progress counter's last move (slot 0's moved_ns)
    moved_at = abi.slot_offset(0) + abi.SLOT_OFF_MOVED_NS
    moved_ns = int.from_bytes(path.read_bytes()[moved_at:moved_at + 8], "little")
    assert before < moved_ns < after


def test_c_writer_memfd(writer):
    p = subprocess.Popen([str(writer), "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid, fd = map(int, p.stdout.readline().split())
        held = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
        try:
            with SensorBoxReader(held) as rd:
                snap = rd.snapshot()
            assert snap.owner_pid == pid
            check(snap)
        finally:
            os.close(held)
    finally:
        p.stdin.close()
        p.wait(5)
