"""The agent's configuration: a TOML file decoded into typed, validated Structs.

Each key is documented in its type (`doc`); docs/agent-protocol.md ("Configuration") lists
them with their defaults, checked against these classes by the tests. `load_config(path)`
reads a plain agent file; the unified file's [agent] table is backdoors.config's to
find, and `decode_table` decodes it. Errors name the file, the line and the key.
`validate(config)` applies the same checks to a config built in code.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from typing import Annotated

import msgspec

from ..common.configfile import Document, Invalid, Path, convert, doc, parse_address
from ..errors import ConfigError
from .keys import Identity, decode_publics, load_identity, load_publics, raw_public
from .listening import interface_problem

MiB = 1 << 20
NODE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,24}")  # "kernel:<node>" must fit a 31-byte box name
HOST_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
FREEZERS = ("auto", "v1", "v2")
ISOLATIONS = ("checked", "trusted")  # NodeSpec.isolation (the check: agent/isolation.py)


class VmNodeSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A VM node: its cgroup holds the QEMU that runs the guest (docs/vm-backdoor.md)."""

    guest: Annotated[str, doc(
        "the guest's name (QEMU's -name); its RAM is the memfd '<guest>-ram' QEMU holds, "
        "else the one QEMU made for its memory-backend-memfd object")]
    qmp: Annotated[str, doc(
        "QEMU's QMP socket kept for the agent (absolute path): the node lock stops and "
        "resumes the guest's vCPUs through it")]
    kernel: Annotated[str, doc(
        "the guest kernel's unpacked package (absolute path; boot/vmlinuz-VERSION inside): "
        "its symbols, structure layouts and clean bytes; empty: the lab's (make vm-kernel)")] = ""
    jiffies_deadline_s: Annotated[float, doc(
        "the guest kernel's jiffies progress deadline: a hung guest kernel stops ticking")] = 1.0
    sample_period_s: Annotated[float, doc(
        "how often the guest's kernel box is read from its RAM")] = 0.05
    min_available_mb: Annotated[float, doc(
        "the guest's available memory floor (MiB): its box's `available_mb` level violates "
        "below it, and Orion predicts it being reached")] = 32.0
    max_threads: Annotated[int, doc(
        "the guest's thread ceiling: its box's `threads` level violates above it, and Orion "
        "predicts it being reached (a fork bomb)")] = 1024
    max_running: Annotated[int, doc(
        "the guest's run queue ceiling (runnable tasks): its box's `running` level violates "
        "above it, and Orion predicts it being reached (CPU-bound runaways starving the "
        "service)")] = 32
    orion: Annotated[bool, doc(
        "predict an unstable guest from its kernel's counters (vm/orion.py): the box's "
        "`predicted_oom` / `predicted_forks` / `predicted_starvation` levels, pushed as "
        "`unstable_predicted`")] = True


class NodeSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A node served by the agent: its cgroup must exist before the agent starts."""

    name: Annotated[str, doc("the node's name, 1-24 of A-Z a-z 0-9 _ . -")]
    cgroup: Annotated[str, doc(
        "its cgroup path relative to each hierarchy (must exist; nodes may not nest)")]
    netns: Annotated[str | None, doc(
        "its network namespace (must exist); unset: the host's")] = None
    protected_comms: Annotated[list[str], doc(
        "executable names kill and kill_tree refuse to touch: a process is protected when "
        "it runs an installed (root-owned, not group/other-writable) file of that name; its "
        "comm, which it sets itself, does not count")] = []
    protected_exes: Annotated[list[str], doc(
        "executable paths kill and kill_tree refuse to touch (the same file, by device and "
        "inode, whatever the process calls itself)")] = []
    freezer: Annotated[str, doc(
        'node lock: "auto", "v1" (freezer.state) or "v2" (cgroup.freeze)')] = "auto"
    interface: Annotated[str, doc(
        "its interface on the service network (in its netns)")] = "eth0"
    addresses: Annotated[list[str], doc(
        "service addresses (CIDR) that move with its sessions on recovery")] = []
    adopt_addresses: Annotated[list[str], doc(
        "service addresses (CIDR) of other nodes that this node may take over when it "
        "adopts their sessions; adopt refuses any other")] = []
    isolation: Annotated[str, doc(
        '"checked": the agent refuses to start if the node could reach it (its processes '
        "root in the agent's PID namespace, able to write the agent's cgroup, or on the "
        'host network; see docs/operations.md, Node isolation); "trusted": not checked, '
        'for a node that runs only what you trust as much as the agent')] = "checked"
    vm: Annotated[VmNodeSpec | None, doc(
        "set for a VM node: the agent reads its guest kernel from the guest's RAM into the "
        "node's box 'guest' and locks it by stopping its vCPUs")] = None


class KernelSensorLimits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Thresholds of the kernel-derived sensors the agent writes for every node."""

    memory_high_pct: Annotated[float, doc("memory_mb max, % of the node's memory limit")] = 80.0
    pids_high_pct: Annotated[float, doc("pids max, % of the node's pids limit")] = 90.0
    forks_per_s: Annotated[float, doc("forks: new processes per 1 s window")] = 200.0
    fork_failures_per_s: Annotated[float, doc(
        "fork_failures: forks refused by the pids limit per 1 s")] = 20.0
    psi_memory_some: Annotated[float, doc("psi_memory_some max (avg10, %)")] = 40.0
    psi_cpu_some: Annotated[float, doc("psi_cpu_some max (avg10, %)")] = 80.0
    psi_io_some: Annotated[float, doc("psi_io_some max (avg10, %)")] = 80.0
    oom_kills_per_10s: Annotated[float, doc(
        "oom_kills per 10 s window (0.5: any kill violates)")] = 0.5
    psi_triggers: Annotated[tuple[str, ...], doc(
        "resources (memory, cpu, io) whose psi_*_some max is also watched by a kernel PSI "
        "trigger: stalled that share of a psi_window_s window, pushed at once, rather than "
        "once the 10 s average climbs there")] = ("memory",)
    psi_window_s: Annotated[float, doc(
        "the PSI triggers' window, 0.5..10 s; one that is not a multiple of 2 s needs "
        "CAP_SYS_RESOURCE")] = 2.0

    def memory_high(self, limit: int | None) -> int | None:
        """The memory use, in bytes, past which a node with memory limit `limit` is
        high (None: the node has no limit, so no mark)."""
        return int(limit * self.memory_high_pct / 100) if limit else None


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Everything the agent needs."""

    host: Annotated[str, doc("this host's name, 1-32 of A-Z a-z 0-9 _ . -; reported by ping")]
    listen: Annotated[str, doc(
        "ADDR:PORT ([V6ADDR]:PORT) of the RPC listener, on the private network only")]
    run_dir: Annotated[str, doc(
        "absolute; <run_dir>/<node>/agent.sock are the nodes' registration sockets")]
    audit_log: Annotated[str, doc(
        "absolute path of the JSONL audit log (appended; its folder must exist)")]
    monitors: Annotated[dict[str, str | list[str]] | str, doc(
        'monitor id -> its Ed25519 public key "ed25519:<hex>" (two during a rotation), or '
        "the path of a public keys file holding that table")]
    key_file: Annotated[str, doc(
        "this agent's private key file (id = host, mode 0600): signs its replies, its "
        "events and its requests to peer agents")]
    nodes: Annotated[list[NodeSpec], doc(
        "the nodes this agent serves: [[agent.nodes]] tables")] = []
    netns: Annotated[str | None, doc(
        "listen (RPC and metrics) inside this named network namespace")] = None
    listen_interface: Annotated[str | None, doc(
        "the private network's interface (e.g. priv0): RPC and metrics accept only "
        "connections that arrive on it (SO_BINDTODEVICE), so a node that reaches the listen "
        "address through another interface cannot connect, whatever the firewall; the "
        "listen addresses must be the interface's")] = None
    cgroup: Annotated[str | None, doc(
        "the agent's own cgroup, outside every node, starting with 'bd' "
        "(unset: bd-agent-<host>)")] = None
    quorum: Annotated[int, doc("k: distinct monitors that must ask for a destructive op")] = 1
    vote_window_s: Annotated[float, doc("seconds within which the k votes must arrive")] = 2.0
    op_deadline_s: Annotated[float, doc(
        "deadline of every op, seconds; late ops are abandoned")] = 1.0
    sample_period_s: Annotated[float, doc(
        "kernel sensor sampling period per node, seconds")] = 0.05
    watch_period_ms: Annotated[float, doc(
        "how often the agent's watcher reads every node's progress counters to push "
        "violations to subscribed monitors, ms (deaths, link changes, freezes and OOM "
        "kills come from kernel notifications); 0: no watcher")] = 5.0
    max_regions_per_node: Annotated[int, doc("application regions a node may register")] = 64
    max_region_bytes: Annotated[int, doc("size of one region, bytes")] = 16 * MiB
    max_node_bytes: Annotated[int, doc(
        "total size of a node's regions and Continuation Boxes, bytes (the default fits "
        "4096 boxes of the default size and 64 MiB of regions)")] = 384 * MiB
    max_procs_sampled: Annotated[int, doc(
        "processes read per node by the sampler and by `processes`")] = 2048
    max_connections: Annotated[int, doc(
        "concurrent RPC connections; more are refused (busy) and closed at once")] = 64
    max_unauthenticated: Annotated[int, doc(
        "of those, connections that have not yet sent an authenticated request (below "
        "max_connections: the rest is kept for monitors); the oldest gives way to a new one")] = 16
    signer_in_flight: Annotated[int, doc(
        "requests one signer may have in flight at once (more if its share of "
        "max_connections is more); the next is refused busy: at least a monitor's "
        "max_parallel_repairs + 2 (its poller and its pre-armed scanner)")] = 16
    max_unauthenticated_per_address: Annotated[int, doc(
        "unauthenticated connections from one source address; the oldest gives way")] = 8
    auth_timeout_s: Annotated[float, doc(
        "a connection without an authenticated request within this many seconds is closed")] = 2.0
    idle_timeout_s: Annotated[float, doc(
        "an authenticated connection without a request for this many seconds is closed")] = 300.0
    send_timeout_s: Annotated[float, doc(
        "a peer that takes no bytes of a reply for this many seconds is dropped")] = 5.0
    max_sessions_per_node: Annotated[int, doc(
        "client sessions (Continuation Boxes and held sockets) per node; lowered to the "
        "node's share of the agent's descriptor limit if that is less")] = 4096
    peers: Annotated[dict[str, str | list[str]], doc(
        'peer agents: host -> its public key "ed25519:<hex>"; they may call stage, adopt '
        "(with the monitors' evacuate), present and ping, never vote; the agents this one evacuates "
        "to and watches must be here")] = {}
    replay_cache_entries: Annotated[int, doc("nonces remembered for replay protection")] = 262144
    kernel_sensors: Annotated[KernelSensorLimits, doc(
        "thresholds of the kernel sensors: [agent.kernel_sensors]")] = KernelSensorLimits()
    metrics_listen: Annotated[str | None, doc(
        "ADDR:PORT of GET /metrics (Prometheus), in netns; unset: not served")] = None
    watch_peers: Annotated[dict[str, str], doc(
        "peer agents this agent checks (host = \"ADDR:PORT\", each in peers), pinging as "
        "its host; their view is the op peers")] = {}
    peer_check_ms: Annotated[float, doc(
        "how often each watched peer is pinged; silent for 3 checks: reported down")] = 100.0
    orphan_timeout_s: Annotated[float, doc(
        "seconds a held session whose server died may wait for a server to adopt it; "
        "then it is closed (FIN, or RST with unread input), never kept forever")] = 10.0
    max_evacuate_bytes: Annotated[int, doc(
        "what one evacuate dumps at most into the agent's memory (sessions' socket queues "
        "and Continuation Boxes); the sessions beyond stay held for the next evacuate")] = 512 << 20

    @property
    def own_cgroup(self) -> str:
        return self.cgroup or f"bd-agent-{self.host}"

    def listen_address(self) -> tuple[str, int]:
        return parse_address(self.listen)

    def monitor_keys(self) -> dict[str, tuple]:
        """Monitor id -> its public keys, from the inline table or the public keys file."""
        if isinstance(self.monitors, str):
            return load_publics(self.monitors)
        return decode_publics(self.monitors, "monitors")

    def peer_keys(self) -> dict[str, tuple]:
        """Peer agent id -> its public keys."""
        return decode_publics(self.peers, "peers")

    def identity(self) -> Identity:
        """This agent's signer (its private key file, mode 0600, id = host)."""
        return load_identity(self.key_file, self.host)


