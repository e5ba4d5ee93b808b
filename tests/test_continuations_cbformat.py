"""The Continuation Box layout: round trips, atomic exports, and a reader that never trusts
the region (random, corrupt and truncated bytes give a CbFormatError or a valid image)."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backdoors.continuations import (
    CbFormatError,
    NullRegistrar,
    RecoveryError,
    StateTooLargeError,
    create_cb,
    parse_cb,
    read_cb,
)
from backdoors.continuations import cbformat
from backdoors.continuations.image import check_cb
from backdoors.continuations.region import CbRegion
from backdoors.sensors import Region

SETTINGS = settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Point(msgspec.Struct):
    name: str
    offset: int


def new_box(state_capacity=256, log_capacity=128):
    a, b = socket.socketpair()
    cb = create_cb(a, state_capacity=state_capacity, log_capacity=log_capacity,
                   registrar=NullRegistrar())
    return cb, b


def region_bytes(cb) -> bytes:
    return os.pread(cb.fd, os.fstat(cb.fd).st_size, 0)


def valid_image_bytes() -> bytes:
    cb, peer = new_box()
    try:
        peer.sendall(b"line one\nline two\n")
        cb.conn.readline()
        cb.conn.sendall(b"x" * 100)
        cb.export(Point("f", 1))
        cb.conn.readline()
        return region_bytes(cb)
    finally:
        cb.close()
        peer.close()


VALID = valid_image_bytes()


def test_structs_and_offsets_match_the_documented_layout():
    assert cbformat.HEADER.size == 128 and cbformat.SLOT.size == 64
    assert cbformat.slot_offset(0, 256) == 128 and cbformat.slot_offset(1, 256) == 128 + 64 + 256
    assert cbformat.log_offset(256) == 128 + 2 * (64 + 256)
    assert cbformat.region_size(256, 128) == cbformat.log_offset(256) + 128
    assert cbformat.OFF_EXPORT_VERSION % 8 == 0 and cbformat.OFF_LOG_END % 8 == 0
    with pytest.raises(ValueError):
        cbformat.check_capacities(12, 64)
    with pytest.raises(ValueError):
        cbformat.check_capacities(8, cbformat.MAX_LOG_CAPACITY + 8)


def test_new_box_is_sealed_and_describes_its_session():
    a, b = socket.socketpair()
    with create_cb(a, registrar=NullRegistrar()) as cb:
        seals = fcntl.fcntl(cb.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        image = read_cb(cb.fd)
        assert image.session_id == cb.session and image.owner_pid == os.getpid()
        assert image.export.version == 0 and image.state() is None
        assert image.family == 0 and image.remote is None  # a Unix socket: no addresses
        assert cb.import_state() is None
    b.close()


def test_tcp_box_records_the_connection_addresses():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with create_cb(conn, registrar=NullRegistrar()) as cb:
            image = read_cb(cb.fd)
            assert image.family == socket.AF_INET
            assert image.local == server.getsockname() and image.remote == client.getsockname()
        client.close()


def test_export_round_trip_bytes_and_structs():
    cb, peer = new_box()
    with cb:
        assert cb.export(b"\x00raw") == 1 and cb.import_state() == b"\x00raw"
        assert cb.export(Point("a.txt", 7)) == 2
        assert cb.import_state(Point) == Point("a.txt", 7)
        assert cb.import_state() == {"name": "a.txt", "offset": 7}
        image = read_cb(cb.fd)
        assert image.export.version == 2 and image.state(Point) == Point("a.txt", 7)
        with pytest.raises(StateTooLargeError, match="larger state_capacity"):
            cb.export(b"y" * 257)
        with pytest.raises(TypeError):
            cb.export(None)
        assert read_cb(cb.fd).export.version == 2  # refused exports change nothing
    peer.close()


def test_export_records_stream_positions_and_restarts_the_log():
    cb, peer = new_box()
    with cb:
        peer.sendall(b"hello\nworld\n")
        assert cb.conn.readline() == b"hello\n"
        cb.conn.sendall(b"0123456789")
        cb.export(b"s")
        image = read_cb(cb.fd)
        assert (image.export.sent, image.export.received) == (10, 6)
        assert image.log_end == 12  # "world\n" read ahead, not consumed: still logged
        assert image.log(6, 12) == b"world\n"
    peer.close()


def test_a_torn_inactive_slot_never_shows():
    """Whatever a crashed export left in the slot it was writing, the last complete
    export is what a reader gets."""
    cb, peer = new_box()
    with cb:
        cb.export(Point("one", 1))
        before = read_cb(cb.fd)
        inactive = cbformat.slot_offset(0, cb.region.state_capacity)  # export 2 would go there
        for garbage in (b"\xff" * 80, b"\x03" + bytes(70), os.urandom(64 + 256)):
            os.pwrite(cb.fd, garbage, inactive)
            after = read_cb(cb.fd)
            assert after.export == before.export
    peer.close()


def test_reader_never_sees_a_torn_export_from_a_running_writer():
    """A writer process exports as fast as it can; this process reads concurrently.
    Every image is internally consistent and versions never go back."""
    writer, fd = _spawn_writer()
    try:
        seen, last = 0, 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            image = read_cb(fd)
            _check_writer_image(image)
            assert image.export.version >= last
            last = image.export.version
            seen += 1
        assert last > 1000, "the writer did not run concurrently"
        assert seen > 100
    finally:
        writer.kill()
        writer.wait()
        os.close(fd)


def test_the_check_of_a_box_never_fails_on_a_running_writer():
    """check_cb reads the version, the active slot and log_end apart; a writer exporting
    as fast as it can (an export every few µs) never makes it report a valid box as
    corrupt. Through a mapping (word loads) it always passes, as read_cb does; with pread
    (how the agent reads a box: a system call per word) a try can take longer than two
    exports, so a check may give up as read_cb's copy may, saying why, never otherwise."""
    writer, fd = _spawn_writer()
    try:
        session = read_cb(fd).session_id
        checks, deadline = 0, time.monotonic() + 2.0
        with Region(fd, label="box") as mapped, Region(fd, label="box", map=False) as read:
            assert mapped.mapped and not read.mapped
            while time.monotonic() < deadline:
                assert check_cb(mapped) == session
                try:
                    assert check_cb(read) == session
                except CbFormatError as e:
                    assert "the active slot kept being rewritten" in str(e)
                checks += 1
            assert read_cb(fd).export.version > 1000, "the writer did not run concurrently"
            os.kill(writer.pid, signal.SIGSTOP)  # a frozen owner: no try is ever torn
            assert check_cb(read) == session
        assert checks > 10
    finally:
        writer.kill()
        writer.wait()
        os.close(fd)


