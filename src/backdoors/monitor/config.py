"""The monitor's configuration file (TOML), decoded into a validated MonitorConfig.

    monitor_id = "m1"
    key_file = "/etc/backdoors/keys.toml"   # the agents' keys file, or one with our key
    period_ms = 50
    rulesets = ["default"]                  # packaged names or paths to TOML files
    incidents_dir = "/var/lib/backdoors/incidents"

    [[agents]]
    host = "h0"
    address = "10.99.0.1:7700"
    nodes = ["n0", "n1"]                    # leave out to discover them with nodes()

Relative paths are taken from the config file's folder. docs/monitor.md lists every key.
"""

from __future__ import annotations

import math
import os
import re
from typing import Annotated

import msgspec

from ..errors import ConfigError
from . import tomlfile
from .tomlfile import Invalid

Pos = Annotated[float, msgspec.Meta(gt=0)]
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class AgentEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One agent to poll: its host name, "ADDR:PORT", and optionally its nodes."""

    host: str
    address: str
    nodes: list[str] | None = None  # None: discover with nodes(), again every discover_s
    netns: str | None = None  # make the connection from this network namespace


class MonitorConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Everything a monitor needs; see docs/monitor.md for each key."""

    monitor_id: str
    agents: list[AgentEntry]
    key_file: str | None = None  # required to run; in-process users may pass the key
    period_ms: Pos = 50.0
    timeout_ms: Pos = 500.0  # per poll RPC; an agent slower than this is "unreachable" meanwhile
    action_timeout_ms: Pos = 3000.0  # per RPC of a repair (lock, kill, process table)
    rulesets: list[str] = msgspec.field(default_factory=lambda: ["default"])
    incidents_dir: str | None = None  # None: incidents are not written to disk
    history_s: Pos = 5.0
    discover_s: Pos = 2.0
    max_parallel_repairs: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    settle_ms: Annotated[float, msgspec.Meta(ge=0)] = 250.0
    vote_window_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # the agents' vote window
    metrics_listen: str | None = None  # "ADDR:PORT" of GET /metrics; None: not served


def _validate(c: MonitorConfig) -> None:
    if not NAME.fullmatch(c.monitor_id):
        raise Invalid(("monitor_id",), "must be 1-64 of A-Z a-z 0-9 _ . -")
    if not c.agents:
        raise Invalid(("agents",), "name at least one agent ([[agents]] host, address)")
    hosts = set()
    for i, a in enumerate(c.agents):
        if not NAME.fullmatch(a.host):
            raise Invalid(("agents", i, "host"), "must be 1-64 of A-Z a-z 0-9 _ . -")
        if a.host in hosts:
            raise Invalid(("agents", i, "host"), f"host {a.host!r} is listed twice")
        hosts.add(a.host)
        from ..agent.config import parse_address
        try:
            parse_address(a.address)
        except ValueError:
            raise Invalid(("agents", i, "address"), f"{a.address!r} is not ADDR:PORT "
                          "(like 10.99.0.1:7700)") from None
        if a.nodes is not None and len(set(a.nodes)) != len(a.nodes):
            raise Invalid(("agents", i, "nodes"), "a node is listed twice")
    if c.metrics_listen is not None:
        from ..agent.config import parse_address
        try:
            parse_address(c.metrics_listen)
        except ValueError:
            raise Invalid(("metrics_listen",), f"{c.metrics_listen!r} is not ADDR:PORT "
                          "(like 10.99.0.250:9465)") from None
    if not c.rulesets:
        raise Invalid(("rulesets",), "name at least one ruleset (\"default\")")
    if c.period_ms < 1:
        raise Invalid(("period_ms",), "must be at least 1 ms")
    for key in ("period_ms", "timeout_ms", "action_timeout_ms", "history_s"):
        if not math.isfinite(getattr(c, key)):
            raise Invalid((key,), "must be finite")


def validate(config: MonitorConfig, source: str = "monitor config") -> MonitorConfig:
    """Check a config built in code; ConfigError naming the key."""
    try:
        _validate(config)
    except Invalid as e:
        raise ConfigError(f"{source}: key {tomlfile.dotted(e.path)}: {e.message}") from None
    return config


def parse_config(text: str, source: str = "<monitor config>", base: str | None = None) -> MonitorConfig:
    """Decode and check monitor config TOML; relative paths are resolved from `base`."""
    c = tomlfile.decode(text, MonitorConfig, source)
    try:
        _validate(c)
    except Invalid as e:
        raise ConfigError(f"{tomlfile.where(source, text, e.path)}: {e.message}") from None
    return _resolve(c, base)


def decode_table(table: dict, base: str | None = None) -> MonitorConfig:
    """A MonitorConfig from an already parsed TOML table (the unified file's [monitor]);
    relative paths are resolved from `base`. Invalid names the key path at fault."""
    try:
        c = msgspec.convert(table, MonitorConfig, strict=True)
    except msgspec.ValidationError as e:
        from .tomlpos import parse_error_path
        raise Invalid(*parse_error_path(str(e))) from None
    _validate(c)
    return _resolve(c, base)


def _resolve(c: MonitorConfig, base: str | None) -> MonitorConfig:
    """Relative paths taken from `base` (the config file's folder)."""
    if base is None:
        return c

    def absolute(p: str | None) -> str | None:
        return p if p is None or os.path.isabs(p) else os.path.join(base, p)
    rulesets = [r if not (os.sep in r or r.endswith(".toml")) else absolute(r)
                for r in c.rulesets]
    return msgspec.structs.replace(c, key_file=absolute(c.key_file),
                                   incidents_dir=absolute(c.incidents_dir), rulesets=rulesets)


def load_config(path: str) -> MonitorConfig:
    """Read and check the monitor config at `path`: a plain monitor file, or the unified
    file's [monitor] section (backdoors.config)."""
    text = tomlfile.read(path, "monitor config")
    if re.search(r"(?m)^\s*\[+\s*(agent|monitor)\s*[.\]]", text):  # the unified file
        from ..config import load_monitor_config
        return load_monitor_config(path)
    return parse_config(text, path, os.path.dirname(os.path.abspath(path)))


def load_monitor_key(config: MonitorConfig) -> bytes:
    """The config's monitor key, from its key_file."""
    if config.key_file is None:
        raise ConfigError(f"monitor {config.monitor_id}: no key_file in the config (a TOML "
                          f"file with a line {config.monitor_id} = \"hex key\")")
    from ..agent.keys import load_key
    return load_key(config.key_file, config.monitor_id)
