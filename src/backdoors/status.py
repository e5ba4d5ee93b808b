"""`backdoors status`: every host and node in one table, asked of the agents themselves.

    rows = status_table(lab="demo")                         # a running lab's agents
    rows = status_table(monitor_config="/etc/backdoors/backdoors.toml")
    render_status(rows)

Each row is one node (JSON-friendly dict): its host, its state, its worst sensor, the
Sensor Boxes the agent reads of it (`boxes`: the services' registered ones and the agent's
own "kernel") and its open incidents. The state, worst first:

- `unreachable`: its agent did not answer (the error says why);
- `fenced`: frozen and cut off the network after a recovery, until an operator acts;
- `locked`: frozen by a monitor for a repair (a lease);
- `suspect`: a sensor beyond its bound, the cgroup frozen with no lock holder, a box the
  agent cannot read, or an open incident;
- `recovered`: healthy, and holding client sessions moved here from a failed node;
- `ok`.

The worst sensor is a violated one if any, else the one closest to its bound. Stalls and
rates are the agent's own tracking (agent/tracking.py: how long since each progress
counter last changed, each pressure counter's events in its window, kept as it samples),
judged by `backdoors.sensors.judgement` as the monitor's detectors judge them: one
reading, and a service hung longer than its deadline shows as stalled on every run.
Open incidents are those of the monitor's incident log with no "closed" event.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .agent.errors import RemoteError
from .common.text import cell, printable
from .errors import BackdoorsError, ConfigError, SensorBoxError
from .sensors import SensorType, out_of_bounds, over_rate, parse_box, stalled


@dataclass
class AgentSource:
    """One agent to ask: how to reach it, and the nodes we expect it to serve."""

    host: str
    address: str
    connect: Callable[[], Any]  # -> an AgentClient
    nodes: list[str] | None = None


def status_table(*, lab: str | None = None, monitor_config: str | None = None,
                 incidents: str | None = None, timeout: float = 2.0) -> list[dict]:
    """One row per node of every agent of `lab` or of the monitor config's agents.

    With neither, the unified config at backdoors.config.DEFAULT_PATH is used if it exists,
    else the one running lab. `incidents` is an incident log (file or folder); by default
    the monitor config's incidents_dir, or the lab's <run_dir>/incidents, when they exist.
    """
    sources, default_incidents = _sources(lab, monitor_config, timeout)
    log = incidents if incidents is not None else default_incidents
    open_incidents = _open_incidents(log) if log is not None else {}
    with ThreadPoolExecutor(min(16, len(sources)) or 1, thread_name_prefix="bd-status") as pool:
        per_agent = list(pool.map(_agent_rows, sources))
    rows = [row for rows in per_agent for row in rows]
    seen = {(r["host"], r["node"]) for r in rows}
    for (host, node), incs in sorted(open_incidents.items()):
        if (host, node) not in seen:  # e.g. "@h0": an agent silent before its nodes were known
            rows.append(_row(host, "", node, reachable=None, state="suspect",
                             error="not served by the agent now; open incidents only"))
    for r in rows:
        r["incidents"] = [{"id": i.id, "rule": i.rule, "detected": i.detected,
                           "state": i.state}
                          for i in open_incidents.get((r["host"], r["node"]), [])]
        if r["incidents"] and r["state"] in ("ok", "recovered"):
            r["state"] = "suspect"
    return rows


# -- sources ----------------------------------------------------------------------------


def _sources(lab: str | None, monitor_config: str | None,
             timeout: float) -> tuple[list[AgentSource], str | None]:
    lab, monitor_config = _resolve(lab, monitor_config)
    if lab is not None:
        return _lab_sources(lab, timeout)
    return _config_sources(monitor_config, timeout)


def _resolve(lab: str | None, monitor_config: str | None) -> tuple[str | None, str | None]:
    """The lab or the monitor config that status reads: the one given, else the unified
    config at its default path, else the one running lab."""
    if lab is not None and monitor_config is not None:
        raise ConfigError("give a lab (--lab) or a monitor config (--config), not both")
    if lab is None and monitor_config is None:
        from .config import DEFAULT_PATH
        from .lab import running_labs
        if os.path.exists(DEFAULT_PATH):
            monitor_config = DEFAULT_PATH
        else:
            labs = running_labs()
            if len(labs) != 1:
                raise ConfigError(
                    f"no config at {DEFAULT_PATH} and "
                    + (f"{len(labs)} labs are running ({', '.join(labs)})" if labs else
                       "no lab is running") + ": name a lab or a monitor config file")
            lab = labs[0]
    return lab, monitor_config


def _lab_sources(name: str, timeout: float) -> tuple[list[AgentSource], str | None]:
    from .errors import require_root
    from .lab import Lab

    require_root(f"reading the status of lab {name}", "its agents sit in network namespaces")
    lab = Lab.attach(name)
    if not lab.state.agents:
        raise ConfigError(f"lab {name} runs no agents (it was built with --no-agents)")
    sources = [AgentSource(h.name, lab.agent_address(h.name),
                           lambda h=h: lab.agent_client(h.name, timeout=timeout),
                           [n.name for n in lab.plan.nodes if n.host == h.name])
               for h in lab.plan.hosts]
    log = lab.plan.run_dir / "incidents"
    return sources, str(log) if log.exists() else None


def _config_sources(path: str, timeout: float) -> tuple[list[AgentSource], str | None]:
    from .agent.client import AgentClient
    from .config import load_monitor_config
    from .monitor.config import agent_keys, load_monitor_key
    from .monitor.core import DEFAULT_INCIDENTS_DIR

    config = load_monitor_config(path)
    key = load_monitor_key(config)
    sources = [AgentSource(e.host, e.address,
                           lambda e=e: AgentClient(e.address, key, e.host, agent_keys(e),
                                                   netns=e.netns, timeout=timeout),
                           list(e.nodes) if e.nodes is not None else None)
               for e in config.agents]
    log = config.incidents_dir or DEFAULT_INCIDENTS_DIR
    return sources, log if Path(log).exists() else None


def _open_incidents(path: str) -> dict[tuple[str, str], list]:
    from .monitor.incidents import load_incidents

    out: dict[tuple[str, str], list] = {}
    for inc in load_incidents(path):
        if inc.closed is None:
            out.setdefault((inc.host, inc.node), []).append(inc)
    return out


# -- asking one agent -------------------------------------------------------------------


def fleet_status(*, lab: str | None = None, monitor_config: str | None = None
                 ) -> dict | None:
    """The fleet of monitors as etcd holds it (fleet.member.read_fleet, plus each member's
    share), for a lab that runs etcd or a monitor config naming one; None without etcd.
    An unreachable etcd gives {"error": ...}."""
    from contextlib import nullcontext

    from .fleet import EtcdClient, EtcdError
    from .fleet.member import PREFIX, read_fleet
    lab, monitor_config = _resolve(lab, monitor_config)
    config = None
    if lab is not None:
        from .lab import Lab
        from .net.netns import enter
        attached = Lab.attach(lab)
        if attached.state.etcd is None:
            return None
        urls, prefix = attached.state.etcd_endpoints or [attached.state.etcd], PREFIX
        within = enter(attached.plan.monitor_ns)
    else:
        from .config import load_monitor_config
        from .monitor.config import etcd_client
        from .net.netns import enter
        config = load_monitor_config(monitor_config)
        if not config.etcd:
            return None
        urls, prefix = config.etcd, config.fleet_prefix
        within = enter(config.etcd_netns) if config.etcd_netns else nullcontext()
    try:
        with within, (EtcdClient(urls) if config is None else etcd_client(config)) as client:
            fleet = read_fleet(client, prefix)
    except (EtcdError, ConfigError) as e:
        return {"error": str(e)}
    shares: dict[str, int] = {}
    for member, _ in fleet["owners"].values():
        shares[member] = shares.get(member, 0) + 1
    for m, info in fleet["members"].items():
        info["nodes"] = shares.get(m, 0)
    return fleet


def _reaches(hosts) -> str:
    """A member's reached agents, as its record says ("every host": it does not say)."""
    if not isinstance(hosts, list):
        return "every host"
    text = ", ".join(map(str, hosts)) or "none"
    return text if len(text) <= 60 else text[:57] + "..."


