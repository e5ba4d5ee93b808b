"""Kernel integrity of a guest, checked from outside against a baseline from the image.

The baseline (`Baseline.take`) covers, page by page (a BLAKE2b digest and the clean bytes
of each 4 KiB page), the kernel's text [_text, _etext) and read-only data [__start_rodata,
__end_rodata) -- which holds the system call table and the `const` operations tables --
plus the IDT, and names the operations tables rootkits patch (OPS_TABLES). Its bytes come
from the kernel image on the host, relocated for the running kernel's KASLR offset
(image.py). Two kinds of bytes the image cannot predict:

- the kernel patches its own text at boot (alternatives, paravirt calls, retpoline and
  return-thunk sites, SMP lock prefixes, ftrace's mcount sites, static keys and static
  calls): at attach, every byte of text that differs from the image must lie in a patch
  site the image itself declares (its .altinstructions, .parainstructions,
  .retpoline_sites, .return_sites, .smp_locks, __jump_table, static_call_sites tables and
  the static call trampolines); those bytes take the guest's own first reading as their
  baseline. ftrace's sites (__mcount_loc) are checked for their value: the image's call
  or a NOP (what the kernel writes at boot). Any other differing byte is a kernel
  tampered before we attached: a finding (`Baseline.unexplained`), open from attach,
  whose clean bytes are the image's (an ftrace site's, the NOP) -- a tampered reading
  never becomes the baseline;
- `__ro_after_init` data (inside the read-only data) is written during boot: its bytes take
  the first reading too. The system call table is `const`: its clean entries are the
  image's, and an entry that differs at attach is a finding too;
- the IDT (`idt_table`) is built at boot from tables freed after init: its baseline is the
  first reading, checked against the image: every gate must point into the entry text
  (or, for vectors the kernel never installs, at its early boot handlers). A gate that
  points elsewhere at attach is a finding with no clean value known: reported until the
  gate points where a clean kernel's may (that reading becomes its baseline), never
  healed.

`Checker.tick()` compares a slice of the pages (bounded work per call; a page is compared
with its clean bytes, a memcmp, cheaper than hashing it again) and every tick the small hot
tables (system call table, IDT, OPS_TABLES), every few ticks the process cross-check, and
reports mismatches by symbol + offset. At run time the kernel still flips static keys: a jump-label site that changes
between its two legal forms (a NOP, or a jump to the entry's own target) is accepted and
the baseline follows it; any other change is a `Finding`. `Healer` writes the clean bytes
back through QEMU's debug interface with the vCPUs stopped and verifies them.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from functools import partial

from ..errors import VmError
from .image import KernelImage
from .machine import settled_session
from .memory import GuestMemory
from .periodic import Periodic

PAGE = 4096
#: operations tables rootkits patch to hide files, processes and sockets (all `const`, in
#: the read-only data; checked every tick besides the page slices)
OPS_TABLES = ("proc_root_operations", "proc_root_inode_operations", "proc_dir_operations",
              "proc_pid_link_inode_operations", "ramfs_file_operations",
              "shmem_file_operations", "tcp4_seq_ops")
#: text locations ftrace rewrites at boot (its trampoline's call sites)
FTRACE_SITES = ("ftrace_call", "ftrace_regs_call")
#: x86 NOPs a jump-label site holds when its key is off (the kernel's choices; 2-byte
#: sites hold NOP2)
NOPS5 = (bytes.fromhex("0f1f440000"), bytes.fromhex("6666669090"), bytes.fromhex("6690669090"))
NOP2 = bytes.fromhex("6690")
IDT_ENTRIES = 256
EARLY_IDT_HANDLER_SIZE = 9  # arch/x86/include/asm/segment.h
HEAL_ATTEMPTS = 200  # stops of the guest a heal may take to find no task list update under way
_DIFF = re.compile(rb"[^\x00]+")


@dataclass(frozen=True)
class Finding:
    """A tampered place: `kind` text | rodata | syscall | idt | ops | process; `where` a
    symbol + offset (or table[index], or `pid N`); `phys`/`clean` the bytes healing writes
    back (a hidden process: `virt` is its task_struct, relinked by the Healer; no `clean`
    bytes: none known, the finding is reported but cannot be healed)."""

    kind: str
    where: str
    virt: int = 0
    detail: str = ""
    phys: int = 0
    clean: bytes = b""

    def to_dict(self) -> dict:
        return {"kind": self.kind, "where": self.where, "virt": f"{self.virt:#x}",
                "detail": self.detail}

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.where)


@dataclass
class Page:
    link: int  # link-time address of the page
    phys: int
    digest: bytes
    clean: bytes
    source: str  # "image" (as the image predicts) | "boot" (the guest's first reading)
    region: str


class Symbols:
    """Address -> symbol + offset for the kernel image's symbols (not per-CPU ones)."""

    def __init__(self, symbols: dict[str, int], lowest: int):
        pairs = sorted((a, n) for n, a in symbols.items() if a >= lowest)
        self._addrs = [a for a, _ in pairs]
        self._names = [n for _, n in pairs]

    def name(self, link: int) -> str:
        i = bisect.bisect_right(self._addrs, link) - 1
        if i < 0:
            return f"{link:#x}"
        return f"{self._names[i]}+{link - self._addrs[i]:#x}"


