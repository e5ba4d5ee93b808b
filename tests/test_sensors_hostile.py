"""The reader never trusts a region: random, truncated, corrupt and hostile bytes give a
SensorBoxError (or a valid image), never another exception, a hang or an out-of-bounds read."""

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytest

from backdoors.errors import SensorBoxError
from backdoors.sensors import Region, SensorBox, SensorBoxReader, parse_box, read_consistent
from backdoors.sensors import abi

SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid_box_bytes(n_sensors: int = 3, capacity: int = 4) -> bytes:
    b = SensorBox.create("victim", capacity=capacity)
    try:
        kinds = [lambda i: b.progress(f"p{i}", deadline=0.5),
                 lambda i: b.level(f"l{i}", min=0, max=9),
                 lambda i: b.pressure(f"e{i}", max_events=3, window=1)]
        for i in range(n_sensors):
            kinds[i % 3](i)
        return os.pread(b.fd, abi.region_size(capacity), 0)
    finally:
        b.close()


VALID = valid_box_bytes()


def parse_or_error(data: bytes):
    try:
        img = parse_box(data)
    except SensorBoxError as e:
        assert str(e)
        return None
    # whatever parses must be internally consistent and within the data
    assert len(img.sensors) <= img.capacity
    assert abi.region_size(img.capacity) <= len(data)
    return img


@SETTINGS
@given(st.binary(max_size=600))
def test_random_bytes(data):
    parse_or_error(data)


@SETTINGS
@given(st.binary(min_size=abi.HEADER_SIZE, max_size=600))
def test_random_bytes_with_valid_magic(data):
    parse_or_error(abi.MAGIC + struct.pack("<HHI", 1, 64, 64) + data[12:])


@SETTINGS
@given(st.integers(0, len(VALID)))
def test_truncations(n):
    img = parse_or_error(VALID[:n])
    if n < len(VALID):
        assert img is None


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=12))
def test_byte_flips(flips):
    data = bytearray(VALID)
    for pos, val in flips:
        data[pos] = val
    parse_or_error(bytes(data))


@SETTINGS
@given(capacity=st.integers(0, 2**32 - 1), count=st.integers(0, 2**32 - 1), gen=st.integers(0, 2**64 - 1))
def test_hostile_header_fields(capacity, count, gen):
    data = bytearray(VALID)
    struct.pack_into("<II", data, 12, capacity, count)
    struct.pack_into("<Q", data, 24, gen)
    parse_or_error(bytes(data))


def test_specific_hostile_cases():
    cases = {
        "bad magic": b"XXXX" + VALID[4:],
        "version": VALID[:4] + struct.pack("<H", 2) + VALID[6:],
        "count > capacity": VALID[:16] + struct.pack("<I", 99) + VALID[20:],
        "odd generation": VALID[:24] + struct.pack("<Q", 7) + VALID[32:],
        "empty": b"",
    }
    for what, data in cases.items():
        with pytest.raises(SensorBoxError):
            parse_box(data)
    bad_name = bytearray(VALID)
    bad_name[32:64] = b"\xff" * 32
    with pytest.raises(SensorBoxError, match="NUL|UTF-8"):
        parse_box(bytes(bad_name))
    nan_threshold = bytearray(VALID)
    struct.pack_into("<d", nan_threshold, abi.slot_offset(0) + 16, float("nan"))
    with pytest.raises(SensorBoxError, match="finite"):
        parse_box(bytes(nan_threshold))


def test_region_truncated_after_open(tmp_path):
    """A file-backed region shrunk under the reader gives an error, not SIGBUS."""
    path = str(tmp_path / "box")
    b = SensorBox.create("shrinking", path=path)
    b.progress("p", deadline=1)
    rd = SensorBoxReader(path)
    rd.snapshot()
    os.truncate(path, 40)
    with pytest.raises(SensorBoxError, match="outside|truncated"):
        rd.snapshot()
    rd.close()
    b.close()


def test_a_pread_region_is_read_past_its_size_at_open_once_grown_and_never_written_past_its_end():
    """Reads inside the size seen at open need no fstat (a shrunk file reads short); a read
    past it, and every write, check the size now: a file grown since is read, a write past
    the end of one shrunk since is refused rather than growing it back."""
    fd = os.memfd_create("grows")
    os.ftruncate(fd, 4096)
    try:
        with Region(fd, writable=True) as r:
            assert not r.mapped and r.read(4088, 8) == bytes(8)
            os.pwrite(fd, b"later", 8192)  # the owner grows it
            assert r.read(8192, 5) == b"later"
            os.ftruncate(fd, 100)
            with pytest.raises(SensorBoxError, match="truncated"):
                r.read(0, 4096)
            with pytest.raises(SensorBoxError, match="outside the region of 100 bytes"):
                r.write(200, b"x")
            assert os.fstat(fd).st_size == 100
            with pytest.raises(SensorBoxError, match="outside"):
                r.read(-1, 8)
    finally:
        os.close(fd)


def test_stuck_odd_generation_gives_up():
    b = SensorBox.create("stuck")
    b._words[abi.OFF_GENERATION // 8] = 3  # a writer that died mid-update
    with pytest.raises(SensorBoxError, match="did not settle"):
        read_consistent(Region(b.fd))
    b.close()


def test_region_bounds_checks():
    b = SensorBox.create("bounds", capacity=1)
    with Region(b.fd) as r:
        for off, n in [(-1, 4), (0, r.size + 1), (r.size, 1), (r.size - 4, 8)]:
            with pytest.raises(SensorBoxError, match="outside"):
                r.read(off, n)
        with pytest.raises(SensorBoxError, match="not writable"):
            r.write(0, b"x")
    b.close()
