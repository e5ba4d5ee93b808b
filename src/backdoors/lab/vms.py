"""The lab's VM nodes: a namespace on the service bridge per VM, the guest bridged into it.

The guest holds the node's address and VIP and serves HTTP on SERVICE_PORT (busybox
httpd), so clients reach it like a container node's service. The guests' QEMU processes
outlive a `lab up` that returns; `lab down` (or the next `up`) reaps them by name prefix.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import net
from ..net import netns
from ..nodes import Node
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


def memory_limit(node_limit: int | None) -> int | None:
    """A VM node's memory limit: its guest's RAM (charged to the node as the guest touches
    it) on top of what a container node may use, for QEMU itself."""
    return None if node_limit is None else node_limit + (VmSpec.memory_mb << 20)


def spec(plan: topology.Plan, name: str, **kw) -> VmSpec:
    v = plan.vm(name)
    addrs = (f"{v.address}/{topology.SERVICE_PREFIXLEN}", f"{v.vip}/{topology.SERVICE_PREFIXLEN}")
    return VmSpec(v.netns, run_dir(plan, name), netns=v.netns, uplink="eth0",
                  addresses=addrs, port=topology.SERVICE_PORT, **kw)


def run_dir(plan: topology.Plan, name: str) -> Path:
    """VM node `name`'s folder: QEMU's log, console and QMP sockets."""
    return plan.run_dir / "vms" / plan.vm(name).name


def start(plan: topology.Plan, name: str, **kw) -> Vm:
    """Boot VM node `name` (kw: VmSpec keys, e.g. accel, kaslr, memory_mb, node, uid)."""
    return Vm.start(spec(plan, name, **kw))


def start_all(plan: topology.Plan, nodes: dict[str, Node], uids: dict[str, int],
              **kw) -> dict[str, Vm]:
    """Boot every VM node of `plan` at once, each QEMU in its node (`nodes`) as its uid
    (`uids`); kw: other VmSpec keys. If one fails, the others are stopped and the first
    error raised."""
    from concurrent.futures import ThreadPoolExecutor
    if not plan.vms:
        return {}
    initramfs.build(GuestKernel.find())  # once, before the guests look for it
    with ThreadPoolExecutor(len(plan.vms)) as pool:
        futures = {v.name: pool.submit(start, plan, v.name, node=nodes[v.name],
                                       uid=uids[v.name], **kw) for v in plan.vms}
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
