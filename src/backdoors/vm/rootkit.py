"""The `rootkit` fault: what a kernel rootkit does to a guest, done from outside through
QEMU's debug interface (its gdbstub), the way an attacker holding the hypervisor would.

Each tamper opens a gdbstub session (`Vm.debug`: the vCPUs stop for the write, as they
would under a rootkit's `stop_machine`), writes, and ends it (the guest runs on). Addresses come from
the same profile the monitor uses: an attacker knows the kernel build too.

- `redirect_syscall(vm, nr, to)`: point `sys_call_table[nr]` at another kernel function.
  (On this kernel -- 6.1 with the 2024 "don't use sys_call_table for dispatch" change --
  64-bit system calls are dispatched by `x64_sys_call`, a switch; the table still names
  them for tracing, so a rootkit that trusts it is caught here but changes no behaviour.)
- `patch_function(vm, symbol, code)`: overwrite a function's first bytes (default: return
  -ENOSYS at once -- the system call behind it fails, visibly).
- `hide_process(vm, pid)`: unlink the process from the task list (`tasks`), the classic
  direct kernel object manipulation; it stays in its parent's children list and runs.
  `deep=True` unlinks it from its parent's children list too (`sibling`): it is then in
  neither list, found only through the pid map the kernel itself looks pids up in.
"""

from __future__ import annotations

import struct

from ..errors import VmError
from .machine import settled_session

#: mov $-38 (-ENOSYS), %rax; ret
RETURN_ENOSYS = bytes.fromhex("48c7c0daffffffc3")
NR_UNAME = 63


def redirect_syscall(vm, nr: int, to: str) -> int:
    """sys_call_table[nr] := the running address of `to`; returns the address replaced."""
    memory = vm.memory()
    phys = memory.phys("sys_call_table") + 8 * nr
    with vm.debug() as stub:
        was = struct.unpack("<Q", stub.read_phys(phys, 8))[0]
        stub.write_phys(phys, struct.pack("<Q", memory.virt(to)))
    return was


def patch_function(vm, symbol: str, code: bytes = RETURN_ENOSYS) -> bytes:
    """Overwrite the first bytes of kernel function `symbol`; returns the bytes replaced."""
    memory = vm.memory()
    phys = memory.phys(symbol)
    with vm.debug() as stub:
        was = stub.read_phys(phys, len(code))
        stub.write_phys(phys, code)
    return was


def hide_process(vm, pid: int, *, deep: bool = False, attempts: int = 200) -> int:
    """Unlink process `pid` from the guest's task list (prev->next = next, next->prev =
    prev), and with `deep` from its parent's children list too; its own links are left
    as they were. Returns its task_struct's address. The
    vCPUs may stop in the middle of a fork's or an exit's list update: then the guest is
    let run a moment and stopped again (a real rootkit takes the list's lock)."""
    memory = vm.memory()
    link = memory.kernel.member("task_struct", "tasks")
    with settled_session(vm, attempts) as (stub, ok):  # the vCPUs are stopped: the list holds still
        if not ok:
            raise VmError(f"VM {vm.spec.name}: the task list was mid-update at each of "
                          f"{attempts} stops")
        task = next((t for p, _c, t in memory.process_tree() if p == pid), None)
        if task is None:
            raise VmError(f"VM {vm.spec.name}: no process {pid} to hide")
        links = [link] + ([memory.kernel.member("task_struct", "sibling")] if deep else [])
        for at in links:
            nxt, prev = struct.unpack("<QQ", memory.read_virt(task + at, 16))
            stub.write_phys(memory.translate(prev), struct.pack("<Q", nxt))  # prev->next
            stub.write_phys(memory.translate(nxt + 8), struct.pack("<Q", prev))  # next->prev
        return task
