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
from .keys import MONITOR_ID, decode_key, load_keys

MiB = 1 << 20
NODE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,24}")  # "kernel:<node>" must fit a 31-byte box name
HOST_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
FREEZERS = ("auto", "v1", "v2")
ISOLATIONS = ("checked", "trusted")  # NodeSpec.isolation (the check: agent/isolation.py)


class NodeSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A node served by the agent: its cgroup must exist before the agent starts."""

    name: Annotated[str, doc("the node's name, 1-24 of A-Z a-z 0-9 _ . -")]
    cgroup: Annotated[str, doc(
        "its cgroup path relative to each hierarchy (must exist; nodes may not nest)")]
    netns: Annotated[str | None, doc(
        "its network namespace (must exist); unset: the host's")] = None
    protected_comms: Annotated[list[str], doc(
        "process names kill and kill_tree refuse to touch")] = []
    freezer: Annotated[str, doc(
        'node lock: "auto", "v1" (freezer.state) or "v2" (cgroup.freeze)')] = "auto"
    interface: Annotated[str, doc(
        "its interface on the service network (in its netns)")] = "eth0"
    addresses: Annotated[list[str], doc(
        "service addresses (CIDR) that move with its sessions on recovery")] = []
    isolation: Annotated[str, doc(
        '"checked": the agent refuses to start if the node could reach it (its processes '
        "root in the agent's PID namespace, able to write the agent's cgroup, or on the "
        'host network; see docs/operations.md, Node isolation); "trusted": not checked, '
        'for a node that runs only what you trust as much as the agent')] = "checked"


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


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Everything the agent needs."""

    host: Annotated[str, doc("this host's name, 1-32 of A-Z a-z 0-9 _ . -; reported by ping")]
    listen: Annotated[str, doc(
        "ADDR:PORT ([V6ADDR]:PORT) of the RPC listener, on the private network only")]
    run_dir: Annotated[str, doc(
        "absolute; <run_dir>/<node>/agent.sock are the nodes' registration sockets")]
    audit_log: Annotated[str, doc(
        "absolute path of the JSONL audit log (appended; its folder must exist)")]
    monitors: Annotated[dict[str, str] | str, doc(
        "monitor id -> hex key (table), or the path of a keys file (mode 0600)")]
    nodes: Annotated[list[NodeSpec], doc(
        "the nodes this agent serves: [[agent.nodes]] tables")] = []
    netns: Annotated[str | None, doc(
        "listen (RPC and metrics) inside this named network namespace")] = None
    cgroup: Annotated[str | None, doc(
        "the agent's own cgroup, outside every node, starting with 'bd' "
        "(unset: bd-agent-<host>)")] = None
    quorum: Annotated[int, doc("k: distinct monitors that must ask for a destructive op")] = 1
    vote_window_s: Annotated[float, doc("seconds within which the k votes must arrive")] = 2.0
    op_deadline_s: Annotated[float, doc(
        "deadline of every op, seconds; late ops are abandoned")] = 1.0
    sample_period_s: Annotated[float, doc(
        "kernel sensor sampling period per node, seconds")] = 0.05
    max_regions_per_node: Annotated[int, doc("application regions a node may register")] = 64
    max_region_bytes: Annotated[int, doc("size of one region, bytes")] = 16 * MiB
    max_node_bytes: Annotated[int, doc("total size of a node's regions, bytes")] = 64 * MiB
    max_procs_sampled: Annotated[int, doc(
        "processes read per node by the sampler and by `processes`")] = 2048
    max_connections: Annotated[int, doc(
        "concurrent RPC connections; more are refused (busy) and closed at once")] = 64
    max_unauthenticated: Annotated[int, doc(
        "of those, connections that have not yet sent an authenticated request (below "
        "max_connections: the rest is kept for monitors); the oldest gives way to a new one")] = 16
    max_unauthenticated_per_address: Annotated[int, doc(
        "unauthenticated connections from one source address; the oldest gives way")] = 8
    auth_timeout_s: Annotated[float, doc(
        "a connection without an authenticated request within this many seconds is closed")] = 2.0
    idle_timeout_s: Annotated[float, doc(
        "an authenticated connection without a request for this many seconds is closed")] = 300.0
    send_timeout_s: Annotated[float, doc(
        "a peer that takes no bytes of a reply for this many seconds is dropped")] = 5.0
    max_sessions_per_node: Annotated[int, doc(
        "client sessions (Continuation Boxes and held sockets) per node")] = 4096
    peer_id: Annotated[str | None, doc(
        "this agent's id (a key in monitors) when it hands sessions to other agents")] = None
    peers: Annotated[list[str], doc("ids allowed to hand sessions to this agent (op adopt)")] = []
    replay_cache_entries: Annotated[int, doc("nonces remembered for replay protection")] = 262144
    kernel_sensors: Annotated[KernelSensorLimits, doc(
        "thresholds of the kernel sensors: [agent.kernel_sensors]")] = KernelSensorLimits()
    metrics_listen: Annotated[str | None, doc(
        "ADDR:PORT of GET /metrics (Prometheus), in netns; unset: not served")] = None
    watch_peers: Annotated[dict[str, str], doc(
        "peer agents this agent checks (host = \"ADDR:PORT\"), pinging as peer_id; their "
        "view is the op peers")] = {}
    peer_check_ms: Annotated[float, doc(
        "how often each watched peer is pinged; silent for 3 checks: reported down")] = 100.0
    orphan_timeout_s: Annotated[float, doc(
        "seconds a held session whose server died may wait for a server to adopt it; "
        "then it is closed (FIN, or RST with unread input), never kept forever")] = 10.0

    @property
    def own_cgroup(self) -> str:
        return self.cgroup or f"bd-agent-{self.host}"

    def listen_address(self) -> tuple[str, int]:
        return parse_address(self.listen)

    def keys(self) -> dict[str, bytes]:
        """Monitor id -> key, from the inline table or the keys file."""
        if isinstance(self.monitors, str):
            return load_keys(self.monitors)
        return {m: decode_key(m, k, "monitors") for m, k in self.monitors.items()}


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
        _check(False, ("listen",), f"{c.listen!r} is not ADDR:PORT (like 10.0.0.1:7700)")
    if c.metrics_listen is not None:
        try:
            parse_address(c.metrics_listen)
        except ValueError:
            _check(False, ("metrics_listen",), f"{c.metrics_listen!r} is not ADDR:PORT (like "
                   "10.0.0.1:9464)")
        _check(c.metrics_listen != c.listen or c.listen.endswith(":0"), ("metrics_listen",),
               "must differ from listen")
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
    _check(not c.watch_peers or bool(c.peer_id), ("watch_peers",),
           "needs peer_id (with its key in monitors): the agent pings its peers as that id")
    _check(math.isfinite(c.peer_check_ms) and 10 <= c.peer_check_ms <= 60000,
           ("peer_check_ms",), "must be within 10..60000 ms")
    for key, low, high in (("vote_window_s", 0.01, 600), ("op_deadline_s", 0.01, 60),
                            ("orphan_timeout_s", 0.01, 3600), ("auth_timeout_s", 0.01, 60),
                            ("idle_timeout_s", 0.01, 86400), ("send_timeout_s", 0.01, 600),
                           ("sample_period_s", 0.005, 10)):
        v = getattr(c, key)
        _check(math.isfinite(v) and low <= v <= high, (key,),
               f"must be within {low}..{high} s")
    for key in ("max_regions_per_node", "max_region_bytes", "max_node_bytes",
                "max_procs_sampled", "max_connections", "replay_cache_entries",
                "max_sessions_per_node", "max_unauthenticated",
                "max_unauthenticated_per_address"):
        _check(getattr(c, key) >= 1, (key,), "must be at least 1")
    _check(c.max_unauthenticated < c.max_connections, ("max_unauthenticated",),
           f"must be below max_connections ({c.max_connections}): the rest is kept for "
           "authenticated monitors")
    _check(c.max_region_bytes <= c.max_node_bytes, ("max_region_bytes",),
           "must not exceed max_node_bytes")
    ks = c.kernel_sensors
    for f in ks.__struct_fields__:
        v = getattr(ks, f)
        _check(math.isfinite(v) and v > 0, ("kernel_sensors", f),
               "must be a positive number")
    _check(0 < ks.memory_high_pct <= 100 and 0 < ks.pids_high_pct <= 100,
           ("kernel_sensors",), "percentages must be within 0..100")
    if isinstance(c.monitors, str):
        _check(os.path.isabs(c.monitors), ("monitors",), "keys file path must be absolute")
        keys = load_keys(c.monitors)
    else:
        keys = {}
        for m, text in c.monitors.items():
            _check(bool(MONITOR_ID.fullmatch(m)), ("monitors", m), "bad monitor id")
            try:
                keys[m] = decode_key(m, text, "monitors")
            except ConfigError as e:
                raise Invalid(("monitors", m), str(e).split(": ", 1)[1]) from None
    _check(bool(keys), ("monitors",), "no monitor keys: no one could talk to the agent")
    _check(c.peer_id is None or c.peer_id in keys, ("peer_id",),
           f"{c.peer_id!r} has no key in monitors: other agents could not authenticate it")
    _check(c.quorum <= len(keys), ("quorum",),
           f"{c.quorum} exceeds the {len(keys)} monitors known")
    _validate_nodes(c)


