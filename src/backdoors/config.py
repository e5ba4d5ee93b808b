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

Either section may be left out (a host with an agent only, or a monitor only). This module
alone knows that layout: `load_agent_config` and `load_monitor_config` (what `backdoors
agent --config` and `backdoors monitor --config` use) accept this file or a daemon's own
plain one, and hand the table to `agent.config` or `monitor.config` to decode. Relative
paths are taken from the file's folder. Errors name the file, the line and the key
(`agent.nodes[1].cgroup`).

`config_show(path)` renders the effective configuration: every key with its value,
defaults filled in, one comment per key, the description in the key's type
(`backdoors config show`). contrib/backdoors.toml is a complete, commented example.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, TypeVar

import msgspec

from .agent.config import AgentConfig, KernelSensorLimits, NodeSpec
from .agent.config import decode_table as decode_agent
from .common.configfile import Document, descriptions
from .errors import ConfigError
from .fleet.bus import without_password
from .monitor.config import AgentEntry, MonitorConfig, load_monitor_key
from .monitor.config import decode_table as decode_monitor
from .monitor.config import validate as validate_monitor
from .monitor.rules import load_rulesets

T = TypeVar("T")

#: Where `backdoors config show` and `backdoors status` look when given no file.
DEFAULT_PATH = "/etc/backdoors/backdoors.toml"
SECTIONS = ("agent", "monitor")


# -- loading ----------------------------------------------------------------------------


def load_agent_config(path: str) -> AgentConfig:
    """The agent's config at `path`: the [agent] section of the unified file, or a plain
    agent file."""
    return _load(path, "agent", decode_agent)


def load_monitor_config(path: str) -> MonitorConfig:
    """The monitor's config at `path`: the [monitor] section of the unified file, or a
    plain monitor file."""
    return _load(path, "monitor", decode_monitor)


def monitor_config(path: str, etcd: list[str] | None = None) -> MonitorConfig:
    """The monitor's config at `path`, with `etcd` (the CLI's --etcd) in place of its own."""
    config = load_monitor_config(path)
    if etcd:
        config = validate_monitor(msgspec.structs.replace(config, etcd=list(etcd)), "--etcd")
    return config


def is_unified(table: dict) -> bool:
    """True for the unified layout: an [agent] or [monitor] table at the top."""
    return any(isinstance(table.get(s), dict) for s in SECTIONS)


#: keys only one daemon's own (not unified) file has: a file of the other kind is named so
_ONLY = {"agent": ("host", "nodes"), "monitor": ("agents", "rulesets")}
_A = {"agent": "an", "monitor": "a"}


def _load(path: str, section: str, decode: Callable[[dict, str], T]) -> T:
    document = Document.read(path, f"{section} config")
    if not is_unified(document.table):
        other = "monitor" if section == "agent" else "agent"
        if any(k in document.table for k in _ONLY[other]) and \
                not any(k in document.table for k in _ONLY[section]):
            raise ConfigError(f"{document.source}: this is {_A[other]} {other}'s config (it has "
                              f"{' and '.join(k for k in _ONLY[other] if k in document.table)}),"
                              f" not the {section}'s: give the {section} its own file, or "
                              f"one unified file with an [agent] and a [monitor] section")
        return document.decode(lambda table: decode(table, document.folder))
    return _section(document, section, decode)


def _section(document: Document, section: str, decode: Callable[[dict, str], T]) -> T:
    """The [section] of a unified file, decoded."""
    table = document.table
    for key, value in table.items():
        if key not in SECTIONS:
            raise ConfigError(f"{document.where((key,))}: unknown top-level key; the "
                              "unified file holds only [agent] and [monitor]")
        if not isinstance(value, dict):
            raise ConfigError(f"{document.where((key,))}: must be a table ([{key}])")
    if section not in table:
        raise ConfigError(f"{document.source} has no [{section}] section (it has: "
                          f"{', '.join(f'[{s}]' for s in table) or 'nothing'})")
    return document.decode(lambda part: decode(part, document.folder), at=(section,))


# -- monitor --check --------------------------------------------------------------------


def check_monitor(path: str, etcd: list[str] | None = None,
                  ) -> tuple[MonitorConfig, list, list[str]]:
    """What `backdoors monitor --check` checks: (the monitor's config, its rules,
    warnings). A ConfigError for anything the monitor would refuse (started by the CLI:
    no in-process hooks; `etcd` overriding the config's, as --etcd does), and, in a
    unified file with an [agent] section, for an agent config its agent would refuse (the
    agents' quorum is set there, and a quorum its monitors cannot reach refuses every
    repair). Warnings: what loads but cannot work as meant (a ruleset that recovers
    sessions to another node, and no other node to recover to)."""
    from .monitor.core import check_agent_keys, check_hooks
    config = monitor_config(path, etcd)
    rules = load_rulesets(config.rulesets)
    check_hooks(rules, {})
    check_agent_keys(config)
    if isinstance(Document.read(path, "monitor config").table.get("agent"), dict):
        load_agent_config(path)  # the unified file's [agent]
    from .monitor.core import DEFAULT_INCIDENTS_DIR
    load_monitor_key(config)  # as the monitor loads it: its mode, its id
    if config.etcd:
        from .monitor.config import etcd_client
        etcd_client(config).close()  # its password and TLS files, as the monitor reads them
    incidents = config.incidents_dir or DEFAULT_INCIDENTS_DIR
    if os.path.exists(incidents) and not os.path.isdir(incidents):
        raise ConfigError(f"{path}: incidents_dir {incidents} is not a directory")
    if not os.path.exists(incidents):
        _can_make(path, incidents)
    return config, rules, _recovery_warnings(config, rules)


