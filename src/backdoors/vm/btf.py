"""Structure layouts from the kernel's BTF (CONFIG_DEBUG_INFO_BTF): member offsets.

The `.BTF` section of the uncompressed image (kallsyms.extract_vmlinux) is a header, a
type section and a string section. Types are numbered from 1 in order; each is 12 bytes
(name, info = kind << 24 | vlen, size or type) followed by kind-specific data; a struct's
data is `vlen` members of 12 bytes (name, type, bit offset; with the kind flag the offset
is bits 0-23 and a bitfield size bits 24-31). Anonymous members (unions and structs inside
a struct) are searched through. An enum's data is `vlen` (name, value) pairs: 8 bytes, or
12 for a 64-bit enum (value low, high).
"""

from __future__ import annotations

import struct

from ..errors import VmError

MAGIC = 0xEB9F
STRUCT, UNION, ENUM, ENUM64 = 4, 5, 6, 19
#: bytes after the 12-byte type record, by kind: fixed, plus per vlen
_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8), 14: (4, 0),
          15: (0, 12), 17: (4, 0), 19: (0, 12)}


def section(image: bytes, name: str, where: str = "vmlinux") -> bytes:
    """The contents of ELF section `name` of a 64-bit little-endian ELF `image`."""
    shoff = struct.unpack_from("<Q", image, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)
    def header(i):
        name_off, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", image, shoff + i * shentsize)
        return name_off, off, size
    _, str_off, _ = header(shstrndx)
    for i in range(shnum):
        name_off, off, size = header(i)
        end = image.index(b"\0", str_off + name_off)
        if image[str_off + name_off:end].decode() == name:
            return image[off:off + size]
    raise VmError(f"{where} has no {name} section (is CONFIG_DEBUG_INFO_BTF set?)")


class Btf:
    """The parsed types of one BTF blob (only what member offsets need)."""

    def __init__(self, blob: bytes):
        try:
            self._parse(blob)
        except (struct.error, IndexError, ValueError) as e:
            raise VmError(f"malformed BTF: {e}") from None

    def _parse(self, blob: bytes) -> None:
        if len(blob) < 24:
            raise VmError(f"BTF of {len(blob)} bytes is truncated")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != MAGIC:
            raise VmError(f"not BTF (magic {magic:#x})")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._types = blob[hdr_len + type_off:hdr_len + type_off + type_len]
        self._strings = blob[hdr_len + str_off:hdr_len + str_off + str_len]
        self._at: list[int] = [0]  # type id -> offset in the type section (id 0: void)
        self._by_name: dict[tuple[int, str], int] = {}
        pos = 0
        while pos < len(self._types):
            name_off, info, _size = struct.unpack_from("<III", self._types, pos)
            kind, vlen = info >> 24 & 0x1F, info & 0xFFFF
            self._at.append(pos)
            if kind in (STRUCT, UNION, ENUM, ENUM64) and name_off:
                named = ENUM if kind == ENUM64 else kind
                self._by_name.setdefault((named, self._name(name_off)), len(self._at) - 1)
            fixed, per = _EXTRA.get(kind, (0, 0))
            pos += 12 + fixed + per * vlen

    def _name(self, off: int) -> str:
        return self._strings[off:self._strings.index(b"\0", off)].decode()

    def member_offset(self, struct_name: str, member: str) -> int:
        """The byte offset of `member` in `struct struct_name`."""
        tid = self._by_name.get((STRUCT, struct_name))
        if tid is None:
            raise VmError(f"BTF has no struct {struct_name}")
        found = self._find(tid, member)
        if found is None:
            raise VmError(f"BTF: struct {struct_name} has no member {member}")
        return found // 8

    def size_of(self, struct_name: str) -> int:
        """The size in bytes of `struct struct_name`."""
        tid = self._by_name.get((STRUCT, struct_name))
        if tid is None:
            raise VmError(f"BTF has no struct {struct_name}")
        return struct.unpack_from("<III", self._types, self._at[tid])[2]

    def enum_value(self, enum_name: str, name: str) -> int:
        """The value of enumerator `name` of `enum enum_name` (array indexes such as
        `node_stat_item`'s differ between builds and configs)."""
        tid = self._by_name.get((ENUM, enum_name))
        if tid is None:
            raise VmError(f"BTF has no enum {enum_name}")
        pos = self._at[tid]
        _name, info, _size = struct.unpack_from("<III", self._types, pos)
        wide, vlen = (info >> 24 & 0x1F) == ENUM64, info & 0xFFFF
        for i in range(vlen):
            if wide:
                name_off, low, high = struct.unpack_from("<III", self._types, pos + 12 + 12 * i)
                value = low | high << 32
            else:
                name_off, value = struct.unpack_from("<Ii", self._types, pos + 12 + 8 * i)
            if self._name(name_off) == name:
                return value
        raise VmError(f"BTF: enum {enum_name} has no {name}")

    def _find(self, tid: int, member: str) -> int | None:
        pos = self._at[tid]
        _name, info, _size = struct.unpack_from("<III", self._types, pos)
        kflag, vlen = info >> 31, info & 0xFFFF
        for i in range(vlen):
            name_off, mtype, offset = struct.unpack_from("<III", self._types, pos + 12 + 12 * i)
            bits = offset & 0xFFFFFF if kflag else offset
            if name_off and self._name(name_off) == member:
                return bits
            if not name_off:  # an anonymous struct or union: look inside
                inner = self._resolve(mtype)
                if inner is not None:
                    found = self._find(inner, member)
                    if found is not None:
                        return bits + found
        return None

    def _resolve(self, tid: int) -> int | None:
        """The struct/union behind `tid` (through typedefs and qualifiers), if any."""
        for _ in range(16):
            _name, info, ref = struct.unpack_from("<III", self._types, self._at[tid])
            kind = info >> 24 & 0x1F
            if kind in (STRUCT, UNION):
                return tid
            if kind not in (8, 9, 10, 11, 18):  # typedef, volatile, const, restrict, type tag
                return None
            tid = ref
        return None
