"""Kernel symbols from the kernel image alone: decompress vmlinuz, decode its kallsyms table.

Debian's package ships a stub System.map, so the profile of a kernel build (symbol name ->
link-time address) is read from the tables `scripts/kallsyms` links into the image (64-bit,
CONFIG_KALLSYMS_BASE_RELATIVE, as in 6.1), each aligned to 8 bytes, in this order:
kallsyms_offsets (s32 each), kallsyms_relative_base (u64), kallsyms_num_syms (u32),
kallsyms_names (per symbol: a length, then that many token indexes), kallsyms_markers (u32
per 256 symbols), kallsyms_token_table (256 NUL-terminated tokens), kallsyms_token_index
(256 u16 offsets into the token table). The token table is found by the single-character
tokens of the digits, which every build keeps at their own index ('0' is token 48).
"""

from __future__ import annotations

import struct

from ..errors import VmError

LZ4_LEGACY_MAGIC = 0x184C2102


def extract_vmlinux(bzimage: bytes, where: str = "vmlinuz") -> bytes:
    """The uncompressed kernel (an ELF file) inside a bzImage whose payload is LZ4 (legacy
    frames), gzip, xz or zstd; the boot header's payload_offset/payload_length locate it."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise VmError(f"{where} is not an x86 bzImage (no HdrS boot header)")
    setup_sects = bzimage[0x1F1] or 4
    if len(bzimage) < (setup_sects + 1) * 512 + 8:
        raise VmError(f"{where}: truncated bzImage ({len(bzimage)} bytes)")
    start = (setup_sects + 1) * 512
    off, length = struct.unpack_from("<II", bzimage, 0x248)
    payload = bzimage[start + off:start + off + length]
    if payload[:4] == struct.pack("<I", LZ4_LEGACY_MAGIC):
        out = _lz4_legacy(payload, where)
    elif payload[:2] == b"\x1f\x8b":
        import zlib
        out = zlib.decompressobj(31).decompress(payload)
    elif payload[:6] == b"\xfd7zXZ\x00":
        import lzma
        out = lzma.LZMADecompressor().decompress(payload)
    else:
        raise VmError(f"{where}: payload compression {payload[:6].hex()} not supported "
                      "(LZ4, gzip, xz are)")
    if out[:4] != b"\x7fELF":
        raise VmError(f"{where}: the decompressed payload is not an ELF image")
    return out


def _lz4_legacy(payload: bytes, where: str) -> bytes:
    import lz4.block
    out, i = [], 4
    while i + 4 <= len(payload):
        (n,) = struct.unpack_from("<I", payload, i)
        if n == LZ4_LEGACY_MAGIC:  # concatenated streams
            i += 4
            continue
        if i + 4 + n > len(payload):  # the trailing u32 is the uncompressed size
            break
        try:
            out.append(lz4.block.decompress(payload[i + 4:i + 4 + n], uncompressed_size=8 << 20))
        except lz4.block.LZ4BlockError as e:
            raise VmError(f"{where}: corrupt LZ4 block at {i}: {e}") from None
        i += 4 + n
    return b"".join(out)


def symbols(image: bytes, where: str = "vmlinux") -> dict[str, tuple[str, int]]:
    """Symbol name -> (type letter, link-time address), decoded from `image`'s kallsyms."""
    digits = b"".join(b"%d\0" % d for d in range(10))
    at = image.find(digits)
    try:
        while at >= 0:
            found = _tables_at(image, at)
            if found is not None:
                return _decode(image, *found)
            at = image.find(digits, at + 1)
    except (struct.error, IndexError, ValueError) as e:  # a truncated or foreign image
        raise VmError(f"{where}: malformed kallsyms tables: {e}") from None
    raise VmError(f"{where}: no kallsyms token table found (is CONFIG_KALLSYMS set?)")


def _tables_at(image: bytes, digits_at: int):
    """(token_table, token_index) offsets if the digit tokens at `digits_at` are one."""
    # token_index follows the 256 tokens (at most ~4 KiB); its [48] points at the digits
    for q in range(digits_at - digits_at % 8, min(len(image) - 512, digits_at + 8192), 8):
        index = struct.unpack_from("<256H", image, q)
        if index[0] != 0 or any(index[48 + d] - index[48] != 2 * d for d in range(10)):
            continue
        table = digits_at - index[48]
        if table < 0 or table % 8 or q <= table + index[255]:
            continue
        if all(index[i] < index[i + 1] and image[table + index[i + 1] - 1] == 0
               for i in range(255)):
            return table, q
    return None


def _decode(image: bytes, table: int, index_at: int) -> dict[str, tuple[str, int]]:
    index = struct.unpack_from("<256H", image, index_at)
    tokens = [image[table + o:image.index(b"\0", table + o)].decode("latin-1") for o in index]
    # kallsyms_markers (markers[0] == 0, then growing by the size of 256 names) lies before
    # the token table, with kallsyms_seqs_of_names (3 bytes per symbol) between them in
    # kernels that have it; kallsyms_num_syms is 8 bytes before kallsyms_names, which ends
    # where the markers start
    for markers_at in range(table - 8, max(0, table - (16 << 20)), -8):
        m = struct.unpack_from("<4I", image, markers_at)
        if not (m[0] == 0 and 256 <= m[1] < m[2] < m[3] and m[3] - m[2] < 8 * m[1]):
            continue
        num_at = _num_syms_before(image, markers_at)
        if num_at is not None:
            break
    else:
        raise VmError("kallsyms: no kallsyms_markers/kallsyms_num_syms before the token table")
    num = struct.unpack_from("<I", image, num_at)[0]
    (base,) = struct.unpack_from("<Q", image, num_at - 8)
    offsets = struct.unpack_from(f"<{num}i", image, _align_down(num_at - 8 - 4 * num))
    out: dict[str, tuple[str, int]] = {}
    pos = num_at + 8
    for i in range(num):
        length, pos = _length(image, pos)
        name = "".join(tokens[b] for b in image[pos:pos + length])
        pos += length
        off = offsets[i]
        addr = base + off if off >= 0 else base - 1 - off  # ABSOLUTE_PERCPU: negative
        out.setdefault(name[1:], (name[0], addr & 0xFFFF_FFFF_FFFF_FFFF))
    return out


def _num_syms_before(image: bytes, markers_at: int) -> int | None:
    """Where kallsyms_num_syms is, if the names before `markers_at` decode to it."""
    markers = struct.unpack_from("<2I", image, markers_at)
    for num_at in range(markers_at - 16, max(0, markers_at - (8 << 20)), -8):
        num = struct.unpack_from("<I", image, num_at)[0]
        if not 256 < num < (1 << 21):
            continue
        if _names_fit(image, num_at + 8, num, markers_at, markers[1]):
            return num_at
    return None


def _length(image: bytes, pos: int) -> tuple[int, int]:
    """A kallsyms_names entry's length (one byte, or two when the top bit is set)."""
    n = image[pos]
    if n & 0x80:
        return (n & 0x7F) | (image[pos + 1] << 7), pos + 2
    return n, pos + 1


def _names_fit(image: bytes, start: int, num: int, limit: int, marker1: int) -> bool:
    pos = start
    for i in range(num):
        if i == 256 and pos - start != marker1:
            return False
        n, pos = _length(image, pos)
        pos += n
        if pos > limit:
            return False
    return limit - 8 < pos <= limit


def _align_down(x: int) -> int:
    return x - x % 8