def load_config(path: str) -> AgentConfig:
    """Read, decode and validate the plain agent config file at `path`."""
    document = Document.read(path, "agent config")
    return document.decode(lambda table: decode_table(table, document.folder))


def decode_table(table: dict, base: str | None = None) -> AgentConfig:
    """An AgentConfig from a parsed TOML table; a relative keys file is taken from `base`.
    Invalid names the key at fault (a path within `table`)."""
    config = convert(table, AgentConfig)
    if isinstance(config.monitors, str) and not os.path.isabs(config.monitors) and base:
        config.monitors = os.path.join(base, config.monitors)
    if not os.path.isabs(config.key_file) and base:
        config.key_file = os.path.join(base, config.key_file)
    _validate(config)
    return config


def validate(config: AgentConfig, source: str = "agent config") -> None:
    """Check the values a type cannot express; ConfigError naming the key."""
    try:
        _validate(config)
    except Invalid as e:
        raise e.error(source) from None


def _check(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise Invalid(path, message)


def _validate(c: AgentConfig) -> None:
    _check(bool(HOST_NAME.fullmatch(c.host)), ("host",), "must be 1-32 of A-Z a-z 0-9 _ . -")
    try:
        parse_address(c.listen)
    except ValueError:
        _check(False, ("listen",), f"{c.listen!r} is not ADDR:PORT (like 10.0.0.1:7700; "
               "[V6ADDR]:PORT for IPv6)")
    if c.metrics_listen is not None:
        try:
            parse_address(c.metrics_listen)
        except ValueError:
            _check(False, ("metrics_listen",), f"{c.metrics_listen!r} is not ADDR:PORT (like "
                   "10.0.0.1:9464)")
        _check(c.metrics_listen != c.listen or c.listen.endswith(":0"), ("metrics_listen",),
               "must differ from listen")
    if c.listen_interface is not None:
        problem = interface_problem(c.listen_interface)
        _check(problem is None, ("listen_interface",), problem or "")
    for key in ("run_dir", "audit_log"):
        _check(os.path.isabs(getattr(c, key)), (key,), "must be an absolute path")
    _check(c.netns is None or bool(c.netns) and "/" not in c.netns, ("netns",),
           "must be a name")
    _check(_relpath_ok(c.own_cgroup) and c.own_cgroup.startswith("bd"), ("cgroup",),
           f"{c.own_cgroup!r} must be a relative cgroup path starting with 'bd' (so that "
           "reap can remove a killed agent's leftovers)")
    _check(c.quorum >= 1, ("quorum",), "must be at least 1")
    for peer, address in c.watch_peers.items():
        try:
            parse_address(address)
        except ValueError:
            _check(False, ("watch_peers", peer), f"{address!r} is not ADDR:PORT")
    for peer in c.watch_peers:
        _check(peer in c.peers, ("watch_peers", peer), f"{peer!r} is not in peers: its "
               "public key is needed to check its answers (and it needs ours)")
    _check(math.isfinite(c.peer_check_ms) and 10 <= c.peer_check_ms <= 60000,
           ("peer_check_ms",), "must be within 10..60000 ms")
    _check(math.isfinite(c.watch_period_ms) and (c.watch_period_ms == 0
                                                  or 1 <= c.watch_period_ms <= 1000),
           ("watch_period_ms",), "must be 0 (no watcher) or within 1..1000 ms")
    for key, low, high in (("vote_window_s", 0.01, 600), ("op_deadline_s", 0.01, 60),
                            ("orphan_timeout_s", 0.01, 3600), ("auth_timeout_s", 0.01, 60),
                            ("idle_timeout_s", 0.01, 86400), ("send_timeout_s", 0.01, 600),
                           ("sample_period_s", 0.005, 10)):
        v = getattr(c, key)
        _check(math.isfinite(v) and low <= v <= high, (key,),
               f"must be within {low}..{high} s")
    for key in ("max_regions_per_node", "max_region_bytes", "max_node_bytes",
                "max_procs_sampled", "max_connections", "replay_cache_entries",
                "max_sessions_per_node", "max_unauthenticated", "max_evacuate_bytes",
                "max_unauthenticated_per_address", "signer_in_flight"):
        _check(getattr(c, key) >= 1, (key,), "must be at least 1")
    _check(c.max_unauthenticated < c.max_connections, ("max_unauthenticated",),
           f"must be below max_connections ({c.max_connections}): the rest is kept for "
           "authenticated monitors")
    _check(c.max_region_bytes <= c.max_node_bytes, ("max_region_bytes",),
           "must not exceed max_node_bytes")
    ks = c.kernel_sensors
    for f in ks.__struct_fields__:
        v = getattr(ks, f)
        if f != "psi_triggers":
            _check(math.isfinite(v) and v > 0, ("kernel_sensors", f),
                   "must be a positive number")
    for r in ks.psi_triggers:
        _check(r in ("memory", "cpu", "io"), ("kernel_sensors", "psi_triggers"),
               f"{r!r} is not one of memory, cpu, io")
        _check(getattr(ks, f"psi_{r}_some", 0) < 100, ("kernel_sensors", f"psi_{r}_some"),
               "must be below 100 for a PSI trigger (psi_triggers)")
    _check(0.5 <= ks.psi_window_s <= 10, ("kernel_sensors", "psi_window_s"),
           "must be within 0.5..10 s (the kernel's range for PSI triggers)")
    _check(0 < ks.memory_high_pct <= 100 and 0 < ks.pids_high_pct <= 100,
           ("kernel_sensors",), "percentages must be within 0..100")
    _check(os.path.isabs(c.key_file), ("key_file",), "must be an absolute path")
    if isinstance(c.monitors, str):
        _check(os.path.isabs(c.monitors), ("monitors",), "public keys file path must be absolute")
        keys = load_publics(c.monitors)
    else:
        keys = _publics(c.monitors, "monitors")
    peers = _publics(c.peers, "peers")
    _check(bool(keys), ("monitors",), "no monitor keys: no one could talk to the agent")
    for p in peers:
        _check(p not in keys, ("peers", p), f"{p!r} is also a monitor: a peer agent has its "
               "own id and key, and never votes")
    _check(c.host not in keys, ("monitors", c.host), "a monitor may not have this agent's id")
    mine = {raw_public(k): m for m, ks in keys.items() for k in ks}
    for p, ks in peers.items():
        for k in ks:
            _check(raw_public(k) not in mine, ("peers", p), f"{p!r} has the public key of "
                   f"monitor {mine.get(raw_public(k))!r}: each signer needs its own keypair")
    _check_quorum(c, keys, peers)
    _validate_nodes(c)


def _check_quorum(c: AgentConfig, monitors: dict, peers: dict) -> None:
    """The quorum must be reachable by the monitors that vote (the `monitors` keys; a peer
    agent never votes): else every destructive op, every repair, would be refused."""
    if c.quorum <= len(monitors):
        return
    where = c.monitors if isinstance(c.monitors, str) else "the monitors table"
    nonvoters = f"; peers ({', '.join(sorted(peers))}) never vote" if peers else ""
    _check(False, ("quorum",),
           f"quorum = {c.quorum} needs {c.quorum} monitors that vote, and the {len(monitors)} "
           f"of monitors ({where}: {', '.join(sorted(monitors))}) cannot reach it{nonvoters}: "
           f"every repair would be refused. Add the other monitors' public keys to {where}, "
           f"or set quorum = {len(monitors)}")


def _validate_nodes(c: AgentConfig) -> None:
    names: set[str] = set()
    guests: dict[str, set[str]] = {"guest": set(), "qmp": set()}
    cgroups: list[str] = [c.own_cgroup.strip("/")]
    for i, n in enumerate(c.nodes):
        at = ("nodes", i)
        _check(bool(NODE_NAME.fullmatch(n.name)), at + ("name",),
               f"{n.name!r} must be 1-24 of A-Z a-z 0-9 _ . -")
        _check(n.name not in names, at + ("name",), f"node {n.name!r} is listed twice")
        names.add(n.name)
        _check(_relpath_ok(n.cgroup), at + ("cgroup",),
               f"{n.cgroup!r} is not a relative cgroup path (the path inside each hierarchy, "
               "like 'backdoors/web0', not under /sys/fs/cgroup)")
        _check(n.freezer in FREEZERS, at + ("freezer",),
               f"must be one of {', '.join(FREEZERS)}")
        _check(n.isolation in ISOLATIONS, at + ("isolation",),
               f"must be one of {', '.join(ISOLATIONS)}")
        _check(n.netns is None or bool(n.netns) and "/" not in n.netns, at + ("netns",),
               "must be a netns name")
        for key in ("addresses", "adopt_addresses"):
            for a, cidr in enumerate(getattr(n, key)):
                try:
                    ipaddress.ip_interface(cidr)
                    ok = "/" in cidr
                except ValueError:
                    ok = False
                _check(ok, at + (key, a), f"{cidr!r} is not ADDR/PREFIXLEN")
        if n.vm is not None:
            _check(bool(re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", n.vm.guest)), at + ("vm", "guest"),
                   f"{n.vm.guest!r} must be 1-64 of A-Z a-z 0-9 _ . -")
            _check(os.path.isabs(n.vm.qmp), at + ("vm", "qmp"), "must be an absolute path")
            _check(not n.vm.kernel or os.path.isabs(n.vm.kernel), at + ("vm", "kernel"),
                   "must be an absolute path (or empty: the lab's kernel)")
            for key, low, high in (("jiffies_deadline_s", 0.05, 600),
                                   ("sample_period_s", 0.005, 10)):
                v = getattr(n.vm, key)
                _check(math.isfinite(v) and low <= v <= high, at + ("vm", key),
                       f"must be within {low}..{high} s")
            _check(n.vm.sample_period_s < n.vm.jiffies_deadline_s, at + ("vm", "sample_period_s"),
                   "must be below jiffies_deadline_s")
            _check(math.isfinite(n.vm.min_available_mb) and n.vm.min_available_mb >= 0,
                   at + ("vm", "min_available_mb"), "must be a number of MiB >= 0")
            _check(n.vm.max_threads >= 1, at + ("vm", "max_threads"), "must be at least 1")
            _check(n.vm.max_running >= 1, at + ("vm", "max_running"), "must be at least 1")
            for key in ("guest", "qmp"):
                value = getattr(n.vm, key)
                _check(value not in guests[key], at + ("vm", key),
                       f"{value!r} is another node's too: one guest per VM node")
                guests[key].add(value)
        mine = n.cgroup.strip("/")
        for j, other in enumerate(cgroups):
            nested = mine == other or mine.startswith(other + "/") or other.startswith(mine + "/")
            what = "the agent's own cgroup" if j == 0 else f"node {c.nodes[j - 1].name}'s cgroup"
            _check(not nested, at + ("cgroup",), f"{n.cgroup!r} overlaps {what} {other!r}")
        cgroups.append(mine)


def _publics(table: dict, key: str) -> dict:
    try:
        return decode_publics(table, key)
    except ConfigError as e:
        text = str(e)
        bad = next((m for m in table if text.startswith(f"{key}: {m}: ")), None)
        raise Invalid((key, bad) if bad else (key,), text.split(": ", 2)[-1]) from None


def _relpath_ok(path: str) -> bool:
    parts = path.strip("/").split("/")
    return bool(path.strip("/")) and parts[:3] != ["sys", "fs", "cgroup"] and all(
        p and p not in (".", "..") and not p.startswith(".") for p in parts)
