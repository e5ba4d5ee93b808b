"""One VM node: a QEMU guest whose RAM, NIC and control channel the host owns.

    vm = Vm.start(VmSpec("bd-lab-v0", run_dir, netns="bd-lab-v0", uplink="eth0",
                         addresses=("10.77.2.1/16",)))
    vm.memory().jiffies()   # read from the guest's RAM, without the guest's help
    vm.lock(); vm.unlock()  # the node lock: QMP stop / cont of the vCPUs
    vm.stop()

What it owns, each named by the VM's name (a lab's prefix) so `reap(prefix)` finds it:
- the RAM: a memfd `<name>-ram` made here and handed to QEMU (memory-backend-file on
  /proc/self/fd/N, share=on), so the host maps the very pages the guest runs on;
- the NIC: a tap `tap0` opened here inside the node's network namespace (not persistent:
  it ends with the last holder, QEMU) and bridged there with the node's uplink, so the
  guest answers on the node's service address;
- the QEMU process (`-name <name>`), its two QMP sockets (its owner's `qmp.sock`, an
  agent's `agent-qmp.sock`: QEMU serves one client per socket) and console log in `run_dir`.

Given a node (`VmSpec.node`), QEMU runs inside it: the guest's memory, threads and CPU
are accounted to the node's cgroup, where an agent finds the QEMU. Given a uid
(`VmSpec.uid`), QEMU runs as that unprivileged user (as libvirt's `qemu` user does), so a
guest that broke out into QEMU would hold only that uid's power; everything it needs is
handed over open (RAM, sealed against resizing; tap, kernel, initramfs) or lies in
`run_dir`, given to it (whose links the host does not follow).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..common.logs import log_tail
from ..errors import NetError, VmError
from ..net import add_bridge, link_info, netns, set_master, set_up
from . import initramfs
from .kernel import GuestKernel
from .memory import MAX_RAM, GuestMemory
from .qmp import Qmp

if TYPE_CHECKING:
    from ..nodes import Node
    from .gdb import GdbStub

QEMU = "qemu-system-x86_64"
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000
TAP, BRIDGE = "tap0", "br0"
AGENT_QMP = "agent-qmp.sock"
GDB = "gdb.sock"
#: a guest's RAM memfd keeps its size: neither shrunk (reads of a mapping past its end
#: fault, SIGBUS) nor grown, and the seals themselves fixed
RAM_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: RAM must stay below the PCI hole so that memfd offsets are guest-physical addresses
MAX_MEMORY_MB = MAX_RAM >> 20


@dataclass(frozen=True)
class VmSpec:
    """What to run: `name` prefixes every object (use the lab's prefix); `addresses` are
    the guest's (CIDR), `port` its HTTP service's."""

    name: str
    run_dir: Path
    netns: str | None = None  # where the tap goes; None: no NIC
    uplink: str | None = None  # an interface of `netns` bridged with the tap
    addresses: tuple[str, ...] = ()
    port: int = 80
    memory_mb: int = 256
    #: tcg | kvm | auto (KVM if it boots within kvm_probe_s, else TCG); default TCG (or
    #: $BACKDOORS_VM_ACCEL): nested KVM hangs in early boot on the machines this was built on
    accel: str = field(default_factory=lambda: os.environ.get("BACKDOORS_VM_ACCEL", "tcg"))
    kaslr: bool = True
    kvm_probe_s: float = 15.0
    extra_append: tuple[str, ...] = field(default=())
    node: Node | None = None  # run QEMU inside this node (its cgroup and netns)
    uid: int | None = None  # run QEMU as this host uid (and gid); None: as the caller

    @property
    def mac(self) -> str:
        h = zlib.crc32(self.name.encode())
        return "52:54:00:%02x:%02x:%02x" % (h >> 16 & 0xFF, h >> 8 & 0xFF, h & 0xFF)


class Vm:
    """A running guest; `start` builds it, `stop` removes all it owns."""

    def __init__(self, spec: VmSpec, kernel: GuestKernel, proc: subprocess.Popen,
                 ram_fd: int, accel: str, boot_s: float):
        self.spec, self.kernel, self.proc = spec, kernel, proc
        self.ram_fd, self.accel, self.boot_s = ram_fd, accel, boot_s
        self._qmp = Qmp(self.qmp_path, f"VM {spec.name}", pid=proc.pid)
        self._memory: GuestMemory | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def console_log(self) -> Path:
        return self.spec.run_dir / "console.log"

    @property
    def qmp_path(self) -> Path:
        return self.spec.run_dir / "qmp.sock"

    @property
    def agent_qmp_path(self) -> Path:
        """The QMP socket kept for an agent (its node lock: agent/config.py NodeSpec.vm)."""
        return agent_qmp_path(self.spec.run_dir)

    # ---- life cycle ---------------------------------------------------------------

    @classmethod
    def start(cls, spec: VmSpec, kernel: GuestKernel | None = None,
              timeout: float = 120.0) -> "Vm":
        """Boot the guest and wait until its service listens (`bd-guest: ready`)."""
        if not 64 <= spec.memory_mb <= MAX_MEMORY_MB:
            raise VmError(f"VM {spec.name}: memory_mb must be 64..{MAX_MEMORY_MB}, got {spec.memory_mb}")
        if spec.accel not in ("tcg", "kvm", "auto"):
            raise VmError(f"VM {spec.name}: accel must be tcg, kvm or auto, got {spec.accel!r}")
        kernel = kernel or GuestKernel.find()
        initrd = initramfs.build(kernel)
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        if spec.uid is not None:  # its console log and sockets go there
            os.chown(spec.run_dir, spec.uid, spec.uid)
        if spec.netns is not None:
            _bridge(spec)
        if spec.accel == "tcg":
            return cls._boot(spec, kernel, initrd, "tcg", timeout)
        if spec.accel == "kvm" or os.access("/dev/kvm", os.R_OK | os.W_OK):
            try:
                return cls._boot(spec, kernel, initrd, "kvm",
                                 timeout if spec.accel == "kvm" else spec.kvm_probe_s)
            except VmError:
                if spec.accel == "kvm":
                    raise
        return cls._boot(spec, kernel, initrd, "tcg", timeout)

    @classmethod
    def _boot(cls, spec: VmSpec, kernel: GuestKernel, initrd: Path, accel: str,
              timeout: float) -> "Vm":
        ram = os.memfd_create(f"{spec.name}-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        tap = None
        files: list[int] = []  # kernel and initramfs, open: an unprivileged QEMU may not reach them
        try:
            os.ftruncate(ram, spec.memory_mb << 20)
            # its size fixed for good: a QEMU that shrank it would make the host's reads fault
            fcntl.fcntl(ram, fcntl.F_ADD_SEALS, RAM_SEALS)
            tap = _open_tap(spec.netns) if spec.netns is not None else None
            for path in (kernel.image, initrd):
                files.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            argv = _argv(spec, *files, accel, ram, tap)
            for stale in ("console.log", "qmp.sock", AGENT_QMP, GDB):
                (spec.run_dir / stale).unlink(missing_ok=True)
            began = time.monotonic()
            # (the folder is QEMU's to write when it runs as a uid: no following its links)
            log_fd = os.open(spec.run_dir / "qemu.log",
                             os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644)
            with open(log_fd, "ab") as log:
                proc = _spawn(spec, argv, log, [ram, *files, *([tap] if tap is not None else [])])
        except BaseException:
            os.close(ram)
            raise
        finally:
            for fd in files + ([tap] if tap is not None else []):
                os.close(fd)  # QEMU holds them now: the tap ends with QEMU
        vm = cls(spec, kernel, proc, ram, accel, 0.0)
        try:
            vm._wait_ready(began, timeout)
        except BaseException:
            vm.stop()
            raise
        vm.boot_s = time.monotonic() - began
        return vm

    def _wait_ready(self, began: float, timeout: float) -> None:
        while time.monotonic() - began < timeout:
            if self.proc.poll() is not None:
                raise VmError(f"VM {self.spec.name}: QEMU exited with status "
                              f"{self.proc.returncode}; {log_tail(self.spec.run_dir / 'qemu.log')}")
            try:
                if initramfs.READY.encode() in self.console_log.read_bytes():
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        raise VmError(f"VM {self.spec.name} ({self.accel}) not ready within {timeout:.0f}s; "
                      f"{log_tail(self.console_log)}")

    def stop(self) -> None:
        """Kill QEMU (with it the tap and its hold on the RAM), close the RAM. Idempotent."""
        self._qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self._memory is not None:
            self._memory.close()
            self._memory = None
        if self.ram_fd >= 0:
            os.close(self.ram_fd)
            self.ram_fd = -1
        for path in (self.qmp_path, self.agent_qmp_path, self.gdb_path):
            path.unlink(missing_ok=True)

    def __enter__(self) -> "Vm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- control (QMP) and reading ---------------------------------------------------

    def qmp(self, command: str, **args) -> object:
        """Run one QMP command; its "return" value."""
        return self._qmp(command, **args)

    def lock(self) -> None:
        """The node lock of a VM: stop its vCPUs (the guest kernel no longer runs)."""
        self.qmp("stop")

    def unlock(self) -> None:
        self.qmp("cont")

    @property
    def gdb_path(self) -> Path:
        return self.spec.run_dir / GDB

    def gdb(self) -> "GdbStub":
        """A connection to the guest's QEMU gdbstub (`gdb_stub`)."""
        return gdb_stub(self._qmp, self.gdb_path, f"VM {self.spec.name}")

    def debug(self) -> "contextlib.AbstractContextManager[GdbStub]":
        """A gdbstub session (`debug_session`)."""
        return debug_session(self._qmp, self.gdb_path, f"VM {self.spec.name}")

    def running(self) -> bool:
        return self._qmp.running()

    def memory(self) -> GuestMemory:
        """The guest's RAM, mapped read-only (one mapping per Vm)."""
        if self._memory is None:
            self._memory = GuestMemory(self.ram_fd, self.kernel, where=f"VM {self.spec.name}")
        return self._memory


def gdb_stub(qmp: Qmp, path: Path, where: str) -> "GdbStub":
    """A connection to a guest's QEMU gdbstub on `path` (started there on first use
    through QMP's HMP `gdbserver`; any party may use it, one at a time): the debug
    interface the rootkit fault writes through and the healer restores through.
    Connecting stops the vCPUs."""
    from .gdb import GdbStub
    if not path.exists():
        qmp("human-monitor-command", **{"command-line": f"gdbserver unix:{path},server=on,wait=off"})
    return GdbStub(path, where=where, pid=qmp.pid)


@contextmanager
def debug_session(qmp: Qmp, path: Path, where: str) -> Iterator["GdbStub"]:
    """A gdbstub session: the vCPUs stop while it is open; after it they are back as
    they were (running, or stopped under the node lock). QEMU's own detach does not say:
    after a session closed without one it leaves them stopped, and a detach under QMP
    `stop` resumes them -- so QMP puts them right."""
    was = qmp.running()
    stub = gdb_stub(qmp, path, where)
    try:
        yield stub
    finally:
        try:
            stub.detach()
        except VmError:
            stub.close()
        if qmp.running() != was:
            qmp("cont" if was else "stop")


@contextmanager
def settled_session(vm, attempts: int, *, lock: bool = False) -> Iterator[tuple["GdbStub", bool]]:
    """A debug session of `vm` (a Vm or a VmNode) at a stop outside any task list update
    (GuestMemory.task_list_settled): a stop inside one lets the guest run 5 ms to finish
    it, then stops it again, up to `attempts` stops. Yields (stub, ok): ok, the list may
    be written now -- no update under way, or the guest was held stopped (under the node
    lock: it cannot finish one; whoever writes then takes that risk); not ok after the
    last stop. `lock`: each stop under the node lock too (vm.lock/unlock), as healing's."""
    memory = vm.memory()
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            time.sleep(0.005)
        was = vm.running()  # read each time: a lease may have stopped it meanwhile
        if lock and was:
            vm.lock()
        try:
            with vm.debug() as stub:
                ok = not was or memory.task_list_settled()
                if ok or attempt == attempts:
                    yield stub, ok
                    return
        finally:
            if lock and was:
                vm.unlock()


def agent_qmp_path(run_dir: Path) -> Path:
    """The agent's QMP socket of the VM whose run folder is `run_dir`."""
    return run_dir / AGENT_QMP


def _spawn(spec: VmSpec, argv: list[str], log, fds: list[int]) -> subprocess.Popen:
    """Start QEMU: in `spec.node` if given, as `spec.uid` if given."""
    if spec.node is not None:
        return spec.node.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             pass_fds=fds, user=spec.uid)
    ids = {} if spec.uid is None else {"user": spec.uid, "group": spec.uid, "extra_groups": []}
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            pass_fds=fds, start_new_session=True, **ids)


