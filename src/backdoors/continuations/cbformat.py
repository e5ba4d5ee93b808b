"""The Continuation Box binary layout (ABI version 1).

A Continuation Box (CB) is one shared-memory region per client session: a 128-byte
header, two state slots (double buffering) and the receive log, a ring of input bytes.
Everything is little-endian; every 8-byte field is 8-byte aligned, so the words a writer
changes after creation are single aligned stores. `docs/continuations.md` describes the
same layout; change both together.

Region::

    0                      header (128)
    128                    slot 0: slot header (64) + state data (state_capacity)
    192 + state_capacity   slot 1: slot header (64) + state data (state_capacity)
    256 + 2*state_capacity receive log ring (log_capacity)

Header::

    off  size  field
      0     4  magic           b"BDCB"
      4     2  version         1
      6     2  header_size     128
      8     4  slot_header     64
     12     4  owner_pid       pid of the process that created this region
     16    16  session         random session id, kept across recoveries
     32     8  state_capacity  bytes of state data per slot (multiple of 8)
     40     8  log_capacity    bytes of the receive log ring (multiple of 8)
     48     8  export_version  COMMIT WORD: the last complete export; its slot is
                               export_version & 1 (0: never exported, slot 0 is empty)
     56     8  log_end         input stream position just after the last logged byte
     64     4  recoveries      how many times the session was recovered
     68     2  family          socket family of the session (2 IPv4, 10 IPv6, 0 other)
     70     2  local_port
     72    16  local_addr      IPv4 in the first 4 bytes, rest zero
     88    16  remote_addr
    104     2  remote_port
    106     2  flags           bit 0: active open -- the session's socket did connect()
                               (a channel to another server); the kernel's acknowledged
                               count of such a socket includes its SYN, so the dumped
                               `handed` is one more than the bytes written
    108     2  home_port       the port of the server the session belongs to, when it is
                               not its local port (a channel: its client sessions' port);
                               0 otherwise. The agent hands a recovered session to the
                               server of this port
    110    18  reserved        zero

Slot header (the state data follows it)::

      0     8  seq             2*v when it holds export v; odd while being rewritten
      8     8  sent            output stream position at export v (bytes the
                               application had sent)
     16     8  received        input stream position at export v (bytes it had consumed)
     24     4  length          bytes of state data
     28     2  encoding        0 none (new session), 1 raw bytes, 2 msgpack
     30     2  reserved        zero
     32     4  crc32           of slot bytes 8..32 (sent..reserved), then the state data
     36     4  reserved        zero
     40     8  exported_at     CLOCK_REALTIME ns of the export (informational)
     48    16  reserved        zero

Receive log: input byte at stream position p is at ring offset p % log_capacity. It holds
positions [received of the active export, log_end): every byte the application took in
since its last export, including bytes it received but has not consumed yet. The
application receives directly into the ring, so a byte the kernel delivered is in the
region before log_end is advanced; the kernel's own count (tcprepair's `read`) is the
exact end, log_end a lower bound that a crash may leave behind by one receive.
"""

from __future__ import annotations

import enum
import struct

MAGIC = b"BDCB"
VERSION = 1
HEADER_SIZE = 128
SLOT_HEADER_SIZE = 64
SESSION_SIZE = 16
ADDR_SIZE = 16

MAX_STATE_CAPACITY = 16 << 20
MAX_LOG_CAPACITY = 64 << 20

HEADER = struct.Struct("<4sHHII16sQQQQIHH16s16sHHH18s")
SLOT = struct.Struct("<QQQIHHIIQ16s")
assert HEADER.size == HEADER_SIZE and SLOT.size == SLOT_HEADER_SIZE

#: the writer's pid and the recovery count (32-bit fields): rewritten by a server that
#: takes over a handed box (CbRegion.take_over)
OFF_PID = 12
# Header words a writer stores after creation (byte offsets, 8-byte aligned).
OFF_EXPORT_VERSION = 48
OFF_LOG_END = 56
OFF_RECOVERIES = 64  # (32-bit)
#: header flags
FLAG_ACTIVE_OPEN = 1
FLAGS = FLAG_ACTIVE_OPEN  # every flag defined
OFF_HOME_PORT = 108
_HOME_PORT = struct.Struct("<H")
# Slot header word offsets, relative to the slot.
SLOT_OFF_SEQ = 0


class Encoding(enum.IntEnum):
    """How a slot's state data is encoded."""

    NONE = 0  # no state: the session was never exported
    RAW = 1  # bytes, as given
    MSGPACK = 2  # msgspec msgpack


def home_port(header: bytes) -> int:
    """The header's home_port (0: none, or too short to hold one)."""
    if len(header) < OFF_HOME_PORT + _HOME_PORT.size:
        return 0
    return _HOME_PORT.unpack_from(header, OFF_HOME_PORT)[0]


def server_port(header: bytes, local_port: int) -> int:
    """The port of the server a box's session belongs to: its home port (a channel's,
    whose socket's own port is ephemeral), else the session socket's `local_port`."""
    return home_port(header) or local_port


def round8(n: int) -> int:
    return (n + 7) & ~7


def slot_offset(index: int, state_capacity: int) -> int:
    """Byte offset of slot `index` (0 or 1)."""
    return HEADER_SIZE + index * (SLOT_HEADER_SIZE + state_capacity)


def log_offset(state_capacity: int) -> int:
    """Byte offset of the receive log ring."""
    return HEADER_SIZE + 2 * (SLOT_HEADER_SIZE + state_capacity)


def region_size(state_capacity: int, log_capacity: int) -> int:
    """Bytes of a region with these capacities."""
    return log_offset(state_capacity) + log_capacity


def check_capacities(state_capacity: int, log_capacity: int) -> None:
    """ValueError unless the capacities are usable (positive multiples of 8, bounded)."""
    for value, limit, what in (
        (state_capacity, MAX_STATE_CAPACITY, "state_capacity"),
        (log_capacity, MAX_LOG_CAPACITY, "log_capacity"),
    ):
        if not (isinstance(value, int) and 8 <= value <= limit and value % 8 == 0):
            raise ValueError(f"{what} must be a multiple of 8 in 8..{limit}, got {value!r}")