def test_writer_killed_at_any_moment_leaves_a_valid_box():
    for _ in range(15):
        writer, fd = _spawn_writer()
        try:
            time.sleep(0.02 + 0.05 * (os.urandom(1)[0] / 255))
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait()
            _check_writer_image(read_cb(fd))
        finally:
            writer.kill()
            writer.wait()
            os.close(fd)


_WRITER = textwrap.dedent("""
    import array, socket, sys
    from backdoors.continuations import NullRegistrar, create_cb
    parent = socket.socket(fileno=int(sys.argv[1]))
    a, b = socket.socketpair()
    cb = create_cb(a, state_capacity=4096, log_capacity=64, registrar=NullRegistrar())
    parent.sendmsg([b"cb"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [cb.fd]))])
    n = 0
    while True:
        n += 1
        cb.export({"n": n, "pad": bytes([n % 251]) * (n % 3000)})
""")


def _spawn_writer():
    mine, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(theirs.fileno())],
                            pass_fds=[theirs.fileno()])
    theirs.close()
    mine.settimeout(10)
    _, ancdata, _, _ = mine.recvmsg(16, socket.CMSG_SPACE(4))
    mine.close()
    fd = int.from_bytes(ancdata[0][2][:4], sys.byteorder)
    return proc, fd


def _check_writer_image(image) -> None:
    state = image.state()
    if state is None:
        assert image.export.version == 0
        return
    n = state["n"]
    assert image.export.version == n
    assert state["pad"] == bytes([n % 251]) * (n % 3000)


# ---------------------------------------------------------------- the resumption plan


def test_plan_replays_the_log_and_skips_what_was_handed():
    image = parse_cb(VALID)
    assert (image.export.sent, image.export.received, image.log_end) == (100, 9, 18)
    plan = image.plan(handed=150, read=18)
    assert plan.skip == 50 and plan.replay == b"line two\n"
    # the kernel read more than log_end says: the receive copied them before log_end moved
    assert image.plan(handed=100, read=18).skip == 0


@pytest.mark.parametrize("handed, read, match", [
    (99, 18, "newer than the socket"),  # handed < sent at export
    (100, 8, "newer than the socket"),  # read < received at export
    (100, 17, "beyond the 17 bytes"),  # log_end > read
    (100, 9 + 129, "more than the receive log holds"),
    (-1, 18, "not a stream position"),
])
def test_plan_refuses_a_box_that_disagrees_with_the_socket(handed, read, match):
    with pytest.raises(RecoveryError, match=match):
        parse_cb(VALID).plan(handed, read)