class Sites:
    """Merged [start, end) link-address intervals the kernel may patch, for coverage tests."""

    def __init__(self, spans: list[tuple[int, int]]):
        merged: list[list[int]] = []
        for s, e in sorted(spans):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self._starts = [s for s, _ in merged]
        self._ends = [e for _, e in merged]

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and end <= self._ends[i]

    def __len__(self) -> int:
        return len(self._starts)


def mcount_sites(image: KernelImage) -> list[int]:
    """The ftrace call sites (__mcount_loc: a function's `call __fentry__`, link
    addresses), sorted: at boot the kernel makes each a 5-byte NOP (ftrace off)."""
    k = image.kernel
    lo, hi = k.symbol("__start_mcount_loc"), k.symbol("__stop_mcount_loc")
    data = image.bytes_at(lo, hi - lo)
    return sorted(struct.unpack(f"<{len(data) // 8}Q", data))


def patch_sites(image: KernelImage, *, mcount: bool = True) -> tuple[Sites, dict[int, int]]:
    """The text the kernel patches at boot, from the image's own tables (without the
    ftrace sites if not `mcount`: the baseline checks those on their own); and the
    jump-label sites (code -> target, link addresses) whose bytes may flip at run time."""
    k = image.kernel
    spans: list[tuple[int, int]] = []

    def table(name: str | tuple[str, str]) -> tuple[int, bytes]:
        if isinstance(name, tuple):
            lo, hi = (k.symbol(n) for n in name)
        else:
            s = image.section(name)
            lo, hi = s.addr, s.addr + s.size
        return lo, image.bytes_at(lo, hi - lo)

    def relative(name, size: int, length: int) -> None:
        lo, data = table(name)
        for at in range(0, len(data) - size + 1, size):
            site = lo + at + struct.unpack_from("<i", data, at)[0]
            spans.append((site, site + length))

    lo, data = table(".altinstructions")  # s32 instr, s32 repl, u16 cpuid, u8 len, u8 repl len
    for at in range(0, len(data) - 11, 12):
        site = lo + at + struct.unpack_from("<i", data, at)[0]
        spans.append((site, site + data[at + 10]))
    _, data = table(".parainstructions")  # u8 *instr, u8 type, u8 len
    for at in range(0, len(data) - 15, 16):
        site = struct.unpack_from("<Q", data, at)[0]
        spans.append((site, site + data[at + 9]))
    relative(".retpoline_sites", 4, 6)
    relative(".return_sites", 4, 5)
    relative(".smp_locks", 4, 1)
    relative(("__start_static_call_sites", "__stop_static_call_sites"), 8, 5)
    if mcount:
        spans += [(a, a + 5) for a in mcount_sites(image)]
    jumps: dict[int, int] = {}
    lo, data = table(("__start___jump_table", "__stop___jump_table"))  # s32 code, s32 target, long key
    for at in range(0, len(data) - 15, 16):
        code, target = struct.unpack_from("<ii", data, at)
        jumps[lo + at + code] = lo + at + 4 + target
        spans.append((lo + at + code, lo + at + code + 5))
    spans += [(a, a + 8) for n, a in k.symbols.items() if n.startswith("__SCT__")]
    spans += [(k.symbol(n), k.symbol(n) + 5) for n in FTRACE_SITES if n in k.symbols]
    return Sites(spans), jumps


