"""Reading a Continuation Box from outside, validated, and planning a session's resumption.

The reader never trusts the region: `parse_cb` checks every field of a copy against the ABI
and turns anything unexpected into a CbFormatError naming the field and its offset.
`read_cb` copies a region consistently even while its owner keeps exporting (the active
slot's seq word is read before and after the copy), and a frozen or killed owner never
blocks it: the slot an export rewrites is never the active one.

`CbImage.plan(handed, read)` is the heart of log-based rollback: from the kernel's byte
counts of the session socket it derives how much regenerated output the client already
has (to skip) and which input to replay, after checking that CB and socket agree.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from ..common.preamble import Preamble, check_preamble
from ..errors import SensorBoxError
from ..sensors.region import Region
from . import cbformat
from .errors import CbFormatError, RecoveryError

READ_BUDGET_S = 0.25  # how long a reader keeps trying against a writer that keeps exporting
LOG_RETRIES = 8
_MAX_POSITION = 1 << 62
_MAX_COPY = cbformat.region_size(cbformat.MAX_STATE_CAPACITY, cbformat.MAX_LOG_CAPACITY)


@dataclass(frozen=True)
class Export:
    """One export as stored in the active slot: the state and the stream positions."""

    version: int  # 0: never exported (no state)
    sent: int  # output stream position when it was taken
    received: int  # input stream position when it was taken
    encoding: cbformat.Encoding
    data: bytes
    exported_at_ns: int


@dataclass(frozen=True)
class ResumePlan:
    """How a recovering server resumes a session from its last export.

    Its regenerated output starts at stream position `sent`; the client already has (or
    will get from the restored send queue) everything before `handed`, so the first
    `skip` bytes are discarded. Its input restarts at `received`: `replay` holds the
    bytes up to `read`, the position the restored socket continues from.
    """

    version: int
    sent: int
    received: int
    handed: int
    read: int
    replay: bytes
    tail: bytes = b""  # the last bytes of output before `handed`, to check regeneration

    @property
    def skip(self) -> int:
        return self.handed - self.sent


@dataclass(frozen=True)
class CbImage:
    """A validated copy of one Continuation Box."""

    session: bytes
    owner_pid: int
    state_capacity: int
    log_capacity: int
    export: Export
    log_end: int
    recoveries: int
    family: int
    local: tuple[str, int] | None
    remote: tuple[str, int] | None
    ring: bytes
    # False when the copy was taken while the owner kept exporting: the export is whole,
    # but the log may already be reused, so the image cannot plan a resumption.
    log_complete: bool = True
    # its socket did connect(): the kernel's count of bytes handed includes the SYN
    active_open: bool = False
    home_port: int = 0  # a channel's: the port of the server it belongs to

    @property
    def session_id(self) -> str:
        return self.session.hex()

    def log(self, start: int, end: int) -> bytes:
        """Input bytes at stream positions [start, end) from the ring (at most its size)."""
        cap, count = self.log_capacity, end - start
        if count <= 0:
            return b""
        if count > cap:
            raise ValueError(f"positions [{start}, {end}) span more than the ring ({cap})")
        first = start % cap
        if first + count <= cap:
            return self.ring[first:first + count]
        return self.ring[first:] + self.ring[:first + count - cap]

    def state(self, type: Any = None) -> Any:  # noqa: A002 - mirrors msgspec
        """The exported state (decoded), or None if the session was never exported."""
        return decode_state(self.export.encoding, self.export.data, type, self.session_id)

    def plan(self, handed: int, read: int, tail: bytes = b"") -> ResumePlan:
        """The resumption of this session given the socket's byte counts.

        `handed`/`read`: bytes the old application had written to / read from the socket
        at the dump (tcprepair's TcpState.handed and .read). `tail`: optionally the last
        bytes of output ending at `handed` (the dumped send queue), to check that the
        recovering server regenerates the same bytes. RecoveryError if they disagree.
        """
        ex, where = self.export, f"session {self.session_id} (export {self.export.version})"
        if not self.log_complete:
            raise RecoveryError(
                f"{where}: the box was copied while its owner kept exporting, so its receive "
                "log is incomplete: freeze (or lose) the owner before reading it for recovery"
            )
        for value, what in ((handed, "handed"), (read, "read")):
            if not (isinstance(value, int) and 0 <= value < _MAX_POSITION):
                raise RecoveryError(f"{where}: byte count {what}={value!r} is not a stream position")
        if self.active_open:  # the kernel counted its SYN as handed
            if handed < 1:
                raise RecoveryError(f"{where}: an active open with handed=0 (its SYN counts 1)")
            handed -= 1
        if handed < ex.sent:
            raise RecoveryError(
                f"{where}: the socket had {handed} bytes handed but the export was taken after "
                f"{ex.sent} sent: the CB is newer than the socket (not the same session?)"
            )
        if read < ex.received:
            raise RecoveryError(
                f"{where}: the socket had {read} bytes read but the export was taken after "
                f"{ex.received} received: the CB is newer than the socket (not the same session?)"
            )
        if read - ex.received > self.log_capacity:
            raise RecoveryError(
                f"{where}: {read - ex.received} bytes were read since the export, more than the "
                f"receive log holds ({self.log_capacity}): the log cannot have recorded them"
            )
        if self.log_end > read:
            raise RecoveryError(
                f"{where}: the receive log ends at input position {self.log_end}, beyond the "
                f"{read} bytes the socket says were read: CB and socket do not match"
            )
        if len(tail) > handed:
            raise RecoveryError(f"{where}: check tail of {len(tail)} bytes exceeds handed={handed}")
        return ResumePlan(
            version=ex.version, sent=ex.sent, received=ex.received, handed=handed,
            read=read, replay=self.log(ex.received, read), tail=bytes(tail),
        )


_DECODERS: dict[Any, msgspec.msgpack.Decoder] = {}


def decode_state(encoding: cbformat.Encoding, data: bytes, type: Any, session: str) -> Any:  # noqa: A002
    """Decode state data as stored with `encoding`; CbFormatError if it does not decode."""
    if encoding is cbformat.Encoding.NONE:
        return None
    if encoding is cbformat.Encoding.RAW:
        return data
    decoder = _DECODERS.get(type)
    if decoder is None:
        decoder = _DECODERS[type] = msgspec.msgpack.Decoder(Any if type is None else type)
    try:
        return decoder.decode(data)
    # RecursionError: msgpack nested deeper than msgspec's limit (a hostile box's state,
    # which an evacuation carries to another node's server)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as err:
        raise CbFormatError(f"session {session}: exported state does not decode: {err}") from None


def parse_cb(data: bytes | bytearray | memoryview) -> CbImage:
    """Validate a copy of a CB region and decode it; CbFormatError on anything malformed."""
    data = bytes(data)
    (pid, session, state_cap, log_cap, export_version, log_end, recoveries, family,
     lport, laddr, raddr, rport, flags, home) = parse_header(data)
    need = cbformat.region_size(state_cap, log_cap)
    if len(data) < need:
        raise CbFormatError(f"region truncated: {len(data)} bytes, its capacities need {need}")
    local, remote = _endpoints(family, laddr, lport, raddr, rport)
    index = export_version & 1
    at = cbformat.slot_offset(index, state_cap)
    export = _parse_slot(memoryview(data)[at:at + cbformat.SLOT_HEADER_SIZE + state_cap],
                         index, export_version, state_cap)
    _check_log_end(log_end, export, log_cap)
    ring_at = cbformat.log_offset(state_cap)
    return CbImage(
        session=session, owner_pid=pid, state_capacity=state_cap, log_capacity=log_cap,
        export=export, log_end=log_end, recoveries=recoveries, family=family,
        local=local, remote=remote, ring=data[ring_at:ring_at + log_cap],
        active_open=bool(flags & cbformat.FLAG_ACTIVE_OPEN), home_port=home,
    )


def _check_log_end(log_end: int, export: Export, log_cap: int) -> None:
    if not export.received <= log_end <= export.received + log_cap:
        raise CbFormatError(
            f"header (offset 56): log_end {log_end} is outside [{export.received}, "
            f"{export.received + log_cap}] (export {export.version} received + log capacity)"
        )


PREAMBLE = Preamble("Continuation Box", cbformat.MAGIC, cbformat.VERSION, cbformat.HEADER_SIZE,
                    cbformat.SLOT_HEADER_SIZE, "slot_header")


def parse_header(data: bytes) -> tuple:
    """Check the fixed header; return its fields from owner_pid on (see layout.HEADER)."""
    check_preamble(data, PREAMBLE, CbFormatError)
    _magic, _version, _hsize, _ssize, *fields, reserved = cbformat.HEADER.unpack_from(data)
    try:
        cbformat.check_capacities(fields[2], fields[3])
    except ValueError as err:
        raise CbFormatError(f"header (offset 32): {err}") from None
    if fields[-2] & ~cbformat.FLAGS:
        raise CbFormatError(f"header (offset 106): unknown flags {fields[-2]:#x}")
    if bool(fields[-2] & cbformat.FLAG_ACTIVE_OPEN) != bool(fields[-1]):
        raise CbFormatError("header (offset 106): a channel (active open) needs a home_port "
                            "and only a channel has one")
    if any(reserved):
        raise CbFormatError("header (offset 110): reserved bytes are not zero")
    _check_version(fields[4])
    return tuple(fields)


def _check_version(version: int) -> None:
    if version >= _MAX_POSITION:
        raise CbFormatError(f"header (offset 48): export_version {version} is out of range")


def _parse_slot(slot: bytes | memoryview, index: int, version: int, state_cap: int) -> Export:
    """Slot `index` of export `version` from its bytes: the slot header, then (at least
    as much as the header says is there) its state."""
    off = cbformat.slot_offset(index, state_cap)
    where = f"slot {index} (offset {off}) of export {version}"
    seq, sent, received, length, encoding, res1, crc, res2, at_ns, res3 = cbformat.SLOT.unpack_from(slot)
    if seq != 2 * version:
        state = "being rewritten" if seq & 1 else f"holding export {seq // 2}"
        raise CbFormatError(f"{where}: seq {seq} says the slot is {state}, expected {2 * version}")
    if res1 or res2 or any(res3):
        raise CbFormatError(f"{where}: reserved fields are not zero")
    if length > state_cap:
        raise CbFormatError(f"{where}: state length {length} exceeds state capacity {state_cap}")
    try:
        enc = cbformat.Encoding(encoding)
    except ValueError:
        raise CbFormatError(f"{where}: unknown state encoding {encoding}") from None
    if sent >= _MAX_POSITION or received >= _MAX_POSITION:
        raise CbFormatError(f"{where}: stream positions sent={sent} received={received} out of range")
    if (version == 0) != (enc is cbformat.Encoding.NONE):
        raise CbFormatError(f"{where}: encoding {enc.name} does not fit export version {version}")
    if version == 0 and (length or sent or received):
        raise CbFormatError(f"{where}: a session never exported must have no state and positions 0")
    body = bytes(slot[cbformat.SLOT_HEADER_SIZE:cbformat.SLOT_HEADER_SIZE + length])
    if zlib.crc32(body, zlib.crc32(slot[8:32])) != crc:
        raise CbFormatError(f"{where}: positions or state fail their CRC32 (corrupt or torn)")
    return Export(version, sent, received, enc, body, at_ns)


def _endpoints(family, laddr, lport, raddr, rport):
    if family == 0:
        if any(laddr) or any(raddr) or lport or rport:
            raise CbFormatError("header (offset 68): addresses given for family 0 (unknown)")
        return None, None
    if family == socket.AF_INET:
        if any(laddr[4:]) or any(raddr[4:]):
            raise CbFormatError("header (offset 72): IPv4 addresses with non-zero padding")
        make = lambda raw: socket.inet_ntop(socket.AF_INET, raw[:4])  # noqa: E731
    elif family == socket.AF_INET6:
        make = lambda raw: str(ipaddress.IPv6Address(raw))  # noqa: E731
    else:
        raise CbFormatError(f"header (offset 68): unknown socket family {family}")
    return (make(laddr), lport), (make(raddr), rport)


def read_cb(source: Region | int, budget_s: float = READ_BUDGET_S, *,
            map: bool = True) -> CbImage:  # noqa: A002 - Region's word
    """A consistent, validated image of the CB held by `source` (a Region or an fd).

    Works on a region whose owner is running (retries for up to `budget_s` while it
    rewrites, mostly asleep), frozen or dead. CbFormatError if the region is malformed or
    does not settle in time. `map=False` reads an fd with pread: for a copy read once
    (a handed-over box), whose holes a mapping would fill with fresh zeroed pages.
    """
    region = source if isinstance(source, Region) else _region(source, map)
    try:
        return _read(region, budget_s)
    except SensorBoxError as err:  # the Region's bounds checks
        raise CbFormatError(str(err).replace("region", "Continuation Box region", 1)) from None
    finally:
        if region is not source:
            region.close()


def read_copy(fd: int) -> CbImage:
    """The validated image of a CB copy that no process writes (one an agent made for a
    hand-over): read with one pread, no seqlock. CbFormatError if it is malformed."""
    try:
        data = os.pread(fd, min(os.fstat(fd).st_size, _MAX_COPY), 0)
    except OSError as err:
        raise CbFormatError(f"Continuation Box fd {fd}: cannot read it: {err.strerror}") from None
    return parse_cb(data)


def _region(fd: int, map: bool) -> Region:  # noqa: A002
    try:
        return Region(fd, label=f"Continuation Box fd {fd}", map=map)
    except SensorBoxError as err:
        raise CbFormatError(str(err)) from None


def _read(region: Region, budget_s: float) -> CbImage:
    """Copy under the active slot's seqlock; see read_cb.

    A copy is whole when the active slot's seq word reads 2v before and after it: the
    writer rewrites a slot (seq odd) only two exports later. The export version must also
    stay put for the log to belong to that export; a writer exporting faster than this
    reader copies gets, after a few tries, the whole export with an empty, flagged log.
    A copy fails only when the writer finished two exports while it was made; such runs
    come in streaks (tens of tries in a row, under load), hence a time budget.
    """
    fields = parse_header(region.read(0, cbformat.HEADER_SIZE))
    state_cap, log_cap = fields[2], fields[3]
    size = cbformat.region_size(state_cap, log_cap)
    for attempt in _tries(region.label, budget_s):
        version = region.load_word(cbformat.OFF_EXPORT_VERSION)
        seq_at = cbformat.slot_offset(version & 1, state_cap) + cbformat.SLOT_OFF_SEQ
        before = region.load_word(seq_at)
        data = region.read(0, size)
        after = region.load_word(seq_at)
        stable = region.load_word(cbformat.OFF_EXPORT_VERSION) == version
        if before != after or before & 1:
            _pause(attempt)  # the slot was being rewritten
            continue
        if before != 2 * version or stable:
            # A writer never touches the active slot: a wrong seq here is corruption,
            # which parse_cb reports precisely.
            return parse_cb(data)
        if attempt > LOG_RETRIES:
            return _without_log(data, version)
    raise AssertionError("unreachable: _tries raises when the tries are over")


def _tries(label: str, budget_s: float) -> Iterator[int]:
    """A seqlock reader's attempts, numbered from 1: at least 2 * LOG_RETRIES, then on
    until `budget_s` is spent; CbFormatError once they are over."""
    give_up = time.monotonic() + budget_s
    attempt = 0
    while attempt < LOG_RETRIES * 2 or time.monotonic() < give_up:
        attempt += 1
        yield attempt
    raise CbFormatError(f"{label}: no consistent copy after {attempt} tries in {budget_s:g} s: "
                        "the active slot kept being rewritten")


def _pause(attempt: int) -> None:
    """Before trying again: at once for the first LOG_RETRIES, then mostly asleep."""
    time.sleep(0 if attempt <= LOG_RETRIES else 0.0005)


def check_cb(region: Region, budget_s: float = READ_BUDGET_S) -> str:
    """The session id of the CB in `region` once its header and active slot pass the
    checks parse_cb makes of them (and the region is as large as its capacities say);
    CbFormatError as read_cb's. Only those parts are read, not the other slot or the
    receive log: what the agent checks when a box is registered, for the price of its
    header and state rather than of its capacities (a channel's log is 256 KiB)."""
    try:
        return _check(region, budget_s)
    except SensorBoxError as err:  # the Region's bounds checks
        raise CbFormatError(str(err).replace("region", "Continuation Box region", 1)) from None


def _check(region: Region, budget_s: float) -> str:
    """See check_cb. The header's fields fixed at creation are checked once; each try
    then reads the export version, the active slot (one read) under its seq word and
    log_end, with no work in between, as _read copies: a writer exporting in a tight loop
    (an export every few µs) rewrites the slot two exports later, so a slower try never
    settles. log_end is checked
    against the export when the version stayed put through the try; after LOG_RETRIES
    tries that did not, the export alone (what _read's copy without a log holds)."""
    fields = parse_header(region.read(0, cbformat.HEADER_SIZE))
    session, state_cap, log_cap = fields[1:4]
    need = cbformat.region_size(state_cap, log_cap)
    if (size := region.current_size()) < need:
        raise CbFormatError(f"region truncated: {size} bytes, its capacities need {need}")
    family, lport, laddr, raddr, rport = fields[7:12]
    _endpoints(family, laddr, lport, raddr, rport)
    for attempt in _tries(region.label, budget_s):
        version = region.load_word(cbformat.OFF_EXPORT_VERSION)
        seq_at = cbformat.slot_offset(version & 1, state_cap) + cbformat.SLOT_OFF_SEQ
        before = region.load_word(seq_at)
        slot = region.read(seq_at - cbformat.SLOT_OFF_SEQ, cbformat.SLOT_HEADER_SIZE + state_cap)
        after = region.load_word(seq_at)
        log_end = region.load_word(cbformat.OFF_LOG_END)
        stable = region.load_word(cbformat.OFF_EXPORT_VERSION) == version
        if before != after or before & 1 or before != 2 * version and not stable:
            # the slot was being rewritten (two exports since the version was read); a
            # wrong seq in a slot that stays put is corruption, which _parse_slot names
            _pause(attempt)
            continue
        _check_version(version)
        export = _parse_slot(slot, version & 1, version, state_cap)
        if stable:
            _check_log_end(log_end, export, log_cap)
        elif attempt <= LOG_RETRIES:
            continue  # log_end may be a later export's: try for a steady one
        return session.hex()
    raise AssertionError("unreachable: _tries raises when the tries are over")


def _without_log(data: bytes, version: int) -> CbImage:
    """The image of export `version` (whole in `data`) with its log marked incomplete."""
    fixed = bytearray(data)
    fixed[cbformat.OFF_EXPORT_VERSION:cbformat.OFF_EXPORT_VERSION + 8] = version.to_bytes(8, "little")
    state_cap = int.from_bytes(fixed[32:40], "little")
    slot = cbformat.slot_offset(version & 1, state_cap)
    received = fixed[slot + 16:slot + 24]
    fixed[cbformat.OFF_LOG_END:cbformat.OFF_LOG_END + 8] = received  # an empty log
    return dataclasses.replace(parse_cb(fixed), log_complete=False)


def live_parts(read: Callable[[int, int], bytes], size: int, read_pos: int
               ) -> list[tuple[int, int]]:
    """The (offset, length) ranges of a `size`-byte CB region that a recovery reads, in
    order: the header, each slot's header and state data, and the receive log's bytes
    from the active export's `received` position to `read_pos` (the socket's count of
    bytes read, tcprepair's `read`) or log_end, whichever is later. The rest of a box is
    mostly an empty ring: a copy of only these parts is the same box to a recovery.
    [(0, size)] when the header or the active slot's positions do not parse: the whole
    box, for the recovery to report what is wrong with it. `read(offset, length)` reads
    the region (frozen or dead owner: the parts are read after this returns)."""
    try:
        fields = parse_header(read(0, cbformat.HEADER_SIZE))
    except (CbFormatError, SensorBoxError):
        return [(0, size)]
    state_cap, log_cap, version, log_end = fields[2], fields[3], fields[4], fields[5]
    ring = cbformat.log_offset(state_cap)
    if cbformat.region_size(state_cap, log_cap) > size:
        return [(0, size)]
    parts = [(0, cbformat.HEADER_SIZE)]
    received = 0
    for index in (0, 1):
        at = cbformat.slot_offset(index, state_cap)
        slot = cbformat.SLOT.unpack_from(read(at, cbformat.SLOT_HEADER_SIZE))
        parts.append((at, cbformat.SLOT_HEADER_SIZE + min(slot[3], state_cap)))
        if index == version & 1:
            received = slot[2]
    end = max(read_pos, log_end)
    if not 0 <= received <= end < _MAX_POSITION:
        return [(0, size)]
    first, count = received % log_cap, min(end - received, log_cap)
    if first + count <= log_cap:
        parts.append((ring + first, count))
    else:  # it wraps: its end is at the ring's start
        parts += [(ring, first + count - log_cap), (ring + first, log_cap - first)]
    return [(offset, length) for offset, length in parts if length]