def _argv(spec: VmSpec, image: int, initrd: int, accel: str, ram: int,
          tap: int | None) -> list[str]:
    # nohz=off: the guest kernel ticks while idle, so its jiffies stand still only when
    # it does not run (a tickless idle guest's stand still for as long as it idles)
    append = ["console=ttyS0", "panic=-1", "quiet", "nohz=off", f"bd.name={spec.name}",
              f"bd.port={spec.port}"]
    if spec.addresses:
        append.append("bd.addr=" + ",".join(spec.addresses))
    if not spec.kaslr:
        append.append("nokaslr")
    append += spec.extra_append
    size = f"{spec.memory_mb}M"
    argv = [QEMU, "-name", spec.name, "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-accel", accel, "-m", size, "-smp", "1",
            "-object", f"memory-backend-file,id=mem,size={size},mem-path=/proc/self/fd/{ram},share=on",
            "-machine", "pc,memory-backend=mem",
            "-kernel", f"/proc/self/fd/{image}", "-initrd", f"/proc/self/fd/{initrd}",
            "-append", " ".join(append),
            "-serial", f"file:{spec.run_dir / 'console.log'}",
            "-qmp", f"unix:{spec.run_dir / 'qmp.sock'},server=on,wait=off",
            "-qmp", f"unix:{agent_qmp_path(spec.run_dir)},server=on,wait=off"]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    if tap is not None:
        argv += ["-netdev", f"tap,id=net0,fd={tap}",
                 "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac}"]
    return argv