def _validate_nodes(c: AgentConfig) -> None:
    names: set[str] = set()
    cgroups: list[str] = [c.own_cgroup.strip("/")]
    for i, n in enumerate(c.nodes):
        at = ("nodes", i)
        _check(bool(NODE_NAME.fullmatch(n.name)), at + ("name",),
               f"{n.name!r} must be 1-24 of A-Z a-z 0-9 _ . -")
        _check(n.name not in names, at + ("name",), f"node {n.name!r} is listed twice")
        names.add(n.name)
        _check(_relpath_ok(n.cgroup), at + ("cgroup",),
               f"{n.cgroup!r} is not a relative cgroup path")
        _check(n.freezer in FREEZERS, at + ("freezer",),
               f"must be one of {', '.join(FREEZERS)}")
        _check(n.isolation in ISOLATIONS, at + ("isolation",),
               f"must be one of {', '.join(ISOLATIONS)}")
        _check(n.netns is None or bool(n.netns) and "/" not in n.netns, at + ("netns",),
               "must be a netns name")
        for a, cidr in enumerate(n.addresses):
            try:
                ipaddress.ip_interface(cidr)
                ok = "/" in cidr
            except ValueError:
                ok = False
            _check(ok, at + ("addresses", a), f"{cidr!r} is not ADDR/PREFIXLEN")
        mine = n.cgroup.strip("/")
        for j, other in enumerate(cgroups):
            nested = mine == other or mine.startswith(other + "/") or other.startswith(mine + "/")
            what = "the agent's own cgroup" if j == 0 else f"node {c.nodes[j - 1].name}'s cgroup"
            _check(not nested, at + ("cgroup",), f"{n.cgroup!r} overlaps {what} {other!r}")
        cgroups.append(mine)


def _relpath_ok(path: str) -> bool:
    parts = path.strip("/").split("/")
    return bool(path.strip("/")) and all(p and p not in (".", "..") and not p.startswith(".")
                                         for p in parts)
