"""The lab's VM nodes: a namespace on the service bridge per VM, the guest bridged into it.

The guest holds the node's address and VIP and serves HTTP on SERVICE_PORT (busybox
httpd), so clients reach it like a container node's service. The guests' QEMU processes
outlive a `lab up` that returns; `lab down` (or the next `up`) reaps them by name prefix.
"""

from __future__ import annotations

import os

from .. import net
from ..net import netns
from ..vm import initramfs, machine
from ..vm.kernel import GuestKernel
from ..vm.machine import Vm, VmSpec
from ..vm.memory import GuestMemory
from . import topology


def build_network(plan: topology.Plan) -> None:
    """Each VM node's namespace, its veth `eth0` on the service bridge (no address: the
    guest has them)."""
    for v in plan.vms:
        netns.create(v.netns)
        net.add_veth(plan.switch_ns, v.name, v.netns, "eth0", bridge=topology.BR_SERVICE)


def spec(plan: topology.Plan, name: str, **kw) -> VmSpec:
    v = plan.vm(name)
    addrs = (f"{v.address}/{topology.SERVICE_PREFIXLEN}", f"{v.vip}/{topology.SERVICE_PREFIXLEN}")
    return VmSpec(v.netns, plan.run_dir / "vms" / v.name, netns=v.netns, uplink="eth0",
                  addresses=addrs, port=topology.SERVICE_PORT, **kw)


def start(plan: topology.Plan, name: str, **kw) -> Vm:
    """Boot VM node `name` (kw: VmSpec keys, e.g. accel, kaslr, memory_mb)."""
    return Vm.start(spec(plan, name, **kw))


def start_all(plan: topology.Plan, **kw) -> dict[str, Vm]:
    """Boot every VM node of `plan` at once (kw: VmSpec keys); if one fails, the others
    are stopped and the first error raised."""
    from concurrent.futures import ThreadPoolExecutor
    if not plan.vms:
        return {}
    initramfs.build(GuestKernel.find())  # once, before the guests look for it
    with ThreadPoolExecutor(len(plan.vms)) as pool:
        futures = {v.name: pool.submit(start, plan, v.name, **kw) for v in plan.vms}
    started, errors = {}, []
    for name, future in futures.items():
        try:
            started[name] = future.result()
        except BaseException as e:  # noqa: BLE001 - collected, the first re-raised
            errors.append(e)
    if errors:
        for vm in started.values():
            vm.stop()
        raise errors[0]
    return started


def reap(prefix: str) -> list[int]:
    return machine.reap(prefix)


def memory(plan: topology.Plan, name: str, pid: int) -> GuestMemory:
    """VM node `name`'s RAM, mapped read-only from its QEMU (`pid`) by any process."""
    fd = machine.open_ram(pid, plan.vm(name).netns)
    try:
        return GuestMemory(fd, GuestKernel.find(), where=f"VM node {name}")
    finally:
        os.close(fd)