def test_a_channel_box_says_so_and_its_plan_discounts_the_syn():
    """A socket that did connect() has its SYN in the kernel's count of bytes handed: its
    box (a channel of the server on some port) carries the flag and that port, the plan
    takes the SYN off, and a header with the flag but no port (or the reverse, or an
    unknown flag) is refused by offset."""
    from backdoors.continuations.box import new_box as make
    from backdoors.tcprepair import bytes_handed

    with socket.create_server(("127.0.0.1", 0)) as server:
        out = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        assert bytes_handed(out) == 1  # the SYN
        cb = make(out, state_capacity=256, log_capacity=128, registrar=NullRegistrar(),
                  channel_of=8080)
        with cb:
            cb.conn.sendall(b"call 1\n")
            cb.export(b"s")
            cb.conn.sendall(b"call 2\n")
            data = region_bytes(cb)
            image = parse_cb(data)
            assert image.active_open and image.home_port == 8080
            assert cbformat.home_port(data[:cbformat.HEADER_SIZE]) == 8080
            assert cbformat.server_port(data[:cbformat.HEADER_SIZE], 41000) == 8080
            plan = image.plan(bytes_handed(out), 0)
            assert (plan.sent, plan.handed, plan.skip) == (7, 14, 7)
            with pytest.raises(RecoveryError, match="active open"):
                image.plan(0, 0)
        peer.close()
    assert not parse_cb(VALID).active_open and cbformat.home_port(VALID[:128]) == 0
    assert cbformat.server_port(VALID[:128], 8081) == cbformat.server_port(b"", 8081) == 8081
    for flags, port, match in ((1, 0, "needs a home_port"), (0, 80, "needs a home_port"),
                               (2, 80, "unknown flags")):
        bad = bytearray(data)
        bad[106:110] = flags.to_bytes(2, "little") + port.to_bytes(2, "little")
        with pytest.raises(CbFormatError, match="offset 106"):
            parse_cb(bytes(bad))
        with pytest.raises(CbFormatError, match=match):
            parse_cb(bytes(bad))


# ---------------------------------------------------------------- hostile regions


def parse_or_error(data: bytes):
    """parse_cb's image of `data`, None if it refuses it; check_cb (the agent's check of
    a box's header and active slot, in a memfd) must agree: the same session, or a refusal."""
    checked = _check_in_memfd(data)
    try:
        image = parse_cb(data)
    except CbFormatError as err:
        assert str(err)
        assert checked is None, "check_cb passed what parse_cb refuses"
        return None
    assert checked == image.session_id
    assert cbformat.region_size(image.state_capacity, image.log_capacity) <= len(data)
    assert len(image.export.data) <= image.state_capacity
    assert image.export.received <= image.log_end <= image.export.received + image.log_capacity
    assert len(image.ring) == image.log_capacity
    try:
        image.state()
    except CbFormatError:
        pass
    return image


def _check_in_memfd(data: bytes) -> str | None:
    fd = os.memfd_create("bdcb:check")
    try:
        os.write(fd, data)
        try:
            with Region(fd, label="box", map=False) as region:
                return check_cb(region, budget_s=0.01)
        except CbFormatError as err:
            assert str(err)
            return None
    finally:
        os.close(fd)


@SETTINGS
@given(st.binary(max_size=1200))
def test_random_bytes(data):
    parse_or_error(data)


@SETTINGS
@given(st.binary(min_size=cbformat.HEADER_SIZE, max_size=1200))
def test_random_bytes_behind_a_valid_magic(data):
    parse_or_error(cbformat.MAGIC + (1).to_bytes(2, "little") + (128).to_bytes(2, "little")
                   + (64).to_bytes(4, "little") + data[12:])


@SETTINGS
@given(st.integers(0, len(VALID) - 1), st.integers(0, 255))
def test_any_single_byte_changed(offset, value):
    data = bytearray(VALID)
    data[offset] = value
    image = parse_or_error(bytes(data))
    active = cbformat.slot_offset(1, 256)  # VALID holds export 1
    if image is not None and active <= offset < active + 64 + len(image.export.data):
        # the active export is covered by seq, zero checks and CRC, all but its timestamp
        assert active + 40 <= offset < active + 48 or value == VALID[offset]


@SETTINGS
@given(st.integers(0, len(VALID) - 1))
def test_truncated_copies(length):
    with pytest.raises(CbFormatError):
        parse_cb(VALID[:length])


