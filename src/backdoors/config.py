"""One configuration file for a host: the agent's and the monitor's settings together.

    # /etc/backdoors/backdoors.toml
    [agent]                      # AgentConfig (docs/agent-protocol.md §2)
    host = "h0"
    listen = "10.99.0.1:7700"
    ...
    [[agent.nodes]]              # one table per node
    name = "web0"
    cgroup = "backdoors/web0"
    [agent.kernel_sensors]       # thresholds of the kernel sensors

    [monitor]                    # MonitorConfig (docs/monitor.md §2)
    monitor_id = "m1"
    ...
    [[monitor.agents]]           # one table per agent polled
    host = "h0"
    address = "10.99.0.1:7700"

Either section may be left out (a host with an agent only, or a monitor only). The
`backdoors agent --config` and `backdoors monitor --config` loaders accept this file or
their own plain one (`agent.config.load_config` and `monitor.config.load_config` hand a
file with an [agent] / [monitor] table to this module). Relative paths are taken from the
file's folder. Errors name the file, the line and the key (`agent.nodes[1].cgroup`).

`config_show(path)` renders the effective configuration: every key with its value,
defaults filled in, one comment per key (`backdoors config show`). contrib/backdoors.toml
is a complete, commented example.
"""

from __future__ import annotations

import json
import os
import re
import tomllib

import msgspec

from .agent.config import (AgentConfig, KernelSensorLimits, KeyProblem, NodeSpec,
                           decode_table as decode_agent)
from .errors import ConfigError
from .monitor.config import AgentEntry, MonitorConfig, decode_table as decode_monitor
from .monitor.tomlfile import Invalid, where

#: Where `backdoors config show` and `backdoors status` look when given no file.
DEFAULT_PATH = "/etc/backdoors/backdoors.toml"
SECTIONS = ("agent", "monitor")

# -- the key reference (one comment per key in `config show`; tests keep it complete) ---

AGENT_DOCS = {
    "host": "this host's name, 1-32 of A-Z a-z 0-9 _ . -; reported by ping",
    "listen": "ADDR:PORT of the RPC listener, on the private network only",
    "run_dir": "absolute; <run_dir>/<node>/agent.sock are the nodes' registration sockets",
    "audit_log": "absolute path of the JSONL audit log (appended; its folder must exist)",
    "monitors": "monitor id -> hex key (table), or the path of a keys file (mode 0600)",
    "nodes": "the nodes this agent serves: [[agent.nodes]] tables",
    "netns": "listen (RPC and metrics) inside this named network namespace",
    "cgroup": "the agent's own cgroup, outside every node, starting with 'bd' (unset: "
              "bd-agent-<host>)",
    "quorum": "k: distinct monitors that must ask for a destructive op",
    "vote_window_s": "seconds within which the k votes must arrive",
    "op_deadline_s": "deadline of every op, seconds; late ops are abandoned",
    "sample_period_s": "kernel sensor sampling period per node, seconds",
    "max_regions_per_node": "application regions a node may register",
    "max_region_bytes": "size of one region, bytes",
    "max_node_bytes": "total size of a node's regions, bytes",
    "max_procs_sampled": "processes read per node by the sampler and by `processes`",
    "max_connections": "concurrent RPC connections; more are closed at once",
    "max_sessions_per_node": "client sessions (Continuation Boxes) held per node",
    "peer_id": "this agent's id (a key in monitors) when it hands sessions to other agents",
    "peers": "ids allowed to hand sessions to this agent (op adopt)",
    "replay_cache_entries": "nonces remembered for replay protection",
    "kernel_sensors": "thresholds of the kernel sensors: [agent.kernel_sensors]",
    "metrics_listen": "ADDR:PORT of GET /metrics (Prometheus), in netns; unset: not served",
}
NODE_DOCS = {
    "name": "the node's name, 1-24 of A-Z a-z 0-9 _ . -",
    "cgroup": "its cgroup path relative to each hierarchy (must exist; nodes may not nest)",
    "netns": "its network namespace (must exist); unset: the host's",
    "protected_comms": "process names kill and kill_tree refuse to touch",
    "freezer": "node lock: \"auto\", \"v1\" (freezer.state) or \"v2\" (cgroup.freeze)",
    "interface": "its interface on the service network (in its netns)",
    "addresses": "service addresses (CIDR) that move with its sessions on recovery",
}
KERNEL_DOCS = {
    "memory_high_pct": "memory_mb max, % of the node's memory limit",
    "pids_high_pct": "pids max, % of the node's pids limit",
    "forks_per_s": "forks: new processes per 1 s window",
    "fork_failures_per_s": "fork_failures: forks refused by the pids limit per 1 s",
    "psi_memory_some": "psi_memory_some max (avg10, %)",
    "psi_cpu_some": "psi_cpu_some max (avg10, %)",
    "psi_io_some": "psi_io_some max (avg10, %)",
    "oom_kills_per_10s": "oom_kills per 10 s window (0.5: any kill violates)",
}
MONITOR_DOCS = {
    "monitor_id": "this monitor's id at the agents (its key's name)",
    "agents": "the agents polled: [[monitor.agents]] tables",
    "key_file": "keys file with a line <monitor_id> = \"hex key\" (mode 0600)",
    "period_ms": "poll period",
    "timeout_ms": "per poll RPC; a slower agent counts as unreachable meanwhile",
    "action_timeout_ms": "per RPC of a repair (lock, kill, process table)",
    "rulesets": "packaged names (default, heal) or paths of ruleset files",
    "incidents_dir": "folder of incidents.jsonl (unset: /var/lib/backdoors/incidents)",
    "history_s": "sensor history kept per node, seconds",
    "discover_s": "how often nodes() is asked when an agent's nodes are discovered",
    "max_parallel_repairs": "repair workers",
    "settle_ms": "after a repair, no new incident on that node for this long",
    "vote_window_s": "the agents' vote window when their quorum is above 1",
    "metrics_listen": "ADDR:PORT of GET /metrics (Prometheus); unset: not served",
}
AGENT_ENTRY_DOCS = {
    "host": "the agent's host name (as in its [agent] host)",
    "address": "ADDR:PORT of the agent on the private network",
    "nodes": "its nodes; unset: discovered with nodes() every discover_s",
    "netns": "make the connection from this network namespace",
}


