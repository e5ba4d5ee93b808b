"""The embedded lab: a cluster of hosts and nodes on one machine, built from namespaces.

    with Lab("t1", hosts=2, nodes=4) as lab:
        lab.sensors("n0")               # the sample service's Sensor Box, read from outside
        with lab.client_socket() as s:  # a socket in the client namespace
            s.connect((lab.plan.node("n0").vip, SERVICE_PORT))

Topology (see topology.py for names and addresses): a *switch* namespace holds two bridges;
the client namespace and every node's namespace hang on the service bridge; every lab
host's namespace (where its agent listens) and the monitor's hang on the private bridge,
which nodes cannot reach. Each node is also a cgroup with memory and pids limits, and a
container (nodes/container.py): its own PID (with a PID 1 that reaps orphans), mount, cgroup,
IPC, UTS and user namespaces. Everything the lab runs in a node (`run_in_node`: services,
faults, probes; `backdoors lab exec`) runs there as the node's service uid, an unprivileged
host uid of the node's own range; /run/backdoors (the lab's keys and config, the other nodes'
run directories) is hidden in the node but for the node's own run directory
(<run_dir>/nodes/<node>: its agent.sock and adoption sockets). A container ended by a fault
that killed its node's cgroup is started again by the next `run_in_node`.

The lab owns everything it creates and removes it in `down()`. A lab whose owner was
SIGKILLed is reaped by name prefix on the next `up()` or `down()` of the same name, and by
the next `up()` of any lab (its owner's pid and start time are in its state file) unless
it was left up on purpose (`lab up` without --foreground detaches it).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..common.procs import alive, is_same, read_line, read_process
from ..common.runtime import agent_socket, service_env
from .. import net
from ..errors import BackdoorsError, LabError, NodeError, require_root
from ..net import netns
from ..nodes import Node, cgroups
from ..nodes.container import (Container, Isolation, NodeProcess, mount_tmpfs, python_paths,
                               resize_tmpfs, uid_base_for, unmount_under)
from ..sensors import SensorBoxReader, Snapshot
from .. import fleet
from ..fleet import nats
from .agents import agent_pid, key_path, read_key, start_agent, stop_agents, write_keys
from . import topology, vms

log = logging.getLogger("backdoors.lab")

STATE_FILE = "lab.json"
#: Where Lab.data_dir makes directories: visible in the nodes (unlike /run/backdoors).
DATA_ROOT = Path("/run")
#: size of each node's run directory (a tmpfs): its sockets need next to nothing
NODE_RUN_DIR_BYTES = 16 << 20


@dataclass
class ServiceInfo:
    """A sample service running in a node: `pid` on the host, `ns_pid` inside the node
    (what the service itself sees, e.g. its Sensor Box's owner_pid)."""

    pid: int
    box_fd: int
    port: int
    ns_pid: int | None = None


#: what a node's programs get of the lab owner's environment (Lab.service_env)
NODE_ENV = frozenset({"PATH", "HOME", "LANG", "LANGUAGE", "TERM", "TZ", "VIRTUAL_ENV"})
NODE_ENV_PREFIXES = ("LC_", "PYTHON", "BACKDOORS_")


@dataclass
class LabState:
    """What `lab status`, `lab down` and fault commands need to find a running lab again."""

    name: str
    hosts: int
    nodes: int
    memory_limit: int | None
    pids_limit: int | None
    owner_pid: int
    created: float
    services: dict[str, ServiceInfo] = field(default_factory=dict)
    agents: dict[str, int] = field(default_factory=dict)
    etcd: str | None = None  # the client URL of the lab's etcd (a fleet of monitors)
    etcd_endpoints: list[str] = field(default_factory=list)  # every member's (Lab(etcd=3))
    nats: str | None = None  # the client URL of the lab's NATS server (warnings)
    monitors: dict[str, int] = field(default_factory=dict)  # monitor processes: id -> pid
    vm_nodes: int = 0
    vms: dict[str, int] = field(default_factory=dict)  # VM node -> its QEMU's pid
    vm_boots: dict[str, dict] = field(default_factory=dict)  # VM node -> accel, boot_s
    owner_start: float = 0.0  # the owner's start time (0: unknown, never taken as dead)
    detached: bool = False  # left up for `lab down` (`lab up`): it outlives its owner

    @classmethod
    def load(cls, path: Path) -> "LabState":
        try:
            raw = json.loads(path.read_text())
            raw["services"] = {k: ServiceInfo(**v) for k, v in raw.get("services", {}).items()}
            return cls(**raw)
        except FileNotFoundError:
            raise LabError(f"no lab state at {path}: is the lab up? (backdoors lab status)") from None
        except (ValueError, TypeError) as e:
            raise LabError(f"corrupt lab state {path}: {e}; run `backdoors lab down` to reap it") from None

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


def reap(name: str) -> dict[str, list[str]]:
    """Remove every kernel object and file of lab `name`, whoever left them."""
    require_root("reaping a lab", "it removes network namespaces, cgroups and processes")
    topology.check_name(name)
    prefix = topology.prefix(name)
    # the fleet's processes first (an etcd named by the prefix, monitors by their config)
    removed = {"processes": [str(p) for p in fleet.reap(prefix) + nats.reap(prefix)]}
    removed["processes"] += [str(p) for p in _reap_monitors(topology.RUN_ROOT / name)]
    removed["processes"] += [str(p) for p in vms.reap(prefix)]  # VM nodes' QEMUs
    removed.update(netns=netns.reap(prefix), cgroups=cgroups.reap(prefix), files=[])
    for leftover in Path("/dev/shm").glob(f"{prefix}*"):
        if leftover.is_dir() and not leftover.is_symlink():  # the lab's etcd data
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed["files"].append(str(leftover))
    for leftover in DATA_ROOT.glob(f"{prefix}*"):  # Lab.data_dir
        shutil.rmtree(leftover, ignore_errors=True)
        removed["files"].append(str(leftover))
    run_dir = topology.RUN_ROOT / name  # last: its state file names the lab to reap again
    if run_dir.exists():
        unmount_under(run_dir)  # the nodes' run directories (tmpfs)
        shutil.rmtree(run_dir, ignore_errors=True)
        removed["files"].append(str(run_dir))
    return removed


def _reap_monitors(run_dir: Path) -> list[int]:
    """SIGKILL the monitor processes started with a config in `run_dir` (Lab.start_monitor)."""
    import psutil
    mark = str(run_dir / "monitors") + "/"
    killed = []
    for p in psutil.process_iter(["cmdline"]):
        if any(a.startswith(mark) for a in (p.info["cmdline"] or [])):
            try:
                p.kill()
                p.wait(5)
                killed.append(p.pid)
            except psutil.Error:
                pass
    return killed


def reap_abandoned() -> list[str]:
    """Reap every lab whose owner died without taking it down (a killed test or script):
    its nodes, services and agents would otherwise run on. A lab left up on purpose
    (`lab up` without --foreground) is detached and kept. Returns the names reaped."""
    reaped = []
    for name in running_labs():
        try:
            state = LabState.load(topology.RUN_ROOT / name / STATE_FILE)
        except LabError:
            continue  # corrupt: `lab down` says so to whoever looks
        if state.detached or not state.owner_start:
            continue
        if not is_same(state.owner_pid, state.owner_start):
            try:
                reap(name)
            except BackdoorsError as e:  # (a process in D state; another reaper's race)
                log.warning("lab %s: its owner died, and reaping it failed: %s "
                            "(`backdoors lab down --name %s` tries again)", name, e, name)
                continue
            reaped.append(name)
    return reaped


def running_labs() -> list[str]:
    """Names of labs with a state file under /run/backdoors."""
    if not topology.RUN_ROOT.is_dir():
        return []
    return sorted(p.parent.name for p in topology.RUN_ROOT.glob(f"*/{STATE_FILE}"))


class Lab:
    """An embedded cluster; a context manager that builds it and tears it down."""

    def __init__(self, name: str = "lab", *, hosts: int = 2, nodes: int = 4,
                 memory_limit: int | None = 1 << 30, pids_limit: int | None = 512,
                 services: bool = True, agents: bool = False, quorum: int = 1,
                 monitors: tuple[str, ...] = ("m1",), etcd: bool | int = False, vm_nodes: int = 0,
                 sample_period_s: float | None = None):
        self.plan = topology.plan(name, hosts, nodes, vm_nodes)
        self.name = name
        self.with_services = services
        self.with_agents, self.quorum, self.monitors = agents, quorum, tuple(monitors)
        self.sample_period_s = sample_period_s  # the agents' (None: their default)
        # etcd: False (none), True (one member) or how many members its cluster has
        self.etcd_members = int(etcd)
        if self.etcd_members < 0 or (self.etcd_members > 1 and self.etcd_members % 2 == 0):
            raise LabError(f"Lab(etcd={etcd!r}): an etcd cluster has an odd number of members "
                           "(1, 3, 5: a majority survives a member's loss)")
        self.with_etcd = self.etcd_members > 0
        self._etcd: list = []  # fleet.EtcdProcess started by this process
        me = read_process(os.getpid())
        self.state = LabState(name, hosts, nodes, memory_limit, pids_limit, os.getpid(), time.time(),
                              vm_nodes=vm_nodes, owner_start=me.start_time if me else 0.0)
        self._vms: dict = {}  # VM node -> vm.Vm started by this process
        self._nodes: dict[str, Node] = {}
        self._keys: dict = {}  # id -> agent.keys.Identity, read once
        self._containers: dict[str, Container] = {}
        self._containers_lock = threading.Lock()

    # ---- life cycle -------------------------------------------------------------------

    @classmethod
    def attach(cls, name: str) -> "Lab":
        """The running lab `name`, from its state file."""
        topology.check_name(name)
        state = LabState.load(topology.RUN_ROOT / name / STATE_FILE)
        lab = cls(name, hosts=state.hosts, nodes=state.nodes, memory_limit=state.memory_limit,
                  pids_limit=state.pids_limit, vm_nodes=state.vm_nodes)
        lab.state = state
        return lab

    @property
    def state_path(self) -> Path:
        return self.plan.run_dir / STATE_FILE

    def _refuse_if_up(self) -> None:
        """LabError if the lab of this name is up: reaping it would take down another
        command's lab (two `lab up` or `demo` runs with the default name)."""
        try:
            other = LabState.load(self.state_path)
        except LabError:
            return  # none, or corrupt: its leftovers are reaped
        if other.detached or (is_same(other.owner_pid, other.owner_start) if other.owner_start
                              else alive(other.owner_pid)):
            how = "left up" if other.detached else f"owned by pid {other.owner_pid}"
            raise LabError(f"lab {self.name} is up ({how}): take it down first "
                           f"(backdoors lab down --name {self.name}) or choose another name")

    def up(self) -> "Lab":
        """Build the lab (after reaping any leftovers of a lab of the same name); LabError
        if a lab of this name is up (its owner runs, or it was left up on purpose)."""
        require_root("building a lab")
        raise_nofile()
        for other in reap_abandoned():
            log.warning("reaped lab %s: its owner died without taking it down", other)
        self._refuse_if_up()
        reap(self.name)
        try:
            self.plan.run_dir.mkdir(parents=True)
            self.state.save(self.state_path)
            self._build_network()
            if self.with_etcd:
                self._start_etcd()
            self._start_vms()
            for n in self.plan.nodes:
                self._nodes[n.name] = Node.create(
                    n.name, n.cgroup, netns=n.netns,
                    memory_limit=self.state.memory_limit, pids_limit=self.state.pids_limit)
                (self.plan.run_dir / n.name).mkdir()
                # before agent and container: a node keeps the directory it was started with
                self.node_run_dir(n.name).mkdir(parents=True)
                # a tmpfs: what the node writes there is bounded and charged to its cgroup
                mount_tmpfs(self.node_run_dir(n.name), NODE_RUN_DIR_BYTES)
                self.container(n.name)
            if self.with_agents:
                self._keys = write_keys(self.plan, self.monitors)
                for h in self.plan.hosts:
                    self.state.agents[h.name] = start_agent(self.plan, h, self.quorum,
                                                               self.sample_period_s)
                    self.state.save(self.state_path)
            if self.with_services:  # ~1 s of CPU each: 2 cores start ~2 a second
                self.start_services([n.name for n in self.plan.nodes],
                                    timeout=30.0 + 0.5 * len(self.plan.nodes))
        except BaseException:
            self.down()
            raise
        return self

    def detach(self) -> None:
        """Leave the lab up after this process exits, for `backdoors lab down`."""
        self.state.detached = True
        self.state.save(self.state_path)

    def down(self) -> dict[str, list[str]]:
        """Tear the lab down: agents first (they thaw what they hold), then processes,
        namespaces, cgroups and files. Idempotent."""
        for monitor_id in list(self.state.monitors):
            self.stop_monitor(monitor_id)
        if self.state.agents:
            stop_agents(self.plan, self.state.agents)
        self._stop_containers()
        for vm in self._vms.values():
            vm.stop()
        self._vms.clear()
        return reap(self.name)  # the etcd too (by its name)

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def _build_network(self) -> None:
        p = self.plan
        for ns in (p.switch_ns, p.client_ns, p.monitor_ns, *(h.netns for h in p.hosts),
                   *(n.netns for n in p.nodes)):
            netns.create(ns)
        net.add_bridge(p.switch_ns, topology.BR_SERVICE)
        net.add_bridge(p.switch_ns, topology.BR_PRIVATE)
        net.add_veth(p.switch_ns, "client", p.client_ns, "eth0", bridge=topology.BR_SERVICE)
        net.add_address(p.client_ns, "eth0", f"{topology.CLIENT_ADDR}/{topology.SERVICE_PREFIXLEN}")
        net.add_veth(p.switch_ns, "mon", p.monitor_ns, "eth0", bridge=topology.BR_PRIVATE)
        net.add_address(p.monitor_ns, "eth0", f"{topology.MONITOR_ADDR}/{topology.PRIVATE_PREFIXLEN}")
        for h in p.hosts:
            net.add_veth(p.switch_ns, h.name, h.netns, "eth0", bridge=topology.BR_PRIVATE)
            net.add_address(h.netns, "eth0", f"{h.address}/{topology.PRIVATE_PREFIXLEN}")
        for n in p.nodes:
            net.add_veth(p.switch_ns, n.name, n.netns, "eth0", bridge=topology.BR_SERVICE)
            net.add_address(n.netns, "eth0", f"{n.address}/{topology.SERVICE_PREFIXLEN}")
            net.add_address(n.netns, "eth0", f"{n.vip}/{topology.SERVICE_PREFIXLEN}")
            # ARP requests from the node's own address: a moving VIP is announced only
            # by the gratuitous ARP of the recovery, never early by a restored socket
            netns.set_sysctl(n.netns, "net/ipv4/conf/eth0/arp_announce", 2)

    # ---- VM nodes (vms.py, docs/vm-backdoor.md) --------------------------------------

    def _start_vms(self) -> None:
        """Each VM node's namespace and cgroup (the guest's own limits plus QEMU's), then
        its QEMU, inside the node, as the node's unprivileged uid."""
        vms.build_network(self.plan)
        nodes = {v.name: Node.create(v.name, v.cgroup, netns=v.netns,
                                     memory_limit=vms.memory_limit(self.state.memory_limit),
                                     pids_limit=self.state.pids_limit)
                 for v in self.plan.vms}
        self._vms = vms.start_all(self.plan, nodes, {v.name: self.vm_uid(v.name)
                                                     for v in self.plan.vms})
        self.state.vms = {name: vm.pid for name, vm in self._vms.items()}
        self.state.vm_boots = {name: {"accel": vm.accel, "boot_s": round(vm.boot_s, 2)}
                               for name, vm in self._vms.items()}
        self.state.save(self.state_path)

    def vm(self, name: str):
        """VM node `name` (a vm.Vm: QMP lock, guest memory), if this process started it."""
        self.plan.vm(name)
        if name not in self._vms:
            raise LabError(f"VM node {name} of lab {self.name} was started by another process "
                           f"(pid {self.state.owner_pid}): only its owner holds its RAM and QMP")
        return self._vms[name]

    # ---- a fleet of monitors: etcd and monitor processes (docs/operations.md §8a) -------

    def _start_etcd(self) -> None:
        """etcd in the monitor namespace, on the private network (one member, or a cluster
        of `etcd_members` on ports 2 apart); its data on tmpfs under the lab's prefix
        (/dev/shm/bd-NAME-etcd, -etcd1, ...: reaped with the lab, and no disk syncs)."""
        prefix = topology.prefix(self.name)
        self._etcd = fleet.EtcdProcess.cluster(
            f"{prefix}etcd", f"/dev/shm/{prefix}etcd", self.etcd_members,
            host=topology.MONITOR_ADDR, port=topology.ETCD_PORT,
            within=lambda: netns.enter(self.plan.monitor_ns))
        for member in self._etcd:
            member.launch()
        for member in self._etcd:
            member.wait()
        self.state.etcd = self._etcd[0].url
        self.state.etcd_endpoints = [m.url for m in self._etcd]
        self.state.save(self.state_path)

    def kill_etcd_member(self, index: int) -> str:
        """SIGKILL member `index` of the lab's etcd cluster (a crash; its data kept); its
        name. Only members this process started (Lab(etcd=3) here, not `attach`)."""
        member = self._etcd_member(index)
        member.kill()
        return member.name

    def restart_etcd_member(self, index: int, timeout: float = 15.0) -> None:
        """Start member `index` again with its data; back once it answers (it rejoined)."""
        self._etcd_member(index).start(timeout, fresh=False)

    def _etcd_member(self, index: int):
        if not 0 <= index < len(self._etcd):
            raise LabError(f"lab {self.name}: no etcd member {index} started by this process "
                           f"(it started {len(self._etcd)}; Lab(etcd=3) for a cluster)")
        return self._etcd[index]

    def start_nats(self, remotes: list[str] | tuple[str, ...] = ()) -> "nats.NatsProcess":
        """A NATS server of the lab's own, for warnings between clusters (labs): on the
        host's loopback, where the lab's monitors run (in-process or start_monitor), with
        free ports; it accepts leaf nodes (`.leaf_url`: give it as another lab's `remotes`).
        Its config and log under the lab's prefix (/dev/shm/bd-NAME-nats); it is stopped
        with the lab, by its name."""
        prefix = topology.prefix(self.name)
        proc = nats.NatsProcess(f"{prefix}nats", f"/dev/shm/{prefix}nats",
                                leaf_port=0, remotes=list(remotes)).start()
        self.state.nats = proc.url
        self.state.save(self.state_path)
        return proc

    @property
    def etcd_url(self) -> str:
        if self.state.etcd is None:
            raise LabError(f"lab {self.name} runs no etcd (Lab(etcd=True), lab up --etcd)")
        return self.state.etcd

    def monitor_config(self, monitor_id: str = "m1", **kw):
        """A MonitorConfig polling every agent of the lab (nodes discovered) from its monitor
        namespace, of the lab's fleet when it runs etcd; `kw` sets other keys."""
        from ..monitor.config import AgentEntry, MonitorConfig
        agents = [AgentEntry(h.name, self.agent_address(h.name), netns=self.plan.monitor_ns,
                             public_key=self.agent_public_key(h.name))
                  for h in self.plan.hosts]
        if self.state.etcd is not None:
            kw = {"etcd": list(self.state.etcd_endpoints or [self.state.etcd]),
                  "etcd_netns": self.plan.monitor_ns, **kw}
        return MonitorConfig(monitor_id=monitor_id, agents=agents, **kw)

    def start_monitor(self, monitor_id: str, **kw) -> int:
        """Run `backdoors monitor` as a process of its own (config, log and incidents in
        <run_dir>/monitors/); its pid. `kw`: MonitorConfig keys."""
        from ..common.configfile import dumps
        folder = self.plan.run_dir / "monitors"
        folder.mkdir(mode=0o700, exist_ok=True)
        path = folder / f"{monitor_id}.toml"
        kw.setdefault("incidents_dir", str(folder / f"incidents-{monitor_id}"))
        kw.setdefault("key_file", str(key_path(self.plan, monitor_id)))
        path.write_text(dumps(self.monitor_config(monitor_id, **kw)))
        with open(folder / f"{monitor_id}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "backdoors", "monitor", "--config",
                                     str(path)], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        # a cgroup of its own: what `cut_monitor` matches its sockets by (made before it
        # opens any: the interpreter is still starting); weighted like a machine of its
        # own, not one more node, against the nodes sharing this CPU
        try:
            cg = cgroups.Cgroup.create(self._monitor_cgroup(monitor_id))
            cg.set_cpu_weight(MONITOR_CPU_WEIGHT)
            cg.attach(proc.pid)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        self.state.monitors[monitor_id] = proc.pid
        self.state.save(self.state_path)
        return proc.pid

    def _monitor_cgroup(self, monitor_id: str) -> str:
        return f"{topology.prefix(self.name)}mon-{monitor_id}"

    def _cut_table(self, monitor_id: str, host: str | None = None) -> str:
        def safe(name: str) -> str:  # one name each ("_" + hex for the rest: never "__")
            return "".join(c if c.isalnum() else f"_{ord(c):02x}" for c in name)
        if host is None:
            return "backdoors_cut_" + safe(monitor_id)
        return f"backdoors_cuta_{safe(monitor_id)}__{safe(host)}"

    def cut_monitor(self, monitor_id: str, host: str | None = None) -> None:
        """Cut monitor `monitor_id` (of start_monitor) off from the lab's etcd: its packets
        to every etcd member are dropped (nftables, in the monitor namespace, matched by its
        cgroup); the agents it still reaches. With `host`, off from that host's agent
        instead (etcd and the other agents it still reaches). `reconnect_monitor` lifts
        it; the lab's teardown removes it with the namespace."""
        if monitor_id not in self.state.monitors:
            raise LabError(f"lab {self.name}: no monitor {monitor_id!r} of start_monitor "
                           f"(running: {sorted(self.state.monitors) or 'none'})")
        if host is None:
            daddr = topology.MONITOR_ADDR
            ports = [int(u.rsplit(":", 1)[1])
                     for u in (self.state.etcd_endpoints or [self.etcd_url])]
        else:
            daddr, ports = self.plan.host(host).address, [topology.AGENT_PORT]
        from ..net import firewall
        firewall.cut(self.plan.monitor_ns, self._cut_table(monitor_id, host),
                     cgroup=self._monitor_cgroup(monitor_id), daddr=daddr, ports=ports)

    def reconnect_monitor(self, monitor_id: str, host: str | None = None) -> None:
        """Lift `cut_monitor(monitor_id, host)` (nothing if it was not cut)."""
        from ..net import firewall
        firewall.restore(self.plan.monitor_ns, self._cut_table(monitor_id, host))

    def stop_monitor(self, monitor_id: str, sig: int = signal.SIGTERM) -> None:
        """Stop a monitor of `start_monitor` (SIGTERM: it leaves the fleet at once; SIGKILL:
        its nodes move when its lease expires) and reap it. A pid no longer in the
        monitor's cgroup is another process's now (the monitor exited) and is left alone."""
        import psutil
        pid = self.state.monitors.pop(monitor_id, None)
        self.state.save(self.state_path)
        if pid is None:
            return
        try:
            p = psutil.Process(pid)
            if self._monitor_cgroup(monitor_id) in cgroups.top_level_names(pid):
                p.send_signal(sig)  # (psutil: the same process, by its start time)
                try:
                    p.wait(15)
                except psutil.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        except psutil.NoSuchProcess:
            pass
        self.reconnect_monitor(monitor_id)
        for h in self.plan.hosts:
            self.reconnect_monitor(monitor_id, h.name)
        cgroups.Cgroup(self._monitor_cgroup(monitor_id), cgroups.detect()).destroy()

    # ---- nodes and services -----------------------------------------------------------

    def node(self, name: str) -> Node:
        """The node `name` (its cgroup and netns)."""
        if name not in self._nodes:
            n = self.plan.node(name)
            self._nodes[name] = Node.open(name, n.cgroup, netns=n.netns)
        return self._nodes[name]

    def node_run_dir(self, node: str) -> Path:
        """The node's run directory (its agent.sock, its adoption sockets): the one
        directory of /run/backdoors the node sees."""
        self.plan.node(node)
        return self.plan.run_dir / "nodes" / node

    def grow_run_dir(self, node: str, size: int) -> Path:
        """Let `node` keep up to `size` bytes in its run directory (a tmpfs charged to its
        cgroup; NODE_RUN_DIR_BYTES by default): for a node that keeps data there, such as
        the case study's database. Returns the directory."""
        if size < NODE_RUN_DIR_BYTES:
            raise LabError(f"a node's run directory holds at least {NODE_RUN_DIR_BYTES} bytes, "
                           f"asked {size}")
        path = self.node_run_dir(node)
        resize_tmpfs(path, size)
        return path

    def isolation(self, node: str) -> Isolation:
        """How `node` is isolated: its own uid range (derived from the lab name and the
        node's index, so concurrent labs rarely share one), /run/backdoors and the home
        directory hidden, the Python installation shared read-only."""
        index = [n.name for n in self.plan.nodes].index(self.plan.node(node).name)
        return Isolation(uid_base=self._uid_base(index), hide=(topology.RUN_ROOT, Path.home()),
                         share=python_paths(), hostname=node)

    def vm_uid(self, name: str) -> int:
        """The unprivileged host uid VM node `name`'s QEMU runs as: the first of the uid
        range after the container nodes' ranges."""
        index = [v.name for v in self.plan.vms].index(self.plan.vm(name).name)
        return self._uid_base(len(self.plan.nodes) + index)

    def _uid_base(self, index: int) -> int:
        # topology.MAX_NODES (128) uid ranges per lab; 350 slots keep every range below 2**32
        return uid_base_for(zlib.crc32(self.name.encode()) % 350 * topology.MAX_NODES + index)

    def container(self, node: str) -> Container:
        """The running container of `node`: the one this lab started, the one another
        process started (found by its PID 1), or a new one if it ended (a fault killed
        the node's cgroup, or the lab's owner was SIGKILLed)."""
        with self._containers_lock:
            box = self._containers.get(node)
            if box is not None and box.alive():
                return box
            if box is not None:
                box.stop(timeout=0.1)  # reap its launcher; an exiting PID 1 ends by itself
            iso, cgroup = self.isolation(node), self.node(node).cgroup
            try:
                box = Container.open(cgroup, iso)
            except NodeError:
                with open(self.plan.run_dir / node / "stderr.log", "ab") as log:
                    box = Container.start(cgroup, self.plan.node(node).netns, iso,
                                          self.node_run_dir(node), stderr=log)
            self._containers[node] = box
            return box

    def _stop_containers(self) -> None:
        with self._containers_lock:
            for box in self._containers.values():
                try:
                    box.stop()
                except NodeError:
                    pass
            self._containers.clear()

    def service_env(self, node: str) -> dict[str, str]:
        """Environment for programs started in `node`: of this process's, only what a
        program needs (NODE_ENV: the path, locale, terminal, time zone, Python's and
        backdoors' own variables), never the rest (a token of the lab's owner is not
        the node's); plus the node's agent socket and adoption directory."""
        env = {k: v for k, v in os.environ.items()
               if k in NODE_ENV or k.startswith(NODE_ENV_PREFIXES)}
        env["PYTHONUNBUFFERED"] = "1"
        sock = agent_socket(str(self.plan.run_dir / "nodes"), node)
        if os.path.exists(sock):
            env.update(service_env(sock))
        return env

    def run_in_node(self, node: str, argv: list[str], *, root: bool = False,
                    env: dict[str, str] | None = None, **popen) -> NodeProcess:
        """Start a program inside `node`'s container, as its services run (`root`: as the
        node's root); its stderr goes to the node's log unless given. `env`: variables
        added to service_env(node). `popen`: stdin, stdout, stderr, pass_fds, cwd (a path
        inside the node), new_session. The result is Popen-like; its `pid` is the
        program's host pid."""
        log = None
        if "stderr" not in popen:
            log = popen["stderr"] = open(self.plan.run_dir / node / "stderr.log", "ab")
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("stdout", subprocess.DEVNULL)
        if popen.get("cwd") is None:
            popen.pop("cwd", None)
        try:
            return self.container(node).spawn(argv, root=root,
                                              env={**self.service_env(node), **(env or {})},
                                              **popen)
        finally:
            if log is not None:  # the program has its own copy
                log.close()

    def start_service(self, node: str, *extra: str, recoverable: bool = False,
                      timeout: float = 30.0) -> ServiceInfo:
        """Start the sample service in `node` (or, `recoverable`, the stream service with
        Continuation Boxes on port RECOVERABLE_PORT) and wait until it is ready (a Python
        start on a saturated host took more than 10 s)."""
        return self.start_services([node], *extra, recoverable=recoverable, timeout=timeout)[0]

    def start_services(self, nodes: list[str], *extra: str, recoverable: bool = False,
                       timeout: float = 30.0) -> list[ServiceInfo]:
        """`start_service` in each of `nodes`, all started at once (a lab of many nodes comes
        up in one interpreter start's time, not one per node); each must be ready within
        `timeout` of the start. One that is not is killed, with those not yet ready."""
        module, name, port = (("backdoors.lab.recoverable", "rsvc", topology.RECOVERABLE_PORT)
                              if recoverable else
                              ("backdoors.lab.service", "svc", topology.SERVICE_PORT))
        started = []
        try:
            for node in nodes:
                argv = [sys.executable, "-m", module, "--name", f"{name}-{node}",
                        "--port", str(port), *extra]
                started.append((node, self.run_in_node(node, argv, stdout=subprocess.PIPE)))
            end = time.monotonic() + timeout
            out = []
            while started:
                node, proc = started[0]
                line = read_line(proc, max(0.0, end - time.monotonic()))
                if not line:
                    raise LabError(f"{module} in node {node} did not start within {timeout}s; "
                                   f"see {self.plan.run_dir / node / 'stderr.log'}")
                info = ServiceInfo(**{k: v for k, v in json.loads(line).items()
                                      if k in ("pid", "box_fd", "port")})
                started.pop(0)
                # it printed its pid inside the node; the lab speaks host pids
                info.pid, info.ns_pid = proc.pid, info.pid
                proc.stdout.close()
                self.state.services[_service_key(node, recoverable)] = info
                self.state.save(self.state_path)
                out.append(info)
            return out
        finally:
            for _node, proc in started:  # not ready: none is left half started
                proc.kill()
                proc.wait()
                proc.stdout.close()

    def service(self, node: str, *, recoverable: bool | None = None) -> ServiceInfo:
        """The sample service of `node` (recoverable=True: the stream service; None: the
        sample service if there is one, else the stream service)."""
        keys = ([_service_key(node, recoverable)] if recoverable is not None
                else [_service_key(node, False), _service_key(node, True)])
        for key in keys:
            if key in self.state.services:
                return self.state.services[key]
        raise LabError(f"no such service runs in node {node}")

    def sensors(self, node: str, reader: SensorBoxReader | None = None) -> Snapshot:
        """A snapshot of the sample service's Sensor Box, read from outside the node."""
        if reader is not None:
            return reader.snapshot()
        with self.sensor_reader(node) as r:
            return r.snapshot()

    def sensor_reader(self, node: str) -> SensorBoxReader:
        """A reader of `node`'s sample service box (through /proc/PID/fd, no agent needed)."""
        svc = self.service(node)
        try:
            fd = os.open(f"/proc/{svc.pid}/fd/{svc.box_fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise LabError(f"cannot open the Sensor Box of node {node}'s service (pid {svc.pid}): {e.strerror}") from None
        try:
            return SensorBoxReader(fd)
        finally:
            os.close(fd)

    # ---- agents -----------------------------------------------------------------------

    def data_dir(self, name: str) -> Path:
        """A directory the lab's nodes may read but not write (e.g. files a server in a
        node serves), removed with the lab: /run/bd-<lab>-<name>, mode 0755."""
        path = DATA_ROOT / f"{topology.prefix(self.name)}{name}"
        path.mkdir(mode=0o755, exist_ok=True)
        path.chmod(0o755)
        return path

    def agent_pid(self, host: str) -> int | None:
        """The pid of `host`'s agent now (its keeper, in `state.agents`, restarts it)."""
        return agent_pid(self.plan, self.plan.host(host))

    def agent_address(self, host: str) -> str:
        """"ADDR:PORT" of `host`'s agent on the private network."""
        return f"{self.plan.host(host).address}:{topology.AGENT_PORT}"

    def monitor_key(self, monitor_id: str = "m1"):
        """The signer (agent.keys.Identity) of one of the lab's monitors."""
        return self._key(monitor_id, "monitor")

    def agent_keys(self, host: str) -> tuple:
        """The public key of `host`'s agent (what checks its replies and events)."""
        return (self._key(self.plan.host(host).name, "agent").public,)

    def agent_public_key(self, host: str) -> str:
        """The "ed25519:..." text of `host`'s agent key (for a monitor config)."""
        return self._key(self.plan.host(host).name, "agent").public_text()

    def _key(self, id: str, what: str):
        if id not in self._keys:
            try:
                self._keys[id] = read_key(self.plan, id)
            except BackdoorsError as e:
                raise LabError(f"lab {self.name} has no {what} key {id!r}: {e}") from None
        return self._keys[id]

    def agent_client(self, host: str, monitor_id: str = "m1", timeout: float = 2.0):
        """An authenticated client of `host`'s agent, from the lab's monitor namespace."""
        from ..agent.client import AgentClient
        return AgentClient(self.agent_address(host), self.monitor_key(monitor_id), host,
                           self.agent_keys(host), netns=self.plan.monitor_ns, timeout=timeout)

    # ---- the client side --------------------------------------------------------------

    def client_socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket in the client namespace (on the service network)."""
        return netns.socket_in(self.plan.client_ns, family, type)

    def run_in_client(self, argv: list[str], **popen) -> subprocess.Popen:
        """Start a program (curl, a test client) in the client namespace, in the lab's
        client cgroup: killed with the lab, and reaped with it if its owner was killed
        (nothing it started lives on, holding the namespace)."""
        with netns.enter(self.plan.client_ns):
            proc = subprocess.Popen(argv, **popen)
        try:
            cgroups.Cgroup.create(f"{topology.prefix(self.name)}client").attach(proc.pid)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return proc

    # ---- status -----------------------------------------------------------------------

    def status(self) -> dict:
        """Hosts and nodes with their kernel state, for `backdoors lab status`."""
        nodes = []
        for n in self.plan.nodes:
            entry = {"node": n.name, "host": n.host, "address": n.address, "vip": n.vip}
            try:
                st = self.node(n.name).stats()
                entry.update(processes=st.pids, memory_mb=round(st.memory_bytes / 2**20, 1),
                             frozen=st.frozen, link=net.link_info(n.netns, "eth0").state)
            except Exception as e:  # noqa: BLE001 - status reports, it does not fail
                entry["error"] = str(e)
            svc = self.state.services.get(n.name)
            entry["service_pid"] = svc.pid if svc and alive(svc.pid) else None
            nodes.append(entry)
        hosts = [{"host": h.name, "address": h.address, "netns": h.netns,
                  "agent_pid": agent_pid(self.plan, h) or self.state.agents.get(h.name),
                  "keeper_pid": self.state.agents.get(h.name)} for h in self.plan.hosts]
        out = {"lab": self.name, "owner_pid": self.state.owner_pid, "hosts": hosts, "nodes": nodes}
        if self.plan.vms:
            out["vms"] = [{"node": v.name, "address": v.address, "vip": v.vip,
                           "qemu_pid": pid if (pid := self.state.vms.get(v.name)) and alive(pid) else None,
                           **self.state.vm_boots.get(v.name, {})}
                          for v in self.plan.vms]
        if self.state.etcd is not None:
            out["etcd"] = self.state.etcd
            if len(self.state.etcd_endpoints) > 1:
                out["etcd_members"] = list(self.state.etcd_endpoints)
            out["monitors"] = dict(self.state.monitors)
        if self.state.nats is not None:
            out["nats"] = self.state.nats
        return out


def _service_key(node: str, recoverable: bool) -> str:
    return f"{node}:stream" if recoverable else node


class StopSignals:
    """Records SIGINT/SIGTERM from creation on, so a lab held in the foreground can be
    torn down cleanly even when the signal arrives while it is still being built."""

    def __init__(self):
        self.received: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda s, _f: self.received.append(s))

    def wait(self) -> int:
        while not self.received:
            signal.pause()
        return self.received[0]


#: a lab monitor's CPU weight (a node's cgroup has 100, an agent's 10000)
MONITOR_CPU_WEIGHT = 1000

#: descriptors a lab process may open: its agents, servers and clients hold a few per
#: session, and the lab moves 10,000 sessions (bench recovery)
NOFILE = 1 << 20


def raise_nofile(limit: int = NOFILE) -> None:
    """Raise this process's hard RLIMIT_NOFILE to `limit` (within fs.nr_open) before the
    lab starts its processes: they inherit it (root may raise it) and raise their soft
    limit to it as they need (the keeper, the lab's servers and clients do)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            limit = min(limit, int(f.read()))
    except (OSError, ValueError):
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < limit:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, limit))
        except (OSError, ValueError):
            pass  # not allowed: the limits stay as they were