@SETTINGS
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_hostile_positions_and_versions(version, log_end, sent):
    data = bytearray(VALID)
    data[cbformat.OFF_EXPORT_VERSION:cbformat.OFF_EXPORT_VERSION + 8] = version.to_bytes(8, "little")
    data[cbformat.OFF_LOG_END:cbformat.OFF_LOG_END + 8] = log_end.to_bytes(8, "little")
    slot = cbformat.slot_offset(version & 1, 256)
    data[slot + 8:slot + 16] = sent.to_bytes(8, "little")
    image = parse_or_error(bytes(data))
    if image is not None:
        try:
            image.plan(handed=2**63, read=image.log_end)
        except RecoveryError:
            pass


def test_hostile_fds():
    """Regions that are too small, unsealed, truncated, or not files at all."""
    fd = os.memfd_create("bdcb:test", os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, VALID[:200])  # unsealed and short: read with pread, refused
        with pytest.raises(CbFormatError, match="outside the Continuation Box region|truncated"):
            read_cb(fd)
        os.ftruncate(fd, 0)
        with pytest.raises(CbFormatError):
            read_cb(fd)
        os.pwrite(fd, VALID, 0)
        assert read_cb(fd).export.version == 1  # unsealed but whole: fine
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        with pytest.raises(CbFormatError):
            read_cb(r)
    finally:
        os.close(r)
        os.close(w)


def test_region_of_the_recovering_server_continues_the_export_versions():
    region = CbRegion.create(b"s" * 16, state_capacity=64, log_capacity=64)
    try:
        region.write_export(41, 10, 5, cbformat.Encoding.RAW, b"state")
        region.put_log(5, b"abc")
        region.set_log_end(8)
        image = read_cb(region.fd)
        assert image.export.version == 41 and image.log(5, 8) == b"abc"
    finally:
        region.close()


def test_a_copy_racing_the_writer_keeps_the_export_but_cannot_plan():
    from backdoors.continuations.image import _without_log

    image = _without_log(VALID, 1)
    assert image.export == parse_cb(VALID).export and not image.log_complete
    assert image.log_end == image.export.received
    with pytest.raises(RecoveryError, match="freeze"):
        image.plan(handed=100, read=18)


def test_deeply_nested_state_is_a_format_error_not_a_recursion_error():
    """A CB's state comes from whoever wrote the box, and an evacuation carries it to
    another node's server: msgpack nested deeper than the decoder's recursion limit must be
    the documented CbFormatError (not RecursionError, which servers do not expect)."""
    from backdoors.continuations.image import decode_state
    nested = b"\x91" * 100_000 + b"\x00"
    with pytest.raises(CbFormatError, match="does not decode"):
        decode_state(cbformat.Encoding.MSGPACK, nested, None, "deep")


# ---------------------------------------------------------------- live parts (an evacuate's copy)


def _copy_of_parts(data: bytes, read_pos: int):
    """The region a target agent rebuilds from the live parts of `data`, and the parts."""
    from backdoors.continuations.adoption import cb_memfd
    from backdoors.continuations.image import live_parts

    parts = live_parts(lambda off, n: data[off:off + n], len(data), read_pos)
    fd = cb_memfd("cb", b"".join(data[o:o + n] for o, n in parts), parts, len(data))
    try:
        return os.pread(fd, len(data) + 1, 0), parts
    finally:
        os.close(fd)


@given(st.lists(st.tuples(st.integers(1, 90), st.booleans()), min_size=1, max_size=12),
       st.integers(0, 200))
@settings(max_examples=150, deadline=None)
def test_a_copy_of_the_live_parts_plans_as_the_whole_box_does(steps, ahead):
    """Reads of random sizes through a ring that wraps, exports now and then: the box
    rebuilt from its live parts (header, slots, the log from the export to the socket's
    read count) gives the same state and resumption plan as the whole box, with the
    ring's other bytes left out."""
    cb, peer = new_box(state_capacity=64, log_capacity=128)
    try:
        for n, export in steps:
            if cb.conn.log_room < n:  # as a server must
                cb.export(b"full")
            peer.sendall(bytes(range(n)))
            assert len(cb.conn.read(n)) == n
            if export:
                cb.export(b"s%d" % n)
        data = region_bytes(cb)
    finally:
        cb.close()
        peer.close()
    whole = parse_cb(data)
    # the socket may have read beyond log_end (a receive not yet recorded)
    read_pos = min(whole.log_end + ahead, whole.export.received + 128)
    copy, parts = _copy_of_parts(data, read_pos)
    assert len(copy) == len(data)
    image = parse_cb(copy)
    assert image.state() == whole.state() and image.export == whole.export
    assert image.plan(whole.export.sent, read_pos) == whole.plan(whole.export.sent, read_pos)
    if read_pos - whole.export.received < 120:
        assert sum(n for _, n in parts) < len(data) - 8  # not the whole ring
    assert all(copy[o:o + n] == data[o:o + n] for o, n in parts)