def render_fleet(fleet: dict, console=None) -> None:
    """The fleet's members, their shares and leases, as one rich table."""
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    if "error" in fleet:
        console.print(cell(f"fleet: {fleet['error']}", "red"))
        return
    t = Table(title=f"fleet (etcd revision {fleet['revision']})")
    for col in ("monitor", "nodes", "reaches", "lease", "ttl", "left"):
        t.add_column(col)
    for m, info in sorted(fleet["members"].items()):
        left, ttl = info.get("lease_left_s"), info.get("lease_ttl_s")
        t.add_row(cell(m), str(info.get("nodes", 0)), cell(_reaches(info.get("reaches"))),
                  f"{info.get('lease', 0):x}",
                  "-" if ttl is None else f"{ttl} s", "-" if left is None else f"{left} s")
    orphans = sum(1 for o, _ in fleet["owners"].values() if o not in fleet["members"])
    console.print(t)
    if not fleet["members"]:
        console.print("no live monitor in the fleet")
    elif orphans:
        console.print(f"{orphans} node(s) owned by monitors no longer live")
    for node, r in sorted(fleet.get("incidents", {}).items()):
        owner = (fleet["owners"].get(node) or ["nobody"])[0]
        console.print(cell(f"open incident on {node}: {r.get('incident', '?')}, rule "
                           f"{r.get('rule', '?')}, {r.get('state', '?')}, recorded by "
                           f"{r.get('monitor', '?')}; the node's owner: {owner}"))


