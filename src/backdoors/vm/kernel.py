"""The guest kernel: Debian's cloud kernel package, unpacked (not installed) by `make vm-kernel`.

The package is fetched with `apt-get download` and unpacked with `dpkg-deb -x` into the
checkout's `.cache/vm/` (or $BACKDOORS_VM_DIR). It ships the compressed image (vmlinuz),
whose kallsyms table gives every kernel symbol's link-time address (the profile the host
reads the guest with, kallsyms.py), and the modules the initramfs needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import VmError
from . import btf, kallsyms

#: the kernel's virtual base of its image mapping (x86-64, arch/x86/include/asm/page_64_types.h)
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000
PROFILE_FORMAT = 12
#: structure members whose offsets the profile keeps (from the kernel's BTF)
MEMBERS = (("task_struct", "tasks"), ("task_struct", "pid"), ("task_struct", "tgid"),
           ("task_struct", "comm"), ("task_struct", "__state"), ("task_struct", "mm"),
           ("task_struct", "exit_state"), ("task_struct", "children"),
           ("task_struct", "sibling"), ("task_struct", "real_parent"),
           ("task_struct", "pid_links"), ("pid", "tasks"), ("pid_namespace", "idr"),
           ("idr", "idr_rt"), ("idr", "idr_base"), ("xarray", "xa_head"),
           ("xa_node", "shift"), ("xa_node", "slots"), ("task_struct", "signal"),
           ("signal_struct", "shared_pending"), ("sigpending", "signal"),
           ("signal_struct", "thread_head"), ("task_struct", "thread_node"),
           ("task_struct", "thread_info"), ("thread_info", "flags"), ("list_head", "next"),
           ("mm_struct", "rss_stat"), ("task_struct", "pending"), ("rq", "nr_running"),
           ("task_struct", "start_time"), ("mm_struct", "exe_file"),
           ("task_struct", "group_leader"))
#: enumerators whose values the profile keeps (indexes of the kernel's vmstat arrays)
ENUMS = (("zone_stat_item", "NR_FREE_PAGES"), ("node_stat_item", "NR_FILE_PAGES"),
         ("node_stat_item", "NR_SHMEM"), ("node_stat_item", "NR_SLAB_UNRECLAIMABLE_B"),
         ("node_stat_item", "NR_ANON_MAPPED"), ("node_stat_item", "WORKINGSET_REFAULT_ANON"),
         ("node_stat_item", "WORKINGSET_REFAULT_FILE"))


def cache_dir() -> Path:
    """Where `make vm-kernel` unpacks the kernel package and the initramfs is built."""
    env = os.environ.get("BACKDOORS_VM_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / ".cache" / "vm"


@dataclass(frozen=True)
class GuestKernel:
    """One unpacked kernel build: its image, symbol map and modules."""

    root: Path  # the unpacked package (boot/, lib/modules/)
    version: str  # e.g. 6.1.0-57-cloud-amd64

    @classmethod
    def find(cls, folder: Path | None = None) -> "GuestKernel":
        """The kernel unpacked under `folder` (default: cache_dir()/root)."""
        root = (folder or cache_dir() / "root")
        images = sorted((root / "boot").glob("vmlinuz-*")) if root.is_dir() else []
        if not images:
            raise VmError(f"no guest kernel unpacked under {root}: run `make vm-kernel` "
                          "(downloads Debian's linux-image-cloud-amd64 and unpacks it)")
        version = images[-1].name.removeprefix("vmlinuz-")
        return cls(root, version)

    @property
    def image(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.version

    @property
    def profile_path(self) -> Path:
        """Beside the unpacked package (in the lab: cache_dir())."""
        return self.root.parent / f"profile-{self.version}.json"

    @cached_property
    def _profile(self) -> dict:
        """The profile of this build, decoded from the image once and cached as JSON next
        to it: symbols from kallsyms (the package's System.map is a stub that points at
        the -dbg package) and the member offsets of MEMBERS from BTF."""
        try:
            cached = json.loads(self.profile_path.read_text())
            if cached.get("format") == PROFILE_FORMAT:
                return cached
        except (OSError, ValueError):
            pass
        try:
            image = self.image.read_bytes()
        except OSError as e:
            raise VmError(f"cannot read the guest kernel image {self.image}: {e.strerror}") from None
        vmlinux = kallsyms.extract_vmlinux(image, str(self.image))
        table = kallsyms.symbols(vmlinux, str(self.image))
        types = btf.Btf(btf.section(vmlinux, ".BTF", str(self.image)))
        profile = {"format": PROFILE_FORMAT, "version": self.version,
                   "symbols": {name: addr for name, (_kind, addr) in table.items()},
                   "members": {f"{s}.{m}": types.member_offset(s, m) for s, m in MEMBERS},
                   "enums": {f"{e}.{n}": types.enum_value(e, n) for e, n in ENUMS},
                   "rss": _rss_layout(types)}
        tmp = self.profile_path.with_name(f".{self.profile_path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps(profile))
            tmp.replace(self.profile_path)
        except OSError:  # a read-only folder: decoded again next time, a few seconds
            tmp.unlink(missing_ok=True)
        return profile

    @property
    def symbols(self) -> dict[str, int]:
        """Symbol name -> link-time virtual address."""
        return self._profile["symbols"]

    def member(self, struct_name: str, member: str) -> int:
        """The byte offset of `member` in `struct struct_name` (one of MEMBERS)."""
        try:
            return self._profile["members"][f"{struct_name}.{member}"]
        except KeyError:
            raise VmError(f"the profile has no offset of {struct_name}.{member} "
                          "(add it to vm.kernel.MEMBERS)") from None

    def enum(self, enum_name: str, name: str) -> int:
        """The value of enumerator `name` of `enum enum_name` (one of ENUMS)."""
        try:
            return self._profile["enums"][f"{enum_name}.{name}"]
        except KeyError:
            raise VmError(f"the profile has no value of {enum_name}.{name} "
                          "(add it to vm.kernel.ENUMS)") from None

    @property
    def rss_layout(self) -> tuple[int, int]:
        """How mm_struct.rss_stat holds a process's page counts: (the bytes from one
        counter to the next, the offset of a counter's value in it)."""
        return tuple(self._profile["rss"])

    def symbol(self, name: str) -> int:
        """The link-time virtual address of kernel symbol `name`."""
        try:
            return self.symbols[name]
        except KeyError:
            raise VmError(f"kernel {self.version} has no symbol {name!r} in its kallsyms") from None

    def image_offset(self, name: str) -> int:
        """Where symbol `name` lies from the start of the kernel image (`_text`)."""
        return self.symbol(name) - self.symbol("_text")


def _rss_layout(types: btf.Btf) -> list[int]:
    """mm_struct.rss_stat's layout in this build: up to 6.1 `struct mm_rss_stat`, an array
    of atomic_long_t; from 6.2 an array of `struct percpu_counter`, whose `count` is the
    sum (per-CPU deltas of up to a batch each not yet folded in)."""
    try:
        return [8, types.member_offset("mm_rss_stat", "count")]
    except VmError:
        return [types.size_of("percpu_counter"), types.member_offset("percpu_counter", "count")]