def _can_make(path: str, folder: str) -> None:
    """ConfigError unless `folder` (missing) can be made, as the monitor makes it at
    start: tried, then what was made is removed (a check leaves nothing)."""
    made, at = [], os.path.abspath(folder)
    while not os.path.exists(at):
        made.append(at)
        at = os.path.dirname(at)
    try:
        os.makedirs(folder)
    except OSError as e:
        raise ConfigError(f"{path}: incidents_dir {folder} cannot be made: "
                          f"{e.strerror or e}") from None
    finally:
        for d in made:  # the deepest first
            try:
                os.rmdir(d)
            except OSError:
                pass


def _recovery_warnings(config: MonitorConfig, rules: list) -> list[str]:
    recovering = [r.name for r in rules
                  if any(a.kind_name() == "recover" for a in r.actions)]
    if not recovering or any(e.nodes is None for e in config.agents):
        return []  # nothing moves sessions, or nodes are discovered: not known here
    nodes = [f"{n} on {e.host}" for e in config.agents for n in e.nodes or ()]
    if len(nodes) >= 2:
        return []
    who = (f"rule {recovering[0]} recovers" if len(recovering) == 1 else
           f"rules {', '.join(recovering)} recover")
    listed = f"one node ({nodes[0]})" if nodes else "no node"
    return [f"{who} sessions to another node, and this config lists "
            f"{listed}: a failed node would be fenced with nowhere to move its sessions. "
            "Add a second node (another agent's, or leave nodes out to discover them), or "
            "use the default ruleset"]


# -- config show ------------------------------------------------------------------------


def config_show(path: str | None = None) -> str:
    """The effective configuration as TOML in the unified layout, a comment per key.

    `path` is a unified file or a plain agent or monitor file; None: DEFAULT_PATH, or, when
    that does not exist, the defaults alone (required keys shown commented out). Keys
    given inline in [agent.monitors] are public keys, shown as they are.
    """
    if path is None and not os.path.exists(DEFAULT_PATH):
        return _show_defaults()
    path = path or DEFAULT_PATH
    document = Document.read(path)
    table: dict[str, Any] = document.table
    if is_unified(table):
        agent = _section(document, "agent", decode_agent) if "agent" in table else None
        monitor = _section(document, "monitor", decode_monitor) if "monitor" in table else None
        raw = table
    elif {"host", "listen", "run_dir"} & table.keys():
        agent = document.decode(lambda t: decode_agent(t, document.folder))
        monitor, raw = None, {"agent": table}
    elif {"monitor_id", "agents"} & table.keys():
        monitor = document.decode(lambda t: decode_monitor(t, document.folder))
        agent, raw = None, {"monitor": table}
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
    docs = descriptions(AgentConfig)
    effective = {"cgroup": c.own_cgroup}
    out = ["[agent]"]
    out += _fields(c, raw, effective, skip=("nodes", "kernel_sensors", "monitors"))
    if isinstance(c.monitors, str):
        out += _line("monitors", c.monitors, docs["monitors"], "monitors" in raw)
    out.append("")
    if isinstance(c.monitors, dict):
        out += ["# " + docs["monitors"], "[agent.monitors]"]
        out += [f"{_key(m)} = {_value(k)}" for m, k in c.monitors.items()]
        out.append("")
    out += ["# " + docs["kernel_sensors"], "[agent.kernel_sensors]"]
    out += _fields(c.kernel_sensors, raw.get("kernel_sensors", {}), {})
    out.append("")
    raw_nodes = raw.get("nodes", [])
    if not c.nodes:
        out += ["# " + docs["nodes"] + ": none", ""]
    for i, n in enumerate(c.nodes):
        out += (["# " + docs["nodes"]] if i == 0 else []) + ["[[agent.nodes]]"]
        out += _fields(n, raw_nodes[i] if i < len(raw_nodes) else {}, {})
        out.append("")
    return out


def _show_monitor(c: MonitorConfig, raw: dict) -> list[str]:
    from .monitor.core import DEFAULT_INCIDENTS_DIR
    docs = descriptions(MonitorConfig)
    effective = {"incidents_dir": c.incidents_dir or DEFAULT_INCIDENTS_DIR}
    out = ["[monitor]"]
    out += _fields(c, raw, effective, skip=("agents",))
    out.append("")
    raw_agents = raw.get("agents", [])
    for i, a in enumerate(c.agents):
        out += (["# " + docs["agents"]] if i == 0 else []) + ["[[monitor.agents]]"]
        out += _fields(a, raw_agents[i] if i < len(raw_agents) else {}, {})
        out.append("")
    return out


def _fields(obj, raw: dict, effective: dict, skip=()) -> list[str]:
    docs = descriptions(type(obj))
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
    if isinstance(v, str):  # (a password in a URL shown as ***: this output is pasted)
        return json.dumps(without_password(v))  # JSON escapes are TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):  # (TOML has no null: an unset member is left out)
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()
                                if x is not None) + " }"
    raise TypeError(f"no TOML for {type(v).__name__}")


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _show_defaults() -> str:
    """Every key with its default; required keys commented out."""
    out = [f"# backdoors: no config file (looked for {DEFAULT_PATH}); these are the",
           "# defaults. Keys marked (required) must be set; see contrib/backdoors.toml.", ""]
    for header, struct, skip in (
            ("[agent]", AgentConfig, ("nodes", "kernel_sensors")),
            ("[agent.kernel_sensors]", KernelSensorLimits, ()),
            ("[[agent.nodes]]", NodeSpec, ()),
            ("[monitor]", MonitorConfig, ("agents",)),
            ("[[monitor.agents]]", AgentEntry, ())):
        docs = descriptions(struct)
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