def _row(host: str, address: str, node: str, **fields) -> dict:
    row = {"host": host, "address": address, "node": node, "state": "ok", "reachable": True,
           "error": None, "frozen": None, "locked_by": [], "fenced": False, "sessions": None,
           "adopted_sessions": None, "violations": 0, "worst": None, "boxes": [],
           "box_errors": {}, "owner": None, "token": None}
    row.update(fields)
    return row


def _agent_rows(src: AgentSource) -> list[dict]:
    try:
        with src.connect() as client:
            rows = []
            for name, info in sorted({i.name: i for i in client.nodes()}.items()):
                read = _node_read(client, name)
                if isinstance(read, RemoteError):
                    rows.append(_row(src.host, src.address, name, state="suspect",
                                     frozen=info.frozen, locked_by=list(info.locked_by),
                                     fenced=info.fenced, error=f"{read.code}: {read}"))
                    continue
                rows.append(_node_row(src, info, *read))
            served = {r["node"] for r in rows}
            missing = [n for n in src.nodes or () if n not in served]
            rows += [_row(src.host, src.address, n, state="suspect",
                          error=f"listed for agent {src.host}, which does not serve it")
                     for n in missing]
            if not rows:
                rows.append(_row(src.host, src.address, "-", state="suspect",
                                 error=f"agent {src.host} serves no node"))
            return rows
    except (BackdoorsError, OSError) as e:  # transport, auth, a missing netns
        return [_row(src.host, src.address, n, reachable=False, state="unreachable",
                     error=str(e)) for n in (src.nodes or ["?"])]


def _node_read(client, node: str):
    """(the sensors reply, sessions) of one node, or the agent's RemoteError about it
    (transport errors propagate: the agent itself is unreachable)."""
    try:
        reply = client.sensors(node)
        try:
            sessions = client.call("sessions", node=node)
        except RemoteError as e:
            if e.code != "unknown_op":  # an agent without session recovery holds none
                raise
            sessions = []
        return reply, sessions
    except RemoteError as e:
        if e.code == "auth":
            raise
        return e


def _node_row(src: AgentSource, info, reply, sessions: list) -> dict:
    errors, judged = dict(reply.errors), []
    if getattr(info, "sample_error", None):  # its values are the last sample's, stale
        errors["kernel"] = (f"not sampled for {info.sample_age_s or 0:.0f} s: "
                            f"{info.sample_error}")
    for box, data in sorted(reply.boxes.items()):
        try:
            image = parse_box(data)
        except SensorBoxError as e:
            errors[box] = str(e)
            continue
        tracked = {**reply.progress_unchanged_s.get(box, {}),
                   **reply.pressure_events.get(box, {})}
        judged += [judge(box, s, tracked.get(s.name)) for s in image.sensors]
    violated = [j for j in judged if j["violated"]]
    adopted = sum(bool(s.get("adopted")) for s in sessions)
    row = _row(src.host, src.address, info.name, frozen=info.frozen,
               locked_by=list(info.locked_by), fenced=info.fenced, sessions=len(sessions),
               adopted_sessions=adopted, violations=len(violated), box_errors=errors,
               boxes=sorted(reply.boxes),
               worst=max(judged, key=lambda j: (j["violated"], j["ratio"]), default=None),
               owner=getattr(info, "owner", None), token=getattr(info, "token", None))
    if info.fenced:
        row["state"] = "fenced"
    elif info.locked_by:
        row["state"] = "locked"
    elif violated or info.frozen or errors:
        row["state"] = "suspect"
    elif adopted:
        row["state"] = "recovered"
    return row