# -- loading ----------------------------------------------------------------------------


def read_file(path: str) -> tuple[str, dict]:
    """(text, parsed table) of a TOML config file; ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 (byte {e.start})") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def is_unified(table: dict) -> bool:
    """True for the unified layout: an [agent] or [monitor] table at the top."""
    return any(isinstance(table.get(s), dict) for s in SECTIONS)


def _check_layout(path: str, text: str, table: dict) -> None:
    for key, value in table.items():
        if key not in SECTIONS:
            raise ConfigError(f"{where(path, text, (key,))}: unknown top-level key; the "
                              "unified file holds only [agent] and [monitor]")
        if not isinstance(value, dict):
            raise ConfigError(f"{where(path, text, (key,))}: must be a table ([{key}])")


def load_agent_config(path: str) -> AgentConfig:
    """The [agent] section of the unified file at `path`."""
    return _load_section(path, "agent")


def load_monitor_config(path: str) -> MonitorConfig:
    """The [monitor] section of the unified file at `path`."""
    return _load_section(path, "monitor")


def _load_section(path: str, section: str):
    text, table = read_file(path)
    _check_layout(path, text, table)
    if section not in table:
        raise ConfigError(f"{path} has no [{section}] section (it has: "
                          f"{', '.join(f'[{s}]' for s in table) or 'nothing'})")
    base = os.path.dirname(os.path.abspath(path))
    try:
        if section == "agent":
            return decode_agent(table["agent"], base)
        return decode_monitor(table["monitor"], base)
    except KeyProblem as e:
        raise ConfigError(f"{where(path, text, ('agent', *_key_path(e.key)))}: "
                          f"{e.message}") from None
    except Invalid as e:
        raise ConfigError(f"{where(path, text, ('monitor', *e.path))}: {e.message}") from None
    except ConfigError as e:  # the keys file named in the section
        raise ConfigError(f"{path}: [{section}]: {e}") from None


def _key_path(key: str) -> tuple[str | int, ...]:
    """("nodes", 1, "cgroup") from "nodes[1].cgroup"."""
    return tuple(int(i) if i else name
                 for name, i in re.findall(r"([^.\[\]]+)|\[(\d+)\]", key))


# -- config show ------------------------------------------------------------------------


def config_show(path: str | None = None) -> str:
    """The effective configuration as TOML in the unified layout, a comment per key.

    `path` is a unified file or a plain agent or monitor file; None: DEFAULT_PATH, or, when
    that does not exist, the defaults alone (required keys shown commented out). Keys
    given inline in [agent.monitors] are not shown.
    """
    if path is None and not os.path.exists(DEFAULT_PATH):
        return _show_defaults()
    path = path or DEFAULT_PATH
    text, table = read_file(path)
    if is_unified(table):
        _check_layout(path, text, table)
        agent = load_agent_config(path) if "agent" in table else None
        monitor = load_monitor_config(path) if "monitor" in table else None
        raw = table
    elif {"host", "listen", "run_dir"} & table.keys():
        from .agent.config import load_config
        agent, monitor, raw = load_config(path), None, {"agent": table}
    elif {"monitor_id", "agents"} & table.keys():
        from .monitor.config import load_config
        agent, monitor, raw = None, load_config(path), {"monitor": table}
    else:
        raise ConfigError(f"{path} is neither a unified config ([agent], [monitor]) nor an "
                          "agent or monitor config")
    out = [f"# backdoors: effective configuration of {os.path.abspath(path)}",
           "# (default) marks a key not set in the file; see docs/operations.md", ""]
    if agent is not None:
        out += _show_agent(agent, raw["agent"])
    if monitor is not None:
        out += _show_monitor(monitor, raw["monitor"])
    return "\n".join(out).rstrip() + "\n"


def _show_agent(c: AgentConfig, raw: dict) -> list[str]:
    effective = {"cgroup": c.own_cgroup}
    out = ["[agent]"]
    out += _fields(c, AGENT_DOCS, raw, effective, skip=("nodes", "kernel_sensors", "monitors"))
    if isinstance(c.monitors, str):
        out += _line("monitors", c.monitors, AGENT_DOCS["monitors"], "monitors" in raw)
    out.append("")
    if isinstance(c.monitors, dict):
        out += ["# monitors: their keys are secrets and not shown here; keep them in a keys",
                "# file (monitors = \"/etc/backdoors/keys.toml\") rather than inline",
                "[agent.monitors]"]
        out += [f'{_key(m)} = "<redacted: {len(k) // 2}-byte key>"'
                for m, k in c.monitors.items()]
        out.append("")
    out += ["# " + AGENT_DOCS["kernel_sensors"], "[agent.kernel_sensors]"]
    out += _fields(c.kernel_sensors, KERNEL_DOCS, raw.get("kernel_sensors", {}), {})
    out.append("")
    raw_nodes = raw.get("nodes", [])
    if not c.nodes:
        out += ["# " + AGENT_DOCS["nodes"] + ": none", ""]
    for i, n in enumerate(c.nodes):
        out += (["# " + AGENT_DOCS["nodes"]] if i == 0 else []) + ["[[agent.nodes]]"]
        out += _fields(n, NODE_DOCS, raw_nodes[i] if i < len(raw_nodes) else {}, {})
        out.append("")
    return out


def _show_monitor(c: MonitorConfig, raw: dict) -> list[str]:
    from .monitor.core import DEFAULT_INCIDENTS_DIR
    effective = {"incidents_dir": c.incidents_dir or DEFAULT_INCIDENTS_DIR}
    out = ["[monitor]"]
    out += _fields(c, MONITOR_DOCS, raw, effective, skip=("agents",))
    out.append("")
    raw_agents = raw.get("agents", [])
    for i, a in enumerate(c.agents):
        out += (["# " + MONITOR_DOCS["agents"]] if i == 0 else []) + ["[[monitor.agents]]"]
        out += _fields(a, AGENT_ENTRY_DOCS, raw_agents[i] if i < len(raw_agents) else {}, {})
        out.append("")
    return out


def _fields(obj, docs: dict[str, str], raw: dict, effective: dict, skip=()) -> list[str]:
    out = []
    for f in obj.__struct_fields__:
        if f in skip:
            continue
        value = effective.get(f, getattr(obj, f))
        out += _line(f, value, docs[f], f in raw)
    return out


def _line(key: str, value, doc: str, is_set: bool) -> list[str]:
    comment = f"# {doc}" + ("" if is_set else " (default)")
    if value is None:
        return [comment, f"# {key} = (unset)"]
    return [comment, f"{key} = {_value(msgspec.to_builtins(value))}"]


def _value(v) -> str:
    """A TOML value on one line (arrays and tables inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON escapes are TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {type(v).__name__}")


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _show_defaults() -> str:
    """Every key with its default; required keys commented out."""
    out = [f"# backdoors: no config file (looked for {DEFAULT_PATH}); these are the",
           "# defaults. Keys marked (required) must be set; see contrib/backdoors.toml.", ""]
    for header, struct, docs, skip in (
            ("[agent]", AgentConfig, AGENT_DOCS, ("nodes", "kernel_sensors")),
            ("[agent.kernel_sensors]", KernelSensorLimits, KERNEL_DOCS, ()),
            ("[[agent.nodes]]", NodeSpec, NODE_DOCS, ()),
            ("[monitor]", MonitorConfig, MONITOR_DOCS, ("agents",)),
            ("[[monitor.agents]]", AgentEntry, AGENT_ENTRY_DOCS, ())):
        repeat = header.startswith("[[")
        out.append(("# one table per entry:\n# " if repeat else "") + header)
        for f in msgspec.structs.fields(struct):
            if f.name in skip:
                continue
            prefix = "# " if repeat else ""
            if f.required:
                out += [f"{prefix}# {docs[f.name]} (required)", f"# {f.name} ="]
                continue
            value = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
            if repeat and value is not None:
                out += [f"# # {docs[f.name]}",
                        f"# {f.name} = {_value(msgspec.to_builtins(value))}"]
            else:
                out += [prefix + line for line in _line(f.name, value, docs[f.name], True)]
        out.append("")
    return "\n".join(out).rstrip() + "\n"
