"""The agent's configuration: a TOML file decoded into typed, validated Structs.

`load_config(path)` raises ConfigError naming the file, the key and (when it can be found)
the line. `validate(config)` applies the same checks to a config built in code. Every
field is documented with its default in docs/agent-protocol.md ("Configuration").
"""

from __future__ import annotations

import ipaddress
import math
import os
import re

import msgspec

from ..errors import ConfigError
from .keys import MONITOR_ID, decode_key, load_keys

MiB = 1 << 20
NODE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,24}")  # "kernel:<node>" must fit a 31-byte box name
HOST_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
FREEZERS = ("auto", "v1", "v2")


class NodeSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A node served by the agent: its cgroup must exist before the agent starts."""

    name: str
    cgroup: str  # relative cgroup path, as for backdoors.nodes.Node
    netns: str | None = None
    protected_comms: list[str] = []  # comm names kill/kill_tree refuse to touch
    freezer: str = "auto"  # "auto", "v1" or "v2"
    interface: str = "eth0"  # the node's interface on the service network (in its netns)
    addresses: list[str] = []  # service addresses (CIDR) that move with its sessions


class KernelSensorLimits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Thresholds of the kernel-derived sensors the agent writes for every node."""

    memory_high_pct: float = 80.0  # memory_mb max, % of the memory limit
    pids_high_pct: float = 90.0  # pids max, % of the pids limit
    forks_per_s: float = 200.0  # forks: new processes per 1 s window
    fork_failures_per_s: float = 20.0  # fork_failures: pids.events "max" per 1 s
    psi_memory_some: float = 40.0  # psi_memory_some max (avg10, %)
    psi_cpu_some: float = 80.0  # psi_cpu_some max (avg10, %)
    psi_io_some: float = 80.0  # psi_io_some max (avg10, %)
    oom_kills_per_10s: float = 0.5  # oom_kills per 10 s window: any kill violates


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Everything the agent needs; see docs/agent-protocol.md for each field."""

    host: str
    listen: str  # "ADDR:PORT" on the private network ("[v6]:PORT" for IPv6)
    run_dir: str  # <run_dir>/<node>/agent.sock are the registration sockets
    audit_log: str
    monitors: dict[str, str] | str  # monitor id -> hex key, or a keys file path
    nodes: list[NodeSpec] = []
    netns: str | None = None  # bind the listener inside this netns
    cgroup: str | None = None  # the daemon's own cgroup; default "bd-agent-<host>"
    quorum: int = 1
    vote_window_s: float = 2.0
    op_deadline_s: float = 1.0
    sample_period_s: float = 0.05
    max_regions_per_node: int = 64
    max_region_bytes: int = 16 * MiB
    max_node_bytes: int = 64 * MiB
    max_procs_sampled: int = 2048
    max_connections: int = 64
    max_sessions_per_node: int = 4096  # Continuation Boxes (and held sockets) per node
    peer_id: str | None = None  # this agent's id (a key in `monitors`) towards other agents
    peers: list[str] = []  # ids allowed to hand sessions to this agent (op adopt)
    replay_cache_entries: int = 262144
    kernel_sensors: KernelSensorLimits = KernelSensorLimits()
    metrics_listen: str | None = None  # "ADDR:PORT" of GET /metrics (in `netns`); none: off

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


def parse_address(text: str) -> tuple[str, int]:
    """("addr", port) from "ADDR:PORT" or "[V6ADDR]:PORT"; ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not ADDR:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ipaddress.ip_address(host)
    return host, int(port)