def judge(box: str, s, tracked: float | None) -> dict:
    """How close sensor `s` is to its bound, given what the agent tracked of it.

    `tracked` is, for a progress sensor, the seconds since its counter last changed; for
    a pressure sensor, its events in its window (None: not tracked, taken as 0). `ratio`
    is measure / bound: at least 1 when violated. Whether that is a violation is the
    judgement of `backdoors.sensors.judgement`, the monitor's detectors' too.
    """
    out = {"box": box, "sensor": s.name, "type": s.type.value, "value": float(s.value)}
    if s.type is SensorType.LEVEL:
        v, lo, hi = s.value, s.min, s.max
        ratios = []
        if hi is not None:
            ratios.append(v / hi if hi > 0 else (math.inf if v > hi else 0.0))
        flag = hi is None and lo is not None and 0 < lo < 1 and v in (0.0, 1.0)  # link_up
        if lo is not None and lo > 0 and not flag:  # a 0/1 flag is up or down: no closeness
            ratios.append(lo / v if v > 0 else math.inf)
        bad = out_of_bounds(v, lo, hi) is not None
        if lo is not None and (v < lo or hi is None):
            out.update(bound=lo, bound_kind="min")
        else:
            out.update(bound=hi, bound_kind="max")
        ratio = max(ratios, default=0.0) if math.isfinite(v) else math.inf
        out.update(measure=v if math.isfinite(v) else None)
    elif s.type is SensorType.PROGRESS:
        since = tracked or 0.0
        bad, ratio = stalled(since, s.threshold), _ratio(since, s.threshold)
        out.update(bound=s.threshold, measure=since)
    else:
        events = tracked or 0.0
        bad, ratio = over_rate(events, s.threshold), _ratio(events, s.threshold)
        out.update(bound=s.threshold, measure=events, window=s.param)
    if not math.isfinite(out["value"]):
        out["value"] = None  # JSON has no NaN
    out["violated"] = bool(bad)
    out["ratio"] = min(max(ratio, 1.0), 1e9) if bad else min(ratio, 0.999)  # finite: JSON
    out["text"] = _describe(out)
    return out


def _ratio(measure: float, bound: float) -> float:
    return measure / bound if bound > 0 else (math.inf if measure > 0 else 0.0)


def _describe(j: dict) -> str:
    name, m, b = f"{j['box']}/{j['sensor']}", j["measure"], j["bound"]
    if j["type"] == SensorType.PROGRESS:
        if not m:
            return f"{name} moving (deadline {b:g} s)"
        if j["violated"]:
            return f"{name} stalled {m:.2f} s > deadline {b:g} s"
        return f"{name} unchanged {m:.2f} s (deadline {b:g} s)"
    if j["type"] == SensorType.PRESSURE:
        rate = f"{m:.3g}/{j['window']:g} s"
        return f"{name} {rate} > max {b:g}" if j["violated"] else f"{name} {rate} (max {b:g})"
    value = "not a number" if m is None else f"{m:.4g}"
    if b is None:
        return f"{name} {value}"
    kind = j["bound_kind"]
    if j["violated"]:
        return f"{name} {value} {'<' if kind == 'min' else '>'} {kind} {b:g}"
    return f"{name} {value} ({kind} {b:g})"


# -- rendering --------------------------------------------------------------------------

_STYLE = {"ok": "green", "recovered": "cyan", "suspect": "yellow", "locked": "magenta",
          "fenced": "bold red", "unreachable": "bold red"}


def render_status(rows: list[dict], console=None, *, title: str = "backdoors status") -> None:
    """Print the rows as one rich table: host, node, state, worst sensor, sessions,
    open incidents."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=title)
    fleet = any(r.get("owner") for r in rows)  # a fleet of monitors: who watches each node
    for col in ("host", "node", "state", "worst sensor", "sessions", "open incidents",
                *(("watched by",) if fleet else ())):
        t.add_column(col, overflow="fold")
    for r in rows:
        state = cell(r["state"], _STYLE.get(r["state"], "white"))
        if r["state"] == "locked" and r["locked_by"]:
            state.append(printable(f" ({', '.join(r['locked_by'])})"))
        elif r["state"] == "suspect" and r["frozen"]:
            state.append(" (frozen, no lock holder)")
        if r["reachable"] is False or r["worst"] is None:
            worst = r["error"] or "-"
        else:
            worst = r["worst"]["text"]
            if r["violations"] > 1:
                worst += f" (+{r['violations'] - 1} more)"
        if r["box_errors"]:
            worst += "; unreadable: " + ", ".join(sorted(r["box_errors"]))
        sessions = "-" if r["sessions"] is None else str(r["sessions"])
        if r["adopted_sessions"]:
            sessions += f" ({r['adopted_sessions']} recovered)"
        incs = ", ".join(f"{i['rule']} {i['id']}" for i in r["incidents"]) or "-"
        owner = (f"{r['owner']} (token {r['token']})" if r.get("owner") else "-",) if fleet else ()
        t.add_row(cell(r["host"]), cell(r["node"]), state, cell(worst), sessions, cell(incs),
                  *map(cell, owner))
    console.print(t)
    if not rows:
        console.print("no agents")