def site_change(link: int, clean: bytes, live: bytes, s: int, e: int,
                jumps: dict[int, int]) -> str | None:
    """What the change at [s, e) of a text buffer at link address `link` is: "flip" --
    static keys flipping jump-label sites: every changed byte lies in a site (2 or 5
    bytes, as the kernel chose at build time; adjacent sites may change together) that
    now holds a NOP of its size or a jump to its entry's own target; "poke" -- such a flip
    under way at one site or more (the kernel's text_poke_bp writes an int3 over a site's
    first byte, then its new tail, then its new first byte); None -- anything else."""
    pos, kind = s, "flip"
    while pos < e:
        for at in range(pos, pos - 5, -1):
            target = jumps.get(link + at)
            if target is not None and at >= 0:
                break
        else:
            return None
        was = clean[at:at + 5]
        size = 2 if was[:1] == b"\xeb" or was[:2] == NOP2 else 5
        if pos >= at + size or at + size > len(clean):
            return None
        now = live[at:at + size]
        rel = target - (link + at + size)
        if size == 2:
            legal = (NOP2, bytes([0xEB, rel & 0xFF])) if -128 <= rel < 128 else (NOP2,)
        else:
            legal = (*NOPS5, b"\xe9" + (rel & 0xFFFF_FFFF).to_bytes(4, "little"))
        if now[0] == 0xCC and now[1:] in {clean[at + 1:at + size], *(x[1:] for x in legal)}:
            kind = "poke"
        elif now not in legal:
            return None
        pos = at + size
    return kind


