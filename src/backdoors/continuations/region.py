"""The writable side of a Continuation Box region: creation, exports, the receive ring.

A region is an anonymous memfd sealed against shrinking and growing (a reader may map it
without fear of SIGBUS), mapped shared by its owner. Its fd is what the agent holds. The
owner is the one writer; every change readers must see consistently is ordered so that a
copy taken at any instant, even of a frozen or killed owner, is a valid box:

- export: the inactive slot is rewritten under its seq word (odd while written), then
  the export version, the commit word, is advanced with one aligned store;
- receive: the kernel copies input straight into the ring, then log_end is advanced.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
import time
import zlib

from . import cbformat

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW

Endpoints = tuple[int, tuple[str, int] | None, tuple[str, int] | None]


class CbRegion:
    """One CB region owned (written) by this process; `fd` is the handle to share."""

    def __init__(self, fd: int, mm: mmap.mmap, state_capacity: int, log_capacity: int):
        self.fd = fd
        self.state_capacity, self.log_capacity = state_capacity, log_capacity
        self.mm = mm
        self.words = memoryview(mm).cast("Q")
        self.ring_at = cbformat.log_offset(state_capacity)
        self.ring = memoryview(mm)[self.ring_at:self.ring_at + log_capacity]

    @classmethod
    def create(
        cls,
        session: bytes,
        *,
        state_capacity: int,
        log_capacity: int,
        endpoints: Endpoints = (0, None, None),
        recoveries: int = 0,
        channel_of: int = 0,
    ) -> CbRegion:
        """A new, empty box (export version 0, empty log) for `session`; `channel_of`:
        its socket is an outgoing channel (it did connect()) of the server on that port
        (cbformat's flags and home_port)."""
        cbformat.check_capacities(state_capacity, log_capacity)
        if len(session) != cbformat.SESSION_SIZE:
            raise ValueError(f"session id must be {cbformat.SESSION_SIZE} bytes")
        size = cbformat.region_size(state_capacity, log_capacity)
        fd = os.memfd_create(f"bdcb:{session.hex()}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        family, local, remote = endpoints
        cbformat.HEADER.pack_into(
            mm, 0, cbformat.MAGIC, cbformat.VERSION, cbformat.HEADER_SIZE, cbformat.SLOT_HEADER_SIZE, os.getpid(), session,
            state_capacity, log_capacity, 0, 0, recoveries, family,
            local[1] if local else 0, _packed(family, local), _packed(family, remote),
            remote[1] if remote else 0,
            cbformat.FLAG_ACTIVE_OPEN if channel_of else 0, channel_of, bytes(18),
        )
        region = cls(fd, mm, state_capacity, log_capacity)
        region.write_export(0, 0, 0, cbformat.Encoding.NONE, b"", 0)  # slot 0: "no export yet"
        return region

    @classmethod
    def take_over(cls, fd: int, *, state_capacity: int, log_capacity: int,
                  recoveries: int) -> CbRegion | None:
        """Become the writer of the box in `fd` as it is (its export, its receive log),
        with this process's pid and `recoveries`: the copy of a box an agent made for one
        hand-over, which only that agent reads. None (nothing done) if `fd` is not a
        region of a box of these capacities: a new one is made then."""
        size = cbformat.region_size(state_capacity, log_capacity)
        try:
            if os.fstat(fd).st_size != size:
                return None
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            return None
        region = cls(fd, mm, state_capacity, log_capacity)
        _U32.pack_into(mm, cbformat.OFF_PID, os.getpid())
        _U32.pack_into(mm, cbformat.OFF_RECOVERIES, recoveries)
        return region

    # -- header words ----------------------------------------------------------------

    @property
    def export_version(self) -> int:
        return self.words[cbformat.OFF_EXPORT_VERSION // 8]

    @property
    def log_end(self) -> int:
        return self.words[cbformat.OFF_LOG_END // 8]

    def set_log_end(self, position: int) -> None:
        """Advance log_end: one aligned store, after the bytes are in the ring."""
        self.words[cbformat.OFF_LOG_END // 8] = position

    # -- exports ---------------------------------------------------------------------

    def write_export(
        self, version: int, sent: int, received: int, encoding: cbformat.Encoding, data: bytes,
        exported_at_ns: int | None = None,
    ) -> None:
        """Store export `version` in its slot, then commit it with one store.

        The slot written (version & 1) is not the active one while `version` is the next
        export, so readers keep seeing the previous export, intact, until the commit.
        """
        if len(data) > self.state_capacity:
            raise ValueError(f"state of {len(data)} bytes exceeds capacity {self.state_capacity}")
        off = cbformat.slot_offset(version & 1, self.state_capacity)
        seq = (off + cbformat.SLOT_OFF_SEQ) // 8
        words, mm = self.words, self.mm
        words[seq] = 2 * version - 1 if version else 1  # odd: being rewritten
        start = off + cbformat.SLOT_HEADER_SIZE
        mm[start:start + len(data)] = data
        at = time.time_ns() if exported_at_ns is None else exported_at_ns
        fields = _SLOT_FIELDS.pack(sent, received, len(data), int(encoding), 0)
        # the fields after seq only: seq is the last store to the slot
        _SLOT_TAIL.pack_into(mm, off + 8, fields, zlib.crc32(data, zlib.crc32(fields)), 0, at, _ZERO16)
        words[seq] = 2 * version  # even: stable, holds `version`
        words[cbformat.OFF_EXPORT_VERSION // 8] = version  # the commit

    # -- ring ------------------------------------------------------------------------

    def put_log(self, start: int, data: bytes) -> None:
        """Copy input bytes for stream positions [start, start+len) into the ring."""
        cap, n = self.log_capacity, len(data)
        if n > cap:
            raise ValueError(f"{n} bytes do not fit a ring of {cap}")
        first = start % cap
        head = min(n, cap - first)
        self.ring[first:first + head] = data[:head]
        if head < n:
            self.ring[:n - head] = data[head:]

    def close(self) -> None:
        """Unmap and close this process's handle (the agent's stays valid)."""
        if self.fd < 0:
            return
        os.close(self.fd)
        self.fd = -1
        self.ring.release()
        self.words.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a receive still uses the ring (closed from another thread): GC unmaps it


_SLOT_FIELDS = struct.Struct("<QQIHH")  # sent, received, length, encoding, reserved
_SLOT_TAIL = struct.Struct("<24sIIQ16s")  # the slot header after its seq word
_ZERO16 = bytes(16)
_U32 = struct.Struct("<I")  # the pid and recoveries header fields
assert 8 + _SLOT_TAIL.size == cbformat.SLOT_HEADER_SIZE and _SLOT_FIELDS.size == 24


def endpoints_of(sock: socket.socket) -> Endpoints:
    """(family, local, remote) of an IP socket for the CB header; (0, None, None) otherwise."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return (0, None, None)
    try:
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError:
        return (0, None, None)
    return (int(sock.family), (local[0], local[1]), (remote[0], remote[1]))


def _packed(family: int, endpoint: tuple[str, int] | None) -> bytes:
    if endpoint is None:
        return bytes(cbformat.ADDR_SIZE)
    host = endpoint[0].partition("%")[0]  # (an IPv6 scope is not part of the address)
    return socket.inet_pton(family, host).ljust(cbformat.ADDR_SIZE, b"\0")