def test_the_live_parts_of_a_box_that_does_not_parse_are_the_whole_box():
    from backdoors.continuations.image import live_parts

    for bad in (b"\0" * len(VALID), VALID[:64] + b"\xff" * (len(VALID) - 64)):
        assert live_parts(lambda off, n, b=bad: b[off:off + n], len(bad), 0) == [(0, len(bad))]
    # capacities larger than the region, positions out of order
    big = bytearray(VALID)
    big[40:48] = (1 << 20).to_bytes(8, "little")
    assert live_parts(lambda off, n: bytes(big[off:off + n]), len(big), 18) == [(0, len(big))]
    assert live_parts(lambda off, n: VALID[off:off + n], len(VALID), 5) != [(0, len(VALID))]
    assert live_parts(lambda off, n: VALID[off:off + n], len(VALID), 1 << 62) == [(0, len(VALID))]


def test_reading_a_handed_copy_allocates_no_page_for_its_holes():
    """A target reads each handed box once (adoption.prepare): with pread its ring's holes
    stay holes, where loads through a mapping would give each a fresh zeroed page."""
    from backdoors.continuations.adoption import Handover, cb_memfd, prepare
    from backdoors.continuations.image import live_parts

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with create_cb(conn, log_capacity=1 << 20, registrar=NullRegistrar()) as cb:
            client.sendall(b"request\n")
            cb.conn.readline()
            cb.export(b"state")
            data = region_bytes(cb)
            session = read_cb(cb.fd).session_id
        parts = live_parts(lambda off, n: data[off:off + n], len(data), 8)
        copy = b"".join(data[o:o + n] for o, n in parts)
        grown = {}
        for name, read in (("prepare", lambda fd: prepare(client, fd, Handover(session, 0, 8)).image),
                           ("mapped", lambda fd: read_cb(fd, map=True))):
            fd = cb_memfd("cb", copy, parts, len(data))
            try:
                before = os.fstat(fd).st_blocks
                assert read(fd).state() == b"state"
                grown[name] = os.fstat(fd).st_blocks - before
            finally:
                os.close(fd)
        client.close()
    assert grown["prepare"] == 0
    assert grown["mapped"] * 512 >= 1 << 20  # what a mapping costs: the whole ring


@SETTINGS
@given(v6=st.booleans(), local=st.integers(0, 2**128 - 1), remote=st.integers(0, 2**128 - 1),
       lport=st.integers(0, 65535), rport=st.integers(0, 65535), scope=st.booleans())
def test_a_box_keeps_its_endpoints_as_given(v6, local, remote, lport, rport, scope):
    """The endpoints written into a new box's header read back as the same addresses
    (IPv4, IPv6, an IPv6 address with a scope: the scope is not stored), in the forms
    Python's socket calls give them."""
    family, make = ((socket.AF_INET6, ipaddress.IPv6Address) if v6
                    else (socket.AF_INET, lambda n: ipaddress.IPv4Address(n % 2**32)))
    la, ra = str(make(local)), str(make(remote))
    region = CbRegion.create(os.urandom(16), state_capacity=64, log_capacity=64,
                             endpoints=(family, (f"{la}%lo" if v6 and scope else la, lport),
                                        (ra, rport)))
    try:
        image = read_cb(region.fd, map=False)
    finally:
        region.close()
    assert (image.family, image.local, image.remote) == (family, (la, lport), (ra, rport))


def test_a_box_copy_keeps_the_holes_of_a_sparse_box():
    """Outside review: an agent's copy of a node's box (readopt, adopt) wrote every byte,
    zeros too: a sparse 16 MiB box the node paid nothing for became 16 MiB of the agent's
    memory. Pages of zeros are now left holes."""
    import os

    from backdoors.continuations.adoption import cb_memfd

    data = bytearray(16 << 20)
    data[:10], data[5 << 20:(5 << 20) + 5] = b"x" * 10, b"y" * 5
    fd = cb_memfd("cb-sparse", bytes(data))
    try:
        assert os.fstat(fd).st_blocks * 512 <= 2 * 4096
        assert os.pread(fd, 10, 0) == b"x" * 10 and os.pread(fd, 5, 5 << 20) == b"y" * 5
        assert os.pread(fd, 4096, 1 << 20) == bytes(4096) and os.fstat(fd).st_size == 16 << 20
    finally:
        os.close(fd)