def diff_runs(a: bytes, b: bytes) -> list[tuple[int, int]]:
    """[start, end) byte ranges where two equal-length buffers differ."""
    x = (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")
    return [m.span() for m in _DIFF.finditer(x)]


#: findings one page gives at most: past them, the rest of its changed runs are one (a
#: guest that flips every other byte of its kernel would otherwise make 2,048 a page)
PAGE_FINDINGS = 8


def _rest(runs: list[tuple[int, int]]) -> tuple[int, int, str]:
    """The span of `runs` (the page's last ones) as one finding's, and what it says."""
    return runs[0][0], runs[-1][1], (f"{sum(e - s for s, e in runs)} bytes differ in "
                                     f"{len(runs)} runs")


@dataclass
class Baseline:
    """What a clean running kernel holds (see the module's docstring)."""

    memory: GuestMemory
    slide: int
    pages: list[Page]
    syscalls: list[int]  # running addresses of the system call table's entries
    idt: bytes
    jumps: dict[int, int]  # jump-label code -> target (link addresses)
    symbols: Symbols
    #: what differs from a clean kernel at attach (tampered before we attached): text,
    #: rodata, syscall and idt findings, open from the start (Checker)
    unexplained: list[Finding] = field(default_factory=list)
    #: IDT gates pointing outside the entry text at attach (no clean value known: their
    #: first legal reading becomes it)
    idt_unexplained: list[int] = field(default_factory=list)
    handlers: Sites = field(default_factory=lambda: Sites([]))  # where IDT gates may point

    @property
    def sources(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.pages:
            out[f"{p.region}.{p.source}"] = out.get(f"{p.region}.{p.source}", 0) + 1
        return out

    @classmethod
    def take(cls, memory: GuestMemory, image: KernelImage | None = None) -> "Baseline":
        k = memory.kernel
        image = image or KernelImage(k)
        slide = memory.kaslr_offset
        symbols = Symbols(k.symbols, k.symbol("_text"))
        sites, jumps = patch_sites(image, mcount=False)
        mcount = mcount_sites(image)
        ro_after_init = Sites([(k.symbol("__start_ro_after_init"), k.symbol("__end_ro_after_init"))])
        pages: list[Page] = []
        unexplained: list[Finding] = []
        for region, lo, hi, allowed in (("text", "_text", "_etext", sites),
                                         ("rodata", "__start_rodata", "__end_rodata", ro_after_init)):
            start = k.symbol(lo)
            # the last page may be cut where the image's segment ends (the rest of that
            # page is whatever the boot decompressor left there)
            end = min(-(-k.symbol(hi) // PAGE) * PAGE, image.loaded_end(start))
            clean = image.bytes_at(start, end - start, slide)
            phys = memory.phys(lo)
            live = memory.read(phys, end - start)
            image_bytes = clean
            if region == "text":
                clean = _ftrace_sites(clean, live, start, mcount)
            for at in range(0, end - start, PAGE):
                want, got = clean[at:at + PAGE], live[at:at + PAGE]
                if want != got:
                    runs = [(s, e) for s, e in diff_runs(want, got)
                            if not allowed.covers(start + at + s, start + at + e)]
                    # the clean page: the patch sites as the kernel patched them, every
                    # other byte as the image has it (never a tampered reading)
                    page = bytearray(got)
                    for s, e in runs:
                        page[s:e] = want[s:e]
                    shown = [(s, e, f"{e - s} bytes differ") for s, e in runs]
                    if len(shown) > PAGE_FINDINGS:
                        shown[PAGE_FINDINGS - 1:] = [_rest(runs[PAGE_FINDINGS - 1:])]
                    for s, e, what in shown:
                        link = start + at + s
                        unexplained.append(Finding(region, symbols.name(link), link + slide,
                                                   f"{what} from the image at attach",
                                                   phys + at + s, bytes(page[s:e])))
                    want = bytes(page)
                source = "image" if want == image_bytes[at:at + PAGE] else "boot"
                pages.append(Page(start + at, phys + at, _digest(want), want, source, region))
        table = k.symbol("sys_call_table")
        count = (_next_symbol(k.symbols, table) - table) // 8
        virt, phys = memory.virt("sys_call_table"), memory.phys("sys_call_table")
        live_calls = struct.unpack(f"<{count}Q", memory.read(phys, 8 * count))
        # the table is const: the image has its clean entries (relocated)
        syscalls = list(struct.unpack(f"<{count}Q", image.bytes_at(table, 8 * count, slide)))
        for n, (was, now) in enumerate(zip(syscalls, live_calls)):
            if was != now:
                unexplained.append(Finding(
                    "syscall", f"sys_call_table[{n}]", virt + 8 * n,
                    f"-> {symbols.name(now - slide)} at attach (the image has "
                    f"{symbols.name(was - slide)})", phys + 8 * n, struct.pack("<Q", was)))
        idt = memory.read(memory.phys("idt_table"), 16 * IDT_ENTRIES)
        # a gate points into the entry text, or (vectors the kernel never installs, such
        # as reserved ones) still at the early boot handlers it set first
        handlers = Sites([(k.symbol("__entry_text_start"), k.symbol("__entry_text_end")),
                          (k.symbol("early_idt_handler_array"),
                           k.symbol("early_idt_handler_array") + 32 * EARLY_IDT_HANDLER_SIZE)])
        baseline = cls(memory, slide, pages, syscalls, idt, jumps, symbols, unexplained,
                       handlers=handlers)
        baseline.idt_unexplained = [n for n, h in enumerate(_gates(idt)) if not baseline.idt_legal(h)]
        unexplained += [baseline.idt_finding(n, idt) for n in baseline.idt_unexplained]
        return baseline

    def idt_legal(self, handler: int | None) -> bool:
        """Whether an IDT gate's handler is one a clean kernel installs (or none)."""
        return handler is None or self.handlers.covers(handler - self.slide, handler - self.slide + 1)

    def idt_finding(self, n: int, idt: bytes) -> Finding:
        """The finding of IDT gate `n` (in `idt`, a reading of the table) pointing outside
        the entry text since attach: its clean value is unknown (the IDT is built at
        boot from tables freed after init), so it is reported and cannot be healed."""
        virt = self.memory.virt("idt_table") + 16 * n
        return Finding("idt", f"idt_table[{n}]", virt,
                       f"-> {self.symbols.name((_gates(idt)[n] or 0) - self.slide)}: outside "
                       "the entry text since attach; no clean value known, not healable",
                       self.memory.phys("idt_table") + 16 * n, b"")

    def __post_init__(self) -> None:
        self._by_link = {p.link: p for p in self.pages}

    def page_of(self, link: int) -> Page:
        """The baseline page holding link address `link`."""
        try:
            return self._by_link[link - link % PAGE]
        except KeyError:
            raise VmError(f"{link:#x} is outside the baseline's pages") from None


def _ftrace_sites(clean: bytes, live: bytes, start: int, sites: list[int]) -> bytes:
    """The image's text at link address `start` with each ftrace site as the kernel left
    it at boot: as the image has it (a call) or the NOP it writes; any other reading
    (a rootkit's jump over a function's first bytes) is not clean: the NOP is."""
    out = bytearray(clean)
    for site in sites[bisect.bisect_left(sites, start):bisect.bisect_left(sites, start + len(clean) - 4)]:
        at = site - start
        if live[at:at + 5] != clean[at:at + 5]:
            out[at:at + 5] = live[at:at + 5] if live[at:at + 5] in NOPS5 else NOPS5[0]
    return bytes(out)


def _digest(page: bytes) -> bytes:
    return hashlib.blake2b(page, digest_size=16).digest()


def _next_symbol(symbols: dict[str, int], addr: int) -> int:
    return min(a for a in symbols.values() if a > addr)


def _gates(idt: bytes) -> list[int | None]:
    """Each IDT gate's handler address (None: not present)."""
    out: list[int | None] = []
    for n in range(len(idt) // 16):
        lo, _sel, _ist, flags, mid, hi, _ = struct.unpack_from("<HHBBHII", idt, 16 * n)
        out.append(lo | mid << 16 | hi << 32 if flags & 0x80 else None)
    return out


class Checker:
    """Checks a running guest against its Baseline: `tick()` covers `pages_per_tick`
    pages (round robin) and the hot tables; it returns the findings not reported before
    (a finding that goes away -- healed -- may be reported again if it comes back)."""

    def __init__(self, baseline: Baseline, *, pages_per_tick: int = 128,
                 processes_every: int = 5):
        if pages_per_tick < 1 or processes_every < 1:
            raise VmError(f"pages_per_tick and processes_every must be at least 1, got "
                          f"{pages_per_tick} and {processes_every}")
        self.baseline, self.pages_per_tick = baseline, pages_per_tick
        self.processes_every, self._ticks = processes_every, 0
        self._lock = threading.Lock()  # tick() and forget() may run in different threads
        self.memory = baseline.memory
        self._cursor = 0
        self.active: dict[tuple[str, str], Finding] = {}
        self._page_keys: dict[int, set[tuple[str, str]]] = {}  # page phys -> its findings
        self.benign_flips = 0
        self._suspects: dict[int, int] = {}  # pid -> task seen hidden at the last check
        self._suspects_at: int | None = None  # the guest's jiffies at that check
        self._pokes: dict[int, int] = {}  # page -> the guest's jiffies when seen mid-flip
        self.sweeps = 0  # full passes over the pages
        k = self.memory.kernel
        self._ops = [(n, k.symbol(n), _next_symbol(k.symbols, k.symbol(n)) - k.symbol(n))
                     for n in OPS_TABLES if n in k.symbols]
        # what was tampered before attach is open from the start (a clean read of its
        # page, or of its table, closes it as any finding)
        for f in baseline.unexplained:
            self.active[f.key] = f
            if f.kind in ("text", "rodata"):
                page = baseline.page_of(f.virt - baseline.slide)
                self._page_keys.setdefault(page.phys, set()).add(f.key)

    def tick(self) -> list[Finding]:
        with self._lock:
            return self._tick()

    def current(self) -> list[Finding]:
        """The findings open now (seen, and not gone since)."""
        with self._lock:
            return list(self.active.values())

    def forget(self, findings: list[Finding]) -> None:
        """Drop healed findings, so that the same tamper done again is reported again
        even before the slice comes back to its page."""
        with self._lock:
            for f in findings:
                self.active.pop(f.key, None)

    def _tick(self) -> list[Finding]:
        found: list[Finding] = []
        found += self._syscalls() + self._idt() + self._ops_tables()
        self._ticks += 1
        hot = {"syscall", "idt", "ops"}
        if self._ticks % self.processes_every == 0:
            found += self._processes()
            hot.add("process")
        pages = self.baseline.pages
        for _ in range(min(self.pages_per_tick, len(pages))):
            found += self._page(pages[self._cursor])
            self._cursor += 1
            if self._cursor == len(pages):
                self._cursor, self.sweeps = 0, self.sweeps + 1
        return self._new(found, hot)

    def sweep(self) -> list[Finding]:
        """Check every page once now (and the tables): all current findings."""
        found = self._syscalls() + self._idt() + self._ops_tables()
        for p in self.baseline.pages:
            found += self._page(p)
        return found

    def _new(self, found: list[Finding], hot: set[str]) -> list[Finding]:
        new = [f for f in found if f.key not in self.active]
        for f in found:
            self.active[f.key] = f
        # a hot-table finding not seen this tick is gone (those tables are read every tick)
        seen = {f.key for f in found}
        for key in [k for k in self.active if k[0] in hot and k not in seen]:
            del self.active[key]
        return new

    def _page(self, page: Page) -> list[Finding]:
        live = self.memory.read(page.phys, len(page.clean))
        if live == page.clean:  # memcmp with the clean bytes the digest was taken of
            self._pokes.pop(page.phys, None)
            for key in self._page_keys.pop(page.phys, ()):
                self.active.pop(key, None)
            return []
        out, flipped, pokes = [], False, []
        runs = diff_runs(page.clean, live)
        for i, (s, e) in enumerate(runs):
            if len(out) == PAGE_FINDINGS - 1 and i < len(runs) - 1:  # the rest as one
                out.append(self._text_finding(page, *_rest(runs[i:])))
                break
            change = None
            if page.region == "text":
                change = site_change(page.link, page.clean, live, s, e, self.baseline.jumps)
            if change == "poke":
                pokes.append((s, e))
            elif change == "flip":
                flipped = True
            else:
                out.append(self._text_finding(page, s, e, f"{e - s} bytes differ"))
        if pokes:  # a flip under way is let be once; still half-done after the guest ran, it is not one
            jiffies = self.memory.jiffies()
            if self._pokes.setdefault(page.phys, jiffies) != jiffies:
                out += [self._text_finding(page, s, e, "an int3 over a jump-label site, left there")
                        for s, e in pokes]
        else:
            self._pokes.pop(page.phys, None)
            if flipped and not out:  # only static keys flipped: the baseline follows them
                self.benign_flips += 1
                page.clean, page.digest = live, _digest(live)
        if out:  # what a clean read of this page closes
            self._page_keys.setdefault(page.phys, set()).update(f.key for f in out)
        return out

    def _text_finding(self, page: Page, s: int, e: int, detail: str) -> Finding:
        link = page.link + s
        return Finding(page.region, self.baseline.symbols.name(link), link + self.baseline.slide,
                       detail, page.phys + s, page.clean[s:e])

    def _processes(self) -> list[Finding]:
        """Processes in the process tree or the pid map but missing from the task list
        (GuestMemory.hidden_tasks), at two checks in a row with the guest run between
        them (one check may race a fork or an exit: the task enters the tree, then the
        list; a guest stopped half-way, e.g. under the node lock, stays half-way, so two
        checks of it are one)."""
        kept = [f for f in self.active.values() if f.kind == "process"]
        try:
            jiffies = self.memory.jiffies()
            if jiffies == self._suspects_at:
                return kept  # the guest has not run since the last check
            hidden = self.memory.hidden_tasks()
        except VmError:
            return kept  # torn walk: keep
        self._suspects_at = jiffies
        now = {pid: task for pid, _comm, task in hidden}
        out = [Finding("process", f"pid {pid}", task, f"{comm!r} is in the process tree or the "
                       "pid map but not on the task list (hidden)")
               for pid, comm, task in hidden if self._suspects.get(pid) == task]
        self._suspects = now
        return out

    def _syscalls(self) -> list[Finding]:
        b = self.baseline
        phys = self.memory.phys("sys_call_table")
        live = struct.unpack(f"<{len(b.syscalls)}Q", self.memory.read(phys, 8 * len(b.syscalls)))
        virt = self.memory.virt("sys_call_table")
        return [Finding("syscall", f"sys_call_table[{n}]", virt + 8 * n,
                        f"-> {b.symbols.name(now - b.slide)} (was {b.symbols.name(was - b.slide)})",
                        phys + 8 * n, struct.pack("<Q", was))
                for n, (was, now) in enumerate(zip(b.syscalls, live)) if was != now]

    def _idt(self) -> list[Finding]:
        b = self.baseline
        phys = self.memory.phys("idt_table")
        live = self.memory.read(phys, len(b.idt))
        if live == b.idt and not b.idt_unexplained:
            return []
        was, now = _gates(b.idt), _gates(live)
        virt = self.memory.virt("idt_table")
        out = []
        for n in range(IDT_ENTRIES):
            gate = live[16 * n:16 * n + 16]
            if n in b.idt_unexplained:  # no clean value known yet
                if b.idt_legal(now[n]):  # put right: that is its clean value now
                    b.idt = b.idt[:16 * n] + gate + b.idt[16 * n + 16:]
                    b.idt_unexplained.remove(n)
                else:
                    out.append(b.idt_finding(n, live))
            elif gate != b.idt[16 * n:16 * n + 16]:
                out.append(Finding("idt", f"idt_table[{n}]", virt + 16 * n,
                                   f"-> {b.symbols.name((now[n] or 0) - b.slide)} (was "
                                   f"{b.symbols.name((was[n] or 0) - b.slide)})",
                                   phys + 16 * n, b.idt[16 * n:16 * n + 16]))
        return out

    def _ops_tables(self) -> list[Finding]:
        out = []
        for name, link, size in self._ops:
            page = self.baseline.page_of(link)
            off = link - page.link
            if off + size > len(page.clean):
                size = len(page.clean) - off  # a table across pages: its first page here, the rest by slices
            live = self.memory.read(page.phys + off, size)
            clean = page.clean[off:off + size]
            for s, e in diff_runs(clean, live) if live != clean else ():
                out.append(Finding("ops", f"{name}+{s:#x}", link + s + self.baseline.slide,
                                   f"{e - s} bytes differ", page.phys + off + s, clean[s:e]))
        return out


class Healer:
    """Restores tampered bytes: with the vCPUs stopped (QMP `stop`, the node lock), writes
    each finding's clean bytes through QEMU's gdbstub (so TCG drops code translated from
    the tampered bytes), relinks hidden processes (still alive; at a stop outside any task
    list update, see `GuestMemory.task_list_settled`), reads it all back from the RAM, then
    lets the guest run again (QMP `cont`) -- unless it was stopped before (held under a
    lease): then it stays so. Returns the findings it could not restore. `vm`: a
    machine.Vm or a node.VmNode (memory, running, lock, unlock, debug)."""

    def __init__(self, vm):
        self.vm = vm

    def heal(self, findings: list[Finding]) -> list[Finding]:
        memory = self.vm.memory()
        relinks = any(f.kind == "process" for f in findings)
        # a relink waits for a stop outside a fork's or an exit's list update
        with settled_session(self.vm, HEAL_ATTEMPTS if relinks else 1, lock=True) as (stub, ok):
            if relinks and not ok:  # never outside an update: the relinks wait
                held = [f for f in findings if f.kind == "process"]
                rest = [f for f in findings if f.kind != "process"]
                return self._restore(memory, stub, rest) + held
            return self._restore(memory, stub, findings)

    @staticmethod
    def _restore(memory: GuestMemory, stub, findings: list[Finding]) -> list[Finding]:
        """Write the findings' clean bytes (relinks one after the other: each is computed
        from the lists as the previous one left them), read back; those that did not hold."""
        failed: dict[int, Finding] = {}
        if any(f.kind == "process" for f in findings):  # one gone meanwhile is freed memory: let be
            alive = set(memory.pid_table().values()) | {memory.virt("init_task")}
            findings = [f for f in findings if f.kind != "process" or f.virt in alive]
        for f in findings:
            if f.kind != "process":
                if not f.clean:  # no clean value known: not healable
                    failed[id(f)] = f
                    continue
                stub.write_phys(f.phys, f.clean)
                if memory.read(f.phys, len(f.clean)) != f.clean:
                    failed[id(f)] = f
                continue
            for head, node in _lists(memory, f.virt, alive):
                writes = relink(memory, head, node)
                for phys, data in writes:
                    stub.write_phys(phys, data)
                if any(memory.read(phys, len(data)) != data for phys, data in writes) or \
                        _list_end(memory, head, node) is not None:
                    failed[id(f)] = f
        return list(failed.values())


def _lists(memory: GuestMemory, task: int, alive: set[int]) -> list[tuple[int, int]]:
    """(list head, the task's node) of the two lists a process is on: the task list
    (init_task.tasks) and its parent's children (real_parent->children, via `sibling`).
    Not the latter if that parent is gone (not in `alive`): a process off its parent's
    list when the parent exited was not handed to a new one, and the old one's memory
    is not a list any more."""
    member = partial(memory.kernel.member, "task_struct")
    out = [(memory.virt("init_task") + member("tasks"), task + member("tasks"))]
    parent, = struct.unpack("<Q", memory.read_virt(task + member("real_parent"), 8))
    if parent in alive:
        out.append((parent + member("children"), task + member("sibling")))
    return out


def relink(memory: GuestMemory, head: int, node: int) -> list[tuple[int, bytes]]:
    """The writes (physical address, bytes) that put `node`, unlinked from the circular
    list at `head`, back at its end, as list_add_tail would; none if it is on the list
    already. Read with the vCPUs stopped so the list does not move meanwhile. The end is
    the last entry reached going forward from the head -- the way the list is walked --
    not the head's `prev`, which a list update the vCPUs were stopped in the middle of
    may have left elsewhere."""
    last = _list_end(memory, head, node)
    if last is None:
        return []
    return [(memory.translate(node), struct.pack("<QQ", head, last)),  # node.next, node.prev
            (memory.translate(last), struct.pack("<Q", node)),  # last.next
            (memory.translate(head + 8), struct.pack("<Q", node))]  # head.prev


def _list_end(memory: GuestMemory, head: int, node: int, limit: int = 1 << 16) -> int | None:
    """The last entry of the circular list at `head` walked forward, or None if `node`
    is on it."""
    at = head
    for _ in range(limit):
        nxt = struct.unpack("<Q", memory.read_virt(at, 8))[0]
        if nxt == node:
            return None
        if nxt == head:
            return at
        at = nxt
    raise VmError(f"{memory.where}: a task list has more than {limit} entries or loops")


class Watch(Periodic):
    """Runs `checker.tick()` every `tick_s` in a thread of its own, stamping each new
    finding with the monotonic time it was seen (`seen`: (time, Finding)). `paused`
    skips ticks (to measure the scan's cost on the guest beside its absence)."""

    def __init__(self, checker: Checker, *, tick_s: float = 0.02):
        super().__init__(tick_s, "integrity-watch")
        self.checker = checker
        self.seen: list[tuple[float, Finding]] = []
        self.paused = False
        self.ticks, self.cpu_s = 0, 0.0  # ticks run, and the thread's CPU time in them

    def step(self) -> None:
        if self.paused:
            return
        cpu = time.thread_time()
        try:
            found = self.checker.tick()
        except VmError as e:  # a read torn by the running guest: the next tick reads again
            self.failed("integrity watch", e)
            return
        finally:
            self.ticks, self.cpu_s = self.ticks + 1, self.cpu_s + time.thread_time() - cpu
        now = time.monotonic()
        self.seen += [(now, f) for f in found]

    def wait_for(self, match, since: float, timeout: float) -> float | None:
        """The time of the first finding since `since` for which `match(f)` holds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for at, f in list(self.seen):
                if at >= since and match(f):
                    return at
            time.sleep(0.005)
        return None