def _open_tap(ns: str) -> int:
    """A tap `tap0` in namespace `ns` (a tap lives where /dev/net/tun was opened), up
    and in the node's bridge; the descriptor is inheritable for QEMU."""
    with netns.enter(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", TAP.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise VmError(f"cannot create {TAP} in namespace {ns}: {e.strerror} "
                      "(a VM already running there?)") from None
    set_master(ns, TAP, BRIDGE)
    set_up(ns, TAP)
    return fd


def _bridge(spec: VmSpec) -> None:
    """The node's bridge: the uplink (its veth on the service network) and, later, the tap."""
    try:
        link_info(spec.netns, BRIDGE)
    except NetError:  # missing: make it
        add_bridge(spec.netns, BRIDGE)
    if spec.uplink is not None:
        set_master(spec.netns, spec.uplink, BRIDGE)
        set_up(spec.netns, spec.uplink)


#: the memfd QEMU makes itself for `-object memory-backend-memfd` (its type name)
QEMU_MEMFD = "memory-backend-memfd"


def open_ram(pid: int, name: str) -> int:
    """A read-only descriptor of the RAM of the guest `name` run by QEMU `pid`, taken from
    /proc/PID/fd (for a process other than the VM's owner, e.g. an agent): the memfd
    `<name>-ram` handed to QEMU (a Vm's), else the one QEMU made for a
    `memory-backend-memfd` object (an operator's QEMU), which must be its only one."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError as e:
        raise VmError(f"cannot list the descriptors of QEMU pid {pid} (VM {name}): {e.strerror}") from None
    found: dict[str, list[str]] = {}
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        memfd = link.removeprefix("/memfd:").removesuffix(" (deleted)")
        if link.startswith("/memfd:") and memfd in (f"{name}-ram", QEMU_MEMFD):
            found.setdefault(memfd, []).append(fd)
    fd = (found.get(f"{name}-ram") or [None])[0]
    if fd is None:
        if len(found.get(QEMU_MEMFD, [])) > 1:
            raise VmError(f"QEMU pid {pid} (VM {name}) holds {len(found[QEMU_MEMFD])} "
                          f"{QEMU_MEMFD} memfds: give the guest one memory backend")
        fd = (found.get(QEMU_MEMFD) or [None])[0]
    if fd is None:
        raise VmError(f"QEMU pid {pid} holds no RAM memfd of VM {name} (neither "
                      f"'{name}-ram' nor '{QEMU_MEMFD}'): is it that VM's QEMU, started "
                      f"with -object {QEMU_MEMFD},id=mem,share=on,... -machine memory-backend=mem?")
    try:
        ram = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise VmError(f"cannot open the RAM of VM {name} from QEMU pid {pid}: {e.strerror}") from None
    if not fcntl.fcntl(ram, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
        os.close(ram)
        raise VmError(f"the RAM memfd of VM {name} (QEMU pid {pid}) is not sealed against "
                      "shrinking: QEMU could make every read of it fault (SIGBUS); QEMU seals "
                      f"its {QEMU_MEMFD} unless told seal=off")
    return ram


def reap(prefix: str) -> list[int]:
    """SIGKILL every QEMU whose `-name` starts with `prefix` (a crashed owner's guests);
    their taps and RAM end with them. The pids killed."""
    import psutil
    killed = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if not argv or not argv[0].endswith(QEMU):
            continue
        if any(a == "-name" and i + 1 < len(argv) and argv[i + 1].startswith(prefix)
               for i, a in enumerate(argv)):
            try:
                p.send_signal(signal.SIGKILL)
                p.wait(5)
                killed.append(p.pid)
            except psutil.Error:
                pass
    return killed
