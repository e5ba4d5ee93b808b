"""The preamble both shared-memory formats start with (Sensor Box, Continuation Box).

Bytes 0-11 of a region: magic (4 bytes), layout version (u16), header size (u16) and slot
size (u32), little-endian. A reader checks them before it trusts anything else in the
region, and says what it found instead of what it expected.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

PREAMBLE = struct.Struct("<4sHHI")


class Preamble(NamedTuple):
    """What a format expects of the preamble, and how its errors name things."""

    kind: str  # "Sensor Box"
    magic: bytes
    version: int
    header_size: int
    slot_size: int
    slot_field: str  # the slot size's name in the ABI doc ("slot_size", "slot_header")


def check_preamble(data: bytes | bytearray | memoryview, want: Preamble,
                   error: type[Exception]) -> None:
    """Raise `error` naming the first field of the preamble of `data` that is not `want`."""
    if len(data) < want.header_size:
        raise error(f"region truncated: {len(data)} bytes, the {want.kind} header alone needs "
                    f"{want.header_size}")
    magic, version, hsize, ssize = PREAMBLE.unpack_from(data)
    if magic != want.magic:
        raise error(f"not a {want.kind}: magic is {magic!r}, expected {want.magic!r}")
    if version != want.version:
        raise error(f"unsupported {want.kind} layout version {version} (reader knows "
                    f"{want.version})")
    if hsize != want.header_size or ssize != want.slot_size:
        raise error(f"header: header_size {hsize} / {want.slot_field} {ssize}, ABI v"
                    f"{want.version} requires {want.header_size}/{want.slot_size}")
