"""The kernel image as the host sees it: ELF sections and KASLR relocations, no guest needed.

The decompressed bzImage payload (kallsyms.extract_vmlinux) is the stripped vmlinux ELF
with `vmlinux.relocs` appended (CONFIG_X86_NEED_RELOCS): a list of 32-bit link-time
addresses, read from the end backwards in three runs each ended by a 0 entry -- 32-bit
fields to add the KASLR virtual offset to, 32-bit fields to subtract it from (per-CPU
references), then 64-bit fields to add it to. That is what the boot decompressor does
when it slides the kernel; doing the same here gives the bytes a clean kernel has at a
given offset, from the image alone.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass
from functools import cached_property

from ..errors import VmError
from . import kallsyms
from .kernel import GuestKernel

#: the link address of the image's first byte (_text) on x86-64
LINK_BASE = 0xFFFF_FFFF_8100_0000


@dataclass(frozen=True)
class Section:
    name: str
    addr: int  # link-time virtual address
    offset: int  # in the ELF file
    size: int
    loaded: bool  # has bytes in the file (not NOBITS)


class KernelImage:
    """One kernel build's uncompressed image: its sections and relocations."""

    def __init__(self, kernel: GuestKernel):
        self.kernel = kernel
        try:
            bz = kernel.image.read_bytes()
        except OSError as e:
            raise VmError(f"cannot read the guest kernel image {kernel.image}: {e.strerror}") from None
        self.elf = kallsyms.extract_vmlinux(bz, str(kernel.image))
        self.sections = _sections(self.elf, str(kernel.image))
        phoff = struct.unpack_from("<Q", self.elf, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", self.elf, 0x36)
        rows = [struct.unpack_from("<IIQQQQ", self.elf, phoff + i * phentsize) for i in range(phnum)]
        #: (link address, file offset, size in the file, size in memory) of each loaded
        #: (PT_LOAD) segment; past its file size a segment is zeros
        self.segments = [(vaddr, off, filesz, struct.unpack_from("<Q", self.elf, phoff + i * phentsize + 40)[0])
                         for i, (kind, _f, off, vaddr, _p, filesz) in enumerate(rows) if kind == 1]

    def section(self, name: str) -> Section:
        try:
            return self.sections[name]
        except KeyError:
            raise VmError(f"{self.kernel.image} has no section {name}") from None

    def loaded_end(self, addr: int) -> int:
        """The end (link address) of the loaded segment holding `addr`."""
        for vaddr, _off, _filesz, memsz in self.segments:
            if vaddr <= addr < vaddr + memsz:
                return vaddr + memsz
        raise VmError(f"{self.kernel.image}: no loaded segment holds {addr:#x}")

    def bytes_at(self, addr: int, length: int, slide: int = 0) -> bytes:
        """`length` bytes of the image at link address `addr`, relocated for a kernel
        whose virtual addresses are `slide` above the link-time ones."""
        for vaddr, offset, filesz, memsz in self.segments:
            if vaddr <= addr and addr + length <= vaddr + memsz:
                at = addr - vaddr
                raw = bytearray(self.elf[offset + at:offset + min(at + length, filesz)])
                raw += bytes(length - len(raw))
                break
        else:
            raise VmError(f"{self.kernel.image}: no loaded segment holds "
                          f"{addr:#x}..{addr + length:#x}")
        if slide:
            self._relocate(raw, addr, slide)
        return bytes(raw)

    def _relocate(self, buf: bytearray, base: int, slide: int) -> None:
        end = base + len(buf)
        for kind, sites in self.relocations.items():
            width = 8 if kind == "64" else 4
            for site in sites[bisect.bisect_left(sites, base):bisect.bisect_left(sites, end)]:
                if site + width <= end:
                    at = site - base
                    if kind == "64":
                        (v,) = struct.unpack_from("<Q", buf, at)
                        struct.pack_into("<Q", buf, at, (v + slide) % (1 << 64))
                    else:
                        (v,) = struct.unpack_from("<I", buf, at)
                        v = v + slide if kind == "32" else v - slide
                        struct.pack_into("<I", buf, at, v % (1 << 32))

    @cached_property
    def relocations(self) -> dict[str, list[int]]:
        """{"32": [...], "32neg": [...], "64": [...]}: link addresses of the fields the
        boot decompressor relocates, read from the relocs appended after the ELF."""
        shoff = struct.unpack_from("<Q", self.elf, 0x28)[0]
        shentsize, shnum = struct.unpack_from("<HH", self.elf, 0x3A)
        tail = self.elf[shoff + shentsize * shnum:]
        words = struct.unpack(f"<{len(tail) // 4}i", tail[:len(tail) - len(tail) % 4])
        out: dict[str, list[int]] = {}
        i = len(words) - 1
        for kind in ("32", "32neg", "64"):
            sites = []
            while i >= 0 and words[i] != 0:
                sites.append(words[i] % (1 << 64))  # sign-extended: a -2 GiB address
                i -= 1
            if i < 0:
                raise VmError(f"{self.kernel.image}: no relocation table after the ELF "
                              "(CONFIG_RELOCATABLE off?)")
            i -= 1
            out[kind] = sorted(sites)
        return out


def _sections(elf: bytes, where: str) -> dict[str, Section]:
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise VmError(f"{where}: not a 64-bit ELF kernel")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    rows = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    strings = rows[shstrndx][4]
    out = {}
    for name_off, kind, _flags, addr, off, size in rows:
        name = elf[strings + name_off:elf.index(b"\0", strings + name_off)].decode()
        if name:
            out[name] = Section(name, addr, off, size, kind != 8)  # 8: SHT_NOBITS
    return out
