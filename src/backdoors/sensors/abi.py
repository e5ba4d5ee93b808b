"""The Sensor Box binary layout (ABI version 1).

A Sensor Box is a header of 64 bytes followed by `capacity` slots of 64 bytes, all
little-endian and 8-byte aligned, so that every value is one aligned 64-bit word that a
writer updates with a single store. `docs/sensor-box.md` and the C
header `src/backdoors/include/backdoors/sensorbox.h` describe the same layout; change all
three together.

Header::

    off  size  field
      0     4  magic        b"BDSB"
      4     2  version      1
      6     2  header_size  64
      8     4  slot_size    64
     12     4  capacity     number of slots
     16     4  count        slots in use (0..capacity)
     20     4  owner_pid    pid of the process that created the box
     24     8  generation   even when stable; odd while a sensor is being added
     32    32  name         UTF-8, NUL-padded (at most 31 bytes)

Slot::

      0     4  id           1..count, unique
      4     1  type         1 progress, 2 level, 3 pressure
      5     1  flags        bit 0: level has a minimum, bit 1: level has a maximum
      6     2  reserved     0
      8     8  value        progress/pressure: u64 counter; level: f64
     16     8  threshold    progress: deadline (s); level: max; pressure: max events
     24     8  param        level: min (f64); pressure: window (s, f64);
                            progress: moved_ns (u64)
     32    32  name         UTF-8, NUL-padded (at most 31 bytes)

A progress slot's moved_ns is the CLOCK_MONOTONIC time (ns) of the counter's last move,
stored before the value; 0 from a writer that does not stamp. A reader that trusts it
(agent/watch.py: only when it lies between its read that saw the old value and the one
that sees the new) looks at the counter once per deadline instead of polling for moves.
"""

import enum
import struct

MAGIC = b"BDSB"
VERSION = 1
HEADER_SIZE = 64
SLOT_SIZE = 64
NAME_SIZE = 32
MAX_NAME_BYTES = NAME_SIZE - 1
MAX_CAPACITY = 4096

HEADER = struct.Struct("<4sHHIIII Q 32s")
SLOT = struct.Struct("<IBBH 8s d d 32s")
assert HEADER.size == HEADER_SIZE and SLOT.size == SLOT_SIZE

# Offset of the header's owner_pid (u32), which the agent maps to a host pid when it serves a box.
OFF_OWNER_PID = 20
# Offsets of the header fields a writer changes after creation.
OFF_COUNT = 16
OFF_GENERATION = 24
# Offset of a slot's value word, relative to the slot.
SLOT_OFF_VALUE = 8
# Offset of a progress slot's moved_ns word (the param field), relative to the slot.
SLOT_OFF_MOVED_NS = 24
# Words from a progress slot's value to its moved_ns.
STAMP_WORDS = (SLOT_OFF_MOVED_NS - SLOT_OFF_VALUE) // 8

FLAG_HAS_MIN = 1
FLAG_HAS_MAX = 2


class SensorType(enum.StrEnum):
    """The three kinds of sensor, everywhere: its value is the name (JSON, metrics,
    messages), `code` the byte stored in a slot."""

    PROGRESS = "progress"
    LEVEL = "level"
    PRESSURE = "pressure"

    @property
    def code(self) -> int:
        return _CODES[self]

    @classmethod
    def from_code(cls, code: int) -> "SensorType":
        """The type stored as `code` in a slot; ValueError for an unknown code."""
        for kind, c in _CODES.items():
            if c == code:
                return kind
        raise ValueError(f"unknown sensor type code {code}")


_CODES = {SensorType.PROGRESS: 1, SensorType.LEVEL: 2, SensorType.PRESSURE: 3}

#: The box the agent keeps for a node's kernel-derived sensors (memory, pids, forks, PSI);
#: its region name, reserved (apps cannot register it), and the prefix of its header name
#: (`kernel:<node>`).
KERNEL_BOX = "kernel"
#: The sensors the agent may put in a node's kernel box (agent/sampler.py), by type: the
#: PSI ones where the kernel has PSI, `link_up` for a node with a network namespace.
KERNEL_SENSORS: dict[str, SensorType] = {
    "memory_mb": SensorType.LEVEL, "pids": SensorType.LEVEL, "link_up": SensorType.LEVEL,
    "psi_memory_some": SensorType.LEVEL, "psi_cpu_some": SensorType.LEVEL,
    "psi_io_some": SensorType.LEVEL, "forks": SensorType.PRESSURE,
    "fork_failures": SensorType.PRESSURE, "oom_kills": SensorType.PRESSURE,
}
#: The box the agent keeps for a VM node's guest kernel, read from the guest's RAM (jiffies,
#: tasks, memory); reserved like KERNEL_BOX (`guest:<node>`).
GUEST_BOX = "guest"


def region_size(capacity: int) -> int:
    """Bytes needed for a box with `capacity` slots."""
    return HEADER_SIZE + capacity * SLOT_SIZE


def slot_offset(index: int) -> int:
    """Byte offset of slot `index` (0-based)."""
    return HEADER_SIZE + index * SLOT_SIZE


def encode_name(name: str, what: str) -> bytes:
    """UTF-8 bytes of a box or sensor name, checked against the ABI's limit."""
    raw = name.encode("utf-8")
    if not raw or len(raw) > MAX_NAME_BYTES or b"\0" in raw:
        raise ValueError(
            f"{what} name {name!r} must be 1..{MAX_NAME_BYTES} UTF-8 bytes without NUL"
        )
    return raw
