"""Names and addresses of a lab's kernel objects, derived from the lab name alone.

Every kernel object of lab NAME carries the prefix `bd-NAME-` (network namespaces and
cgroups) or lives under /run/backdoors/NAME, so `reap(NAME)` can remove what a killed lab
left behind, and labs with different names never collide. Addresses are private to the
lab's own namespaces (nothing is routed to the host), so every lab uses the same plan:

    service network 10.77.0.0/16   client .0.2, node i at .1.(i+1), VIP of node i at .100.(i+1),
                                   VM node i at .2.(i+1), its VIP at .101.(i+1)
    private network 10.99.0.0/24   host j at .(j+1), monitor at .250
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import LabError

RUN_ROOT = Path("/run/backdoors")
NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")

SERVICE_PREFIXLEN = 16
PRIVATE_PREFIXLEN = 24
CLIENT_ADDR = "10.77.0.2"
MONITOR_ADDR = "10.99.0.250"
SERVICE_PORT = 7000
RECOVERABLE_PORT = 7100
AGENT_PORT = 7700
ETCD_PORT = 2379  # the lab's etcd, in the monitor namespace (a fleet of monitors); peers +1
#: nodes per lab: lab nodes are cheap (a cgroup, a netns, a container), and watching many
#: of them is what `backdoors bench monitor` measures; addresses allow up to 254
MAX_NODES = 128
#: VM nodes per lab: each is a QEMU guest with its own RAM (256 MiB)
MAX_VM_NODES = 8

BR_SERVICE = "br-svc"
BR_PRIVATE = "br-priv"


#: names whose prefix is another's: `bd-agent-` is a standalone agent's own cgroup (its
#: default, agent.config), which reaping such a lab would kill
RESERVED = frozenset({"agent"})


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise LabError(
            f"invalid lab name {name!r}: use 1-10 lowercase letters or digits, starting "
            "with a letter (it prefixes namespace and cgroup names)"
        )
    if name in RESERVED:
        raise LabError(f"lab name {name!r} is reserved: bd-{name}- names the host's own "
                       "agents' cgroups, which the lab's teardown would reap")
    return name


def prefix(lab: str) -> str:
    """The name prefix of every namespace and cgroup of `lab`."""
    return f"bd-{lab}-"


@dataclass(frozen=True)
class HostPlan:
    name: str  # h0, h1, ...
    netns: str
    address: str  # on the private network
    agent_cgroup: str


@dataclass(frozen=True)
class NodePlan:
    name: str  # n0, n1, ...
    host: str
    netns: str
    cgroup: str
    address: str  # the node's own address on the service network
    vip: str  # the service address clients use; moves on recovery


@dataclass(frozen=True)
class VmPlan:
    """A VM node (vm/machine.py): a guest bridged into its own namespace; the guest holds
    the address and the VIP."""

    name: str  # v0, v1, ...
    host: str
    netns: str
    cgroup: str  # its QEMU's
    address: str
    vip: str


@dataclass(frozen=True)
class Plan:
    lab: str
    hosts: tuple[HostPlan, ...]
    nodes: tuple[NodePlan, ...]
    vms: tuple[VmPlan, ...] = ()

    @property
    def switch_ns(self) -> str:
        return f"{prefix(self.lab)}sw"

    @property
    def client_ns(self) -> str:
        return f"{prefix(self.lab)}client"

    @property
    def monitor_ns(self) -> str:
        return f"{prefix(self.lab)}mon"

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.lab

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"lab {self.lab} has no node {name!r} (nodes: {', '.join(n.name for n in self.nodes)})")

    def vm(self, name: str) -> VmPlan:
        for v in self.vms:
            if v.name == name:
                return v
        raise LabError(f"lab {self.lab} has no VM node {name!r} (VM nodes: "
                       f"{', '.join(v.name for v in self.vms) or 'none; lab up --vm-nodes K'})")

    def host(self, name: str) -> HostPlan:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"lab {self.lab} has no host {name!r}")


def plan(lab: str, hosts: int, nodes: int, vm_nodes: int = 0) -> Plan:
    """The topology of a lab with `hosts` hosts and `nodes` nodes (node i on host i mod H),
    and `vm_nodes` VM nodes."""
    check_name(lab)
    if not 1 <= hosts <= 8:
        raise LabError(f"--hosts must be 1..8, got {hosts}")
    if not 1 <= nodes <= MAX_NODES:
        raise LabError(f"--nodes must be 1..{MAX_NODES}, got {nodes}")
    p = prefix(lab)
    hs = tuple(
        HostPlan(f"h{j}", f"{p}h{j}", f"10.99.0.{j + 1}", f"{p}agent-h{j}") for j in range(hosts)
    )
    ns = tuple(
        NodePlan(f"n{i}", f"h{i % hosts}", f"{p}n{i}", f"{p}n{i}", f"10.77.1.{i + 1}",
                 f"10.77.100.{i + 1}")
        for i in range(nodes)
    )
    if not 0 <= vm_nodes <= MAX_VM_NODES:
        raise LabError(f"--vm-nodes must be 0..{MAX_VM_NODES}, got {vm_nodes}")
    if nodes + vm_nodes > MAX_NODES:  # (each has a uid range of the lab's: lab.Lab._uid_base)
        raise LabError(f"--nodes plus --vm-nodes must be at most {MAX_NODES}, got "
                       f"{nodes + vm_nodes}")
    vs = tuple(VmPlan(f"v{i}", f"h{i % hosts}", f"{p}v{i}", f"{p}v{i}", f"10.77.2.{i + 1}",
                      f"10.77.101.{i + 1}") for i in range(vm_nodes))
    return Plan(lab, hs, ns, vs)