def load_config(path: str) -> AgentConfig:
    """Read, decode and validate the agent config at `path`: a plain agent file, or the
    unified file's [agent] section (backdoors.config)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read agent config {path}: {e.strerror}") from None
    text = raw.decode("utf-8", errors="replace")
    if re.search(r"(?m)^\s*\[+\s*(agent|monitor)\s*[.\]]", text):  # the unified file
        from ..config import load_agent_config
        return load_agent_config(path)
    try:
        config = msgspec.toml.decode(raw, type=AgentConfig)
    except msgspec.ValidationError as e:
        key = _error_path(str(e))
        raise ConfigError(_where(path, text, key) + f": {_strip_path(str(e))}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if isinstance(config.monitors, str) and not os.path.isabs(config.monitors):
        base = os.path.dirname(os.path.abspath(path))
        config.monitors = os.path.join(base, config.monitors)
    try:
        _validate(config)
    except _Invalid as e:
        raise ConfigError(_where(path, text, e.key) + f": {e.message}") from None
    except ConfigError as e:  # from the keys file
        raise ConfigError(f"{path}: {e}") from None
    return config


def decode_table(table: dict, base: str | None = None) -> AgentConfig:
    """An AgentConfig from an already parsed TOML table (the unified file's [agent]);
    a relative keys file is taken from `base`. KeyProblem names the key at fault."""
    try:
        config = msgspec.convert(table, AgentConfig, strict=True)
    except msgspec.ValidationError as e:
        raise KeyProblem(_error_path(str(e)), _strip_path(str(e))) from None
    if isinstance(config.monitors, str) and not os.path.isabs(config.monitors) and base:
        config.monitors = os.path.join(base, config.monitors)
    try:
        _validate(config)
    except _Invalid as e:
        raise KeyProblem(e.key, e.message) from None
    return config


class KeyProblem(ConfigError):
    """A value of the config that is wrong: `key` ("nodes[1].cgroup") and `message`."""

    def __init__(self, key: str, message: str):
        super().__init__(f"key {key}: {message}" if key else message)
        self.key, self.message = key, message


def validate(config: AgentConfig, source: str = "agent config") -> None:
    """Check the values a type cannot express; ConfigError naming the key."""
    try:
        _validate(config)
    except _Invalid as e:
        raise ConfigError(f"{source}: key {e.key}: {e.message}") from None


class _Invalid(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _Invalid(key, message)


def _validate(c: AgentConfig) -> None:
    _check(bool(HOST_NAME.fullmatch(c.host)), "host", "must be 1-32 of A-Z a-z 0-9 _ . -")
    try:
        parse_address(c.listen)
    except ValueError:
        _check(False, "listen", f"{c.listen!r} is not ADDR:PORT (like 10.0.0.1:7700)")
    if c.metrics_listen is not None:
        try:
            parse_address(c.metrics_listen)
        except ValueError:
            _check(False, "metrics_listen", f"{c.metrics_listen!r} is not ADDR:PORT (like "
                   "10.0.0.1:9464)")
        _check(c.metrics_listen != c.listen or c.listen.endswith(":0"), "metrics_listen",
               "must differ from listen")
    for key in ("run_dir", "audit_log"):
        _check(os.path.isabs(getattr(c, key)), key, "must be an absolute path")
    _check(c.netns is None or bool(c.netns) and "/" not in c.netns, "netns", "must be a name")
    _check(_relpath_ok(c.own_cgroup) and c.own_cgroup.startswith("bd"), "cgroup",
           f"{c.own_cgroup!r} must be a relative cgroup path starting with 'bd' (so that "
           "reap can remove a killed agent's leftovers)")
    _check(c.quorum >= 1, "quorum", "must be at least 1")
    for key, low, high in (("vote_window_s", 0.01, 600), ("op_deadline_s", 0.01, 60),
                           ("sample_period_s", 0.005, 10)):
        v = getattr(c, key)
        _check(math.isfinite(v) and low <= v <= high, key, f"must be within {low}..{high} s")
    for key in ("max_regions_per_node", "max_region_bytes", "max_node_bytes",
                "max_procs_sampled", "max_connections", "replay_cache_entries",
                "max_sessions_per_node"):
        _check(getattr(c, key) >= 1, key, "must be at least 1")
    _check(c.max_region_bytes <= c.max_node_bytes, "max_region_bytes",
           "must not exceed max_node_bytes")
    ks = c.kernel_sensors
    for f in ks.__struct_fields__:
        v = getattr(ks, f)
        _check(math.isfinite(v) and v > 0, f"kernel_sensors.{f}", "must be a positive number")
    _check(0 < ks.memory_high_pct <= 100 and 0 < ks.pids_high_pct <= 100,
           "kernel_sensors", "percentages must be within 0..100")
    if isinstance(c.monitors, str):
        _check(os.path.isabs(c.monitors), "monitors", "keys file path must be absolute")
        keys = load_keys(c.monitors)
    else:
        keys = {}
        for m, text in c.monitors.items():
            _check(bool(MONITOR_ID.fullmatch(m)), f"monitors.{m}", "bad monitor id")
            try:
                keys[m] = decode_key(m, text, "monitors")
            except ConfigError as e:
                raise _Invalid(f"monitors.{m}", str(e).split(": ", 1)[1]) from None
    _check(bool(keys), "monitors", "no monitor keys: no one could talk to the agent")
    _check(c.peer_id is None or c.peer_id in keys, "peer_id",
           f"{c.peer_id!r} has no key in monitors: other agents could not authenticate it")
    _check(c.quorum <= len(keys), "quorum", f"{c.quorum} exceeds the {len(keys)} monitors known")
    _validate_nodes(c)


def _validate_nodes(c: AgentConfig) -> None:
    names: set[str] = set()
    cgroups: list[str] = [c.own_cgroup.strip("/")]
    for i, n in enumerate(c.nodes):
        key = f"nodes[{i}]"
        _check(bool(NODE_NAME.fullmatch(n.name)), f"{key}.name",
               f"{n.name!r} must be 1-24 of A-Z a-z 0-9 _ . -")
        _check(n.name not in names, f"{key}.name", f"node {n.name!r} is listed twice")
        names.add(n.name)
        _check(_relpath_ok(n.cgroup), f"{key}.cgroup",
               f"{n.cgroup!r} is not a relative cgroup path")
        _check(n.freezer in FREEZERS, f"{key}.freezer", f"must be one of {', '.join(FREEZERS)}")
        _check(n.netns is None or bool(n.netns) and "/" not in n.netns, f"{key}.netns",
               "must be a netns name")
        for a, cidr in enumerate(n.addresses):
            try:
                ipaddress.ip_interface(cidr)
                ok = "/" in cidr
            except ValueError:
                ok = False
            _check(ok, f"{key}.addresses[{a}]", f"{cidr!r} is not ADDR/PREFIXLEN")
        mine = n.cgroup.strip("/")
        for j, other in enumerate(cgroups):
            nested = mine == other or mine.startswith(other + "/") or other.startswith(mine + "/")
            what = "the agent's own cgroup" if j == 0 else f"node {c.nodes[j - 1].name}'s cgroup"
            _check(not nested, f"{key}.cgroup", f"{n.cgroup!r} overlaps {what} {other!r}")
        cgroups.append(mine)


def _relpath_ok(path: str) -> bool:
    parts = path.strip("/").split("/")
    return bool(path.strip("/")) and all(p and p not in (".", "..") and not p.startswith(".")
                                         for p in parts)


# -- locating a key in the file, for error messages --------------------------------------


def _error_path(message: str) -> str:
    """"nodes[0].cgroup" from msgspec's "... - at `$.nodes[0].cgroup`" ("" for the top)."""
    m = re.search(r"at `\$\.?([^`]*)`", message)
    found = re.search(r"field `([^`]+)`", message)
    path = m.group(1) if m else ""
    if found and "unknown field" in message:
        path = f"{path}.{found.group(1)}" if path else found.group(1)
    return path


def _strip_path(message: str) -> str:
    return re.sub(r" - at `[^`]*`$", "", message)


def _where(path: str, text: str, key: str) -> str:
    line = _locate(text, key)
    return f"{path}" + (f": line {line}" if line else "") + (f": key {key}" if key else "")


def _locate(text: str, key: str) -> int | None:
    """Best-effort 1-based line of `key` ("nodes[1].cgroup", "quorum") in TOML text."""
    if not key:
        return None
    lines = text.splitlines()
    start, end = 0, len(lines)
    m = re.match(r"([A-Za-z0-9_-]+)\[(\d+)\]\.?(.*)", key)
    if m:  # an array of tables: find the n-th [[name]] header, search the key below it
        header = re.compile(rf"\s*\[\[\s*{m.group(1)}\s*\]\]")
        headers = [i for i, ln in enumerate(lines) if header.match(ln)]
        if int(m.group(2)) >= len(headers):
            return None
        start = headers[int(m.group(2))]
        key = m.group(3)
        if not key:
            return start + 1
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")),
                   len(lines))
    last = key.split(".")[-1]
    for i in range(start, end):
        if re.match(rf"\s*({re.escape(last)}\s*=|\[+\s*{re.escape(key)}\s*\]+)", lines[i]):
            return i + 1
    return None


def dump_config(config: AgentConfig) -> str:
    """The config as TOML text, as `load_config` reads it (absent optionals are left out:
    TOML has no null)."""
    import tomli_w

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return tomli_w.dumps(strip(msgspec.to_builtins(config)))
