"""The `backdoors` command (alias `bd`).

Every error raised on purpose (BackdoorsError) becomes one line on stderr and a non-zero
exit: 77 when root is needed, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
import os
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .common.text import cell
from .errors import BackdoorsError, NeedRootError

app = typer.Typer(
    rich_markup_mode=None,  # help texts show config tables like [agent.monitors] as written
    help="Remote healing for Linux services: sensor boxes, an out-of-band agent, "
    "repair in place and transparent session recovery.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
lab_app = typer.Typer(rich_markup_mode=None, help="The embedded lab: hosts, nodes and a client on this machine (needs root).",
                      no_args_is_help=True)
fault_app = typer.Typer(rich_markup_mode=None, help="Inject faults into a node of a running lab, and stop them.",
                        no_args_is_help=True)
bench_app = typer.Typer(rich_markup_mode=None, help="Benchmarks (JSON out); peers measured side by side in one run.",
                        no_args_is_help=True)
app.add_typer(lab_app, name="lab")
lab_app.add_typer(fault_app, name="fault")
app.add_typer(bench_app, name="bench")
node_app = typer.Typer(rich_markup_mode=None, help="Nodes: make one on this host (create, run, delete; root), or act on "
                       "one through its agent (unfence, kill).", no_args_is_help=True)
app.add_typer(node_app, name="node")
config_app = typer.Typer(rich_markup_mode=None, help="The configuration file.", no_args_is_help=True)
app.add_typer(config_app, name="config")
scenario_app = typer.Typer(rich_markup_mode=None, help="End-to-end cases: each builds its own lab, runs, tears down, prints JSON (root).",
                           no_args_is_help=True)
app.add_typer(scenario_app, name="scenario")
keys_app = typer.Typer(rich_markup_mode=None, help=(
    "Ed25519 keys of monitors and agents (docs/operations.md, Keys). Each monitor and each "
    "agent has its own private key file (mode 0600, never copied elsewhere); the others "
    "hold only its public key: agents list their monitors' and peers' public keys "
    "([agent.monitors], [agent.peers]), monitors their agents' ([[monitor.agents]] "
    "public_key)."), no_args_is_help=True)
app.add_typer(keys_app, name="keys")
casestudy_app = typer.Typer(rich_markup_mode=None, help="The case study: RUBiS, a multi-tier auction site made recoverable (docs/casestudy.md; root).",
                            no_args_is_help=True)
app.add_typer(casestudy_app, name="casestudy")

out = Console()
err = Console(stderr=True)


def _print_json(obj) -> None:
    out.print_json(json.dumps(obj)) if out.is_terminal else print(json.dumps(obj, indent=2))


# ---- lab ------------------------------------------------------------------------------


@lab_app.command("up")
def lab_up(
    hosts: int = typer.Option(2, help="Lab hosts, each with its own namespace on the private network."),
    nodes: int = typer.Option(4, help="Nodes (cgroup + netns), spread over the hosts."),
    name: str = typer.Option("lab", help="Lab name; prefixes every namespace and cgroup (bd-NAME-)."),
    memory_mb: int = typer.Option(1024, help="Memory limit of each node, MiB (0: none)."),
    pids: int = typer.Option(512, help="Pids limit of each node (0: none)."),
    agents: bool = typer.Option(True, "--agents/--no-agents", help="Start a backdoor agent per host."),
    foreground: bool = typer.Option(False, "--foreground", help="Hold the lab; tear it down on Ctrl-C or SIGTERM."),
    etcd: int = typer.Option(0, "--etcd", "--etcd-members", metavar="N", help="Run an etcd of N members (odd: 1, 3, 5) on the private network (the monitor namespace), for a fleet of monitors; 0: none."),
    monitors: int = typer.Option(0, help="Start this many monitor processes (m1, m2, ...; with --etcd they share the nodes)."),
    vm_nodes: int = typer.Option(0, "--vm-nodes", help="VM nodes (QEMU guests v0, v1, ...; docs/vm-backdoor.md) besides the container nodes."),
) -> None:
    """Build a lab. Without --foreground it stays until `backdoors lab down`."""
    from .lab import Lab
    from .lab.lab import StopSignals

    if monitors and not agents:
        raise typer.BadParameter("--monitors needs the agents (leave out --no-agents)")
    ids = tuple(f"m{i + 1}" for i in range(max(1, monitors)))
    lab = Lab(name, hosts=hosts, nodes=nodes, memory_limit=memory_mb * 2**20 or None,
              pids_limit=pids or None, agents=agents, monitors=ids,
              etcd=etcd, vm_nodes=vm_nodes)
    signals = StopSignals() if foreground else None
    lab.up()
    try:
        for m in ids[:monitors]:
            lab.start_monitor(m)
    except BaseException:
        lab.down()
        raise
    if signals:
        try:
            if not signals.received:
                _show_lab(lab.status())
                err.print(f"lab {name} is up; Ctrl-C tears it down")
                signals.wait()
        finally:
            lab.down()
            err.print(f"lab {name} torn down")
        return
    lab.detach()  # it outlives this command (not reaped as abandoned)
    _show_lab(lab.status())
    err.print(f"lab {name} is up; `backdoors lab down --name {name}` removes it")


@lab_app.command("status")
def lab_status(
    name: Optional[str] = typer.Option(None, help="One lab (default: every running lab)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show running labs: hosts, nodes, processes, memory, link state."""
    from .errors import require_root
    from .lab import Lab, running_labs

    require_root("reading lab status", "it enters the lab's network namespaces and cgroups")
    names = [name] if name else running_labs()
    statuses = [Lab.attach(n).status() for n in names]
    if as_json:
        _print_json(statuses)
    elif not statuses:
        err.print("no lab is running")
    for s in statuses if not as_json else ():
        _show_lab(s)


def _show_lab(s: dict) -> None:
    t = Table(title=f"lab {s['lab']}")
    for col in ("node", "host", "vip", "processes", "memory_mb", "frozen", "link", "service_pid"):
        t.add_column(col)
    for n in s["nodes"]:
        t.add_row(*(str(n.get(c, n.get("error", "?"))) for c in
                    ("node", "host", "vip", "processes", "memory_mb", "frozen", "link", "service_pid")))
    out.print(t)
    if s.get("etcd"):
        monitors = ", ".join(f"{m} (pid {p})" for m, p in s.get("monitors", {}).items())
        out.print(f"etcd {s['etcd']} (in the monitor namespace); monitors: {monitors or 'none'}")
    for v in s.get("vms", []):
        out.print(f"VM node {v['node']}: {v['vip']} (address {v['address']}), QEMU pid "
                  f"{v['qemu_pid']}, {v.get('accel', '?')}, booted in {v.get('boot_s', '?')} s")


@lab_app.command("down")
def lab_down(name: str = typer.Option("lab", help="Lab to remove (also reaps a killed lab's leftovers).")) -> None:
    """Tear a lab down: processes, namespaces, cgroups and files, found by name prefix."""
    from .lab import reap

    removed = reap(name)
    err.print(f"lab {name}: removed {len(removed['netns'])} namespaces, "
              f"{len(removed['cgroups'])} cgroups, {len(removed['files'])} files")


@lab_app.command("exec")
def lab_exec(
    node: str = typer.Argument(..., help="Node to run in, e.g. n0."),
    command: list[str] = typer.Argument(..., help="The command and its arguments (after --)."),
    root: bool = typer.Option(False, "--root", help="Run as the node's own root (uid 0 inside "
                              "its user namespace), not as its services' uid."),
    name: str = typer.Option("lab", help="Lab name."),
) -> None:
    """Run a command inside a node exactly as its services run: the node's cgroup, all its
    namespaces (PID, mount, network, cgroup, IPC, UTS, user) and its services' uid. Stdin,
    stdout and stderr are this terminal's; the exit status is the command's (128+N after
    signal N). Example: backdoors lab exec n0 -- cat /proc/1/comm"""
    import signal as _signal

    from .lab import Lab

    proc = Lab.attach(name).run_in_node(node, command, root=root, stdin=None, stdout=None,
                                        stderr=None)
    for sig in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(sig, lambda s, _f: proc.send_signal(s))
    raise typer.Exit(proc.wait())


@fault_app.command("inject")
def fault_inject(
    kind: str = typer.Argument(..., help="freeze | memory-hog | fork-bomb | crash | network | cpu-hog | stall"),
    node: str = typer.Option(..., help="Node to hurt, e.g. n0."),
    name: str = typer.Option("lab", help="Lab name."),
    rate_mb: float = typer.Option(40, help="memory-hog: growth, MB/s."),
    cap_mb: float = typer.Option(400, help="memory-hog: stop growing at this size, MB."),
    procs: int = typer.Option(2, help="cpu-hog: busy processes."),
    mode: str = typer.Option("down", help="network: 'down' (link down) or 'detach' (off the bridge)."),
) -> None:
    """Inject a fault into a node of a running lab."""
    from .lab import Lab, inject

    opts = {"memory-hog": {"rate_mb": rate_mb, "cap_mb": cap_mb}, "cpu-hog": {"procs": procs},
            "network": {"mode": mode}}.get(kind, {})
    inject(Lab.attach(name), kind, node, **opts)
    err.print(f"{kind} injected into {node}; stop it with `backdoors lab fault stop {kind} --node {node}`")


@fault_app.command("stop")
def fault_stop(
    kind: str = typer.Argument(..., help="The fault kind to stop."),
    node: str = typer.Option(..., help="Node."),
    name: str = typer.Option("lab", help="Lab name."),
    mode: str = typer.Option("down", help="network: the mode it was injected with."),
) -> None:
    """Stop a fault (a crash is undone by restarting the sample service)."""
    from .lab import Lab, stop

    stop(Lab.attach(name), kind, node, **({"mode": mode} if kind == "network" else {}))
    err.print(f"{kind} stopped in {node}")


# ---- the daemons ----------------------------------------------------------------------


@app.command()
def agent(
    config: str = typer.Option(..., help="The agent's TOML config, unified or its own (see docs/agent-protocol.md)."),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR."),
    sealed: bool = typer.Option(False, "--sealed", help="Once set up, seal the agent: not dumpable, no new privileges, Landlock path rules (no execution, no reading outside its code, /proc, /sys and a few /etc files), a seccomp filter refusing exec, ptrace, mount, module loading... (docs/operations.md, \"The sealed agent\")."),
    seal_action: str = typer.Option("errno", help="With --sealed, what a denied system call does: errno (EPERM), log (allowed, logged by the kernel: a dry run) or kill."),
    require_landlock: bool = typer.Option(False, "--require-landlock", help="With --sealed, refuse to start on a kernel without Landlock (by default: a warning, and the paths are not confined)."),
    check: bool = typer.Option(False, "--check", help="Only check the config as the agent would start with it (its key file, id and mode, the audit log's folder), then exit: 0 if it would start (the unit's ExecStartPre)."),
) -> None:
    """Run the backdoor agent of this host (root): serves monitors on the private network.

    No root: one line on stderr, exit status 77; a bad config: the same, exit status 2
    (`--check` checks one as root, without starting; `backdoors config show --config FILE`
    shows its keys without root).
    When it serves it prints one JSON line on stdout, {"event": "ready", ...}.
    """
    import logging

    from .agent.run import run_agent
    from .config import load_agent_config
    from .errors import ConfigError, require_root

    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise typer.BadParameter("one of DEBUG, INFO, WARNING, ERROR", param_hint="--log-level")
    if seal_action not in ("errno", "log", "kill"):
        raise typer.BadParameter("one of errno, log, kill", param_hint="--seal-action")
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s agent %(levelname)s %(message)s")
    try:
        require_root("the agent", "it reads and changes nodes' cgroups, namespaces and processes")  # first: a config may name files only root can read
        loaded = load_agent_config(config)
        loaded.identity()  # its key file, as the agent reads it (a config problem: 2)
        if not os.path.isdir(os.path.dirname(loaded.audit_log)):
            raise ConfigError(f"{config}: audit_log {loaded.audit_log}: its folder does not "
                              "exist")
    except BackdoorsError as e:
        print(f"backdoors agent: {e}", file=sys.stderr)
        raise typer.Exit(77 if isinstance(e, NeedRootError) else 2) from None
    if check:
        print(f"{config}: ok (agent {loaded.host}, {len(loaded.nodes)} nodes)")
        return
    raise typer.Exit(run_agent(loaded, sealed=sealed, config_path=config, seal_action=seal_action,
                               require_landlock=require_landlock))


@app.command()
def monitor(
    config: str = typer.Option(..., help="The monitor's TOML config, unified or its own (see docs/monitor.md)."),
    check: bool = typer.Option(False, "--check", help="Only check the config and its rulesets."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every poll problem."),
    etcd: Optional[list[str]] = typer.Option(
        None, "--etcd", help="Client URL of the fleet's etcd (repeat for several members): "
        "share the nodes with the other monitors naming it (overrides the config's etcd)."),
) -> None:
    """Run a monitor until SIGINT or SIGTERM: poll agents, detect, diagnose, repair;
    incidents go to JSONL. A bad config or ruleset: one line on stderr, exit status 1."""
    import logging
    import signal
    import threading

    from .config import check_monitor, monitor_config
    from .monitor.core import run_monitor

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if check:
            loaded, rules, warnings = check_monitor(config, etcd)
            for w in warnings:
                print(f"warning: {w}", file=sys.stderr)
            print(f"{config}: ok ({len(loaded.agents)} agents, {len(rules)} rules: "
                  f"{', '.join(r.name for r in rules)})")
            return
        loaded = monitor_config(config, etcd)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        run_monitor(loaded, stop)
    except BackdoorsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1) from None


def _has_monitor(path: str) -> bool:
    """Whether the config file at `path` is a monitor's, not an agent host's (a unified
    file without [monitor], an agent file with its [[nodes]]). A file that cannot be read
    or parsed says so (ConfigError)."""
    from .common.configfile import Document
    from .config import is_unified

    table = Document.read(path, "config").table
    if is_unified(table):
        return isinstance(table.get("monitor"), dict)
    return "nodes" not in table


@app.command()
def incidents(
    path: Optional[str] = typer.Argument(
        None, help="Incident folder or .jsonl file (default: the monitor's incidents_dir, from --config)."),
    config: Optional[str] = typer.Option(
        None, "--config", help="Monitor or unified config whose incidents_dir to read "
        "(default /etc/backdoors/backdoors.toml when it exists and has a monitor section)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: every field of every incident."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the last N incidents."),
    wide: bool = typer.Option(False, "--wide", help="Every column (for a wide terminal)."),
) -> None:
    """Show incidents: detection, diagnosis, actions and their timings. Reads PATH, else
    the incidents_dir of --config (or of /etc/backdoors/backdoors.toml), else
    /var/lib/backdoors/incidents."""
    import os
    from pathlib import Path

    from .config import DEFAULT_PATH, load_monitor_config
    from .errors import ConfigError
    from .monitor import DEFAULT_INCIDENTS_DIR, show_incidents

    where = "given"
    if path is None:
        cfg = None
        if config is not None:
            cfg = load_monitor_config(config)
        elif os.path.exists(DEFAULT_PATH) and _has_monitor(DEFAULT_PATH):
            cfg = load_monitor_config(DEFAULT_PATH)  # (a broken one says so)
        source = config or DEFAULT_PATH
        if cfg is not None and cfg.incidents_dir is not None:
            path, where = cfg.incidents_dir, f"the incidents_dir of {source}"
        else:
            path = DEFAULT_INCIDENTS_DIR
            where = (f"the default: {source} sets no incidents_dir" if cfg is not None else
                     f"the default: no monitor config at {DEFAULT_PATH}")
    if not Path(path).exists():
        raise ConfigError(f"no incident log at {path} ({where}): run this on the monitor's "
                          "host, or give --config FILE (its [monitor] incidents_dir) or the "
                          "log's folder or .jsonl file")
    show_incidents(path, as_json, limit=limit, console=out, wide=wide)


@app.command()
def status(
    lab: Optional[str] = typer.Option(None, "--lab", help="A running lab (not with --config)."),
    config: Optional[str] = typer.Option(None, "--config", help="Monitor or unified config file (default: /etc/backdoors/backdoors.toml if it exists, else the one running lab)."),
    incidents: Optional[str] = typer.Option(None, "--incidents", help="Incident log file or folder (default: the config's incidents_dir, or the lab's)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    check: bool = typer.Option(False, "--check", help="Exit with status 3 when a node is not "
                               "ok or recovered, or the fleet cannot be read (for scripts, cron, Nagios)."),
) -> None:
    """Hosts, nodes, node state (ok/suspect/locked/fenced/recovered), worst sensor, open incidents; with a fleet of monitors (etcd), its members, their shares and leases.

    --json prints {"nodes": [a row per node], "fleet": the fleet as etcd holds it, or null without etcd}.

    Exit status: 0; with --check, 3 when a node is not ok or recovered (suspect, locked, fenced, unreachable) or the fleet cannot be read; 1 on an error (a bad config).
    """
    from .status import fleet_status, render_fleet, render_status, status_table

    rows = status_table(lab=lab, monitor_config=config, incidents=incidents)
    fleet = fleet_status(lab=lab, monitor_config=config)
    if as_json:
        print(json.dumps({"nodes": rows, "fleet": fleet}, indent=2, default=str))
    else:
        render_status(rows, out)
        if fleet is not None:
            render_fleet(fleet, out)
    if check and (any(r["state"] not in ("ok", "recovered") for r in rows)
                  or (fleet or {}).get("error")):
        raise typer.Exit(3)


@config_app.command("show")
def config_show(
    config: Optional[str] = typer.Option(None, "--config", help="A unified, agent or monitor config (default /etc/backdoors/backdoors.toml)."),
) -> None:
    """Print the effective configuration: every key, its value, defaults filled in."""
    from .config import config_show as show

    print(show(config), end="")


@config_app.command("include-dir")
def config_include_dir() -> None:
    """Print where the C headers are: cc -I"$(backdoors config include-dir)" finds
    backdoors/sensorbox.h and backdoors/register.h (docs/sensor-box.md)."""
    # the worked example ships too, at ../examples/c/sensor_service.c from that directory
    include = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")
    if not os.path.isfile(os.path.join(include, "backdoors", "register.h")):
        err.print(f"[red]error:[/] no C headers at {include}: reinstall the backdoors package")
        raise typer.Exit(1)
    print(include)


# ---- keys ---------------------------------------------------------------------------


@keys_app.command("generate")
def keys_generate(
    path: str = typer.Argument(..., help="The private key file to write (refused if it exists), e.g. /etc/backdoors/m1.key."),
    id: str = typer.Option(..., "--id", help="Whose key: a monitor id (m1) or an agent's host name (web-a)."),
) -> None:
    """Write a new Ed25519 private key file (mode 0600) and print its public entry.

    The printed line, `ID = "ed25519:..."`, goes into the configs that check this key: for a
    monitor, the [agent.monitors] table of every agent; for an agent, the [agent.peers]
    table of its peer agents and the public_key of its [[monitor.agents]] entries. The
    private key file stays on its own host, readable by its user only."""
    from .agent.keys import generate, public_entry

    old = os.umask(0o077)
    try:
        identity = generate(path, id)
    finally:
        os.umask(old)
    print(public_entry(identity.id, [identity.public]))


@keys_app.command("show")
def keys_show(
    path: str = typer.Argument(..., help="A private key file."),
) -> None:
    """Print the public entry of a private key file: `ID = "ed25519:..."`, or with two
    keys while a rotation is under way (paste it into the configs that check this key)."""
    from .agent.keys import public_entry, read_key_file

    current, nxt = read_key_file(path)
    print(public_entry(current.id, [current.public] + ([nxt.public] if nxt else [])))


@keys_app.command("rotate")
def keys_rotate(
    path: str = typer.Argument(..., help="The private key file to rotate."),
    finish: bool = typer.Option(False, "--finish", help="Second step: sign with the new key from now on; drop the old one."),
) -> None:
    """Rotate a key without downtime, in two steps.

    1. `keys rotate FILE` adds a next key to the file (the old one still signs) and prints
    the entry with both public keys: install it everywhere this key is checked (both are
    valid meanwhile).
    2. `keys rotate --finish FILE` makes the next key the only one and prints the entry
    with the new public key alone; restart the key's owner (it signs with the new key),
    then install the new entry everywhere (the old key is refused from then on)."""
    from .agent.keys import new_identity, public_entry, read_key_file, write_key_file

    current, nxt = read_key_file(path)
    if finish:
        if nxt is None:
            raise BackdoorsError(f"{path}: no rotation under way (run keys rotate {path} first)")
        write_key_file(path, nxt, overwrite=True)
        print(public_entry(nxt.id, [nxt.public]))
        return
    if nxt is not None:
        raise BackdoorsError(f"{path}: a rotation is under way already (finish it with "
                             f"keys rotate --finish {path})")
    nxt = new_identity(current.id)
    write_key_file(path, current, nxt, overwrite=True)
    print(public_entry(current.id, [current.public, nxt.public]))


def _node_client(node: str, lab: Optional[str], config: Optional[str]):
    """A client of the agent serving `node`; with a monitor config its destructive calls
    wait the monitors' vote_window_s for the other votes (quorum above 1)."""
    from .status import _sources

    sources, _ = _sources(lab, config, 2.0)
    import os

    from .config import DEFAULT_PATH, load_monitor_config

    path = config or (DEFAULT_PATH if lab is None and os.path.exists(DEFAULT_PATH) else None)
    window = load_monitor_config(path).vote_window_s if path is not None else 0.0
    seen = []  # what each agent said: the operator must tell a typo from agents down
    for src in sources:
        client = None
        try:
            client = src.connect()
            client.vote_window = window
            served = sorted(i.name for i in client.nodes())
            if node in served:
                return client
            seen.append(f"{src.host} ({src.address}) serves {', '.join(served) or 'no node'}")
        except (BackdoorsError, OSError) as e:
            seen.append(f"{src.host} ({src.address}): {e}")
        if client is not None:
            client.close()
    raise BackdoorsError(f"no agent serves node {node!r}: " + "; ".join(seen or ["no agents"]))


@node_app.command("unfence")
def node_unfence(
    node: str = typer.Argument(..., help="The fenced node."),
    lab: Optional[str] = typer.Option(None, "--lab", help="A running lab (not with --config)."),
    config: Optional[str] = typer.Option(None, "--config", help="Monitor or unified config file (default: /etc/backdoors/backdoors.toml if it exists, else the one running lab)."),
) -> None:
    """Return a node fenced by a recovery to service: thaw it, bring its interface up.

    With quorum k above 1, run it on k monitor hosts (each with its own config and key)
    within the vote window."""
    with _node_client(node, lab, config) as c:
        r = c.call("unfence", node=node)
    err.print(f"node {node} unfenced (thawed in {r['thaw_ms']:.1f} ms, interface up)")


@node_app.command("kill")
def node_kill(
    node: str = typer.Argument(..., help="The node whose processes to kill."),
    lab: Optional[str] = typer.Option(None, "--lab", help="A running lab (not with --config)."),
    config: Optional[str] = typer.Option(None, "--config", help="Monitor or unified config file (default: /etc/backdoors/backdoors.toml if it exists, else the one running lab)."),
) -> None:
    """Kill every process of a node (a refresh starts from there).

    With quorum k above 1, run it on k monitor hosts (each with its own config and key)
    within the vote window."""
    with _node_client(node, lab, config) as c:
        r = c.kill_node(node)
    err.print(f"node {node}: {len(r)} processes killed")


@node_app.command("create")
def node_create(
    name: str = typer.Argument(..., help="The node's name, as in the agent's [[nodes]] entry."),
    memory: Optional[str] = typer.Option(None, help="Memory limit, e.g. 2G, 512M (K/M/G/T: powers of 1024)."),
    pids: Optional[int] = typer.Option(None, min=1, help="Limit of tasks (processes and threads)."),
    cgroup: Optional[str] = typer.Option(None, help="Cgroup path in every hierarchy (default backdoors/NAME)."),
    netns: Optional[str] = typer.Option(None, help="Make a network namespace of this name for the node."),
    address: list[str] = typer.Option([], help="With --netns: an address ADDR/LEN on its interface (repeat the option)."),
    bridge: Optional[str] = typer.Option(None, help="With --netns: the host bridge its veth's host end joins."),
    gateway: Optional[str] = typer.Option(None, help="With --netns: its default route's gateway."),
    interface: str = typer.Option("eth0", help="With --netns: its interface's name inside."),
    veth: Optional[str] = typer.Option(None, help="With --netns: the veth's host end (default NAME-h)."),
) -> None:
    """Make a node on this host (root): cgroups, and a netns with --netns.

    Its cgroup gets a directory in every hierarchy of the host's layout (cgroup v1/hybrid
    or v2, detected) with the limits; with --netns a network namespace joined to the host
    by a veth. Prints the agent's config entry for it on stdout. What exists
    already is refused; `backdoors node delete NAME` removes what this made. Example:
    backdoors node create web0 --memory 2G --pids 512 --netns web0 --address 10.20.0.10/24
    --address 10.20.0.100/24 --bridge br-svc --gateway 10.20.0.1"""
    from . import provision
    from .nodes import detect

    layout = detect()
    rec = provision.create(name, cgroup=cgroup, memory=provision.parse_size(memory) if memory else None,
                           pids=pids, netns=netns, addresses=address, bridge=bridge,
                           gateway=gateway, interface=interface, veth=veth, layout=layout)
    dirs = ", ".join(str(m / rec.cgroup) for m in layout.hierarchies().values())
    err.print(cell(f"node {name}: cgroup {rec.cgroup!r} in {dirs} ({layout.kind} layout)"
                   + (f"; netns {rec.netns} with {rec.interface} (host end {rec.veth}"
                      + (f" on bridge {rec.bridge}" if rec.bridge else "") + ")"
                      if rec.netns else "")), highlight=False, soft_wrap=True)
    err.print(escape(provision.what_it_is(rec)), highlight=False, soft_wrap=True)
    err.print("The agent's config entry for it (stdout):", highlight=False)
    print(provision.stanza(rec), end="")


@node_app.command("run")
def node_run(
    name: str = typer.Argument(..., help="The node, made by `backdoors node create`."),
    command: list[str] = typer.Argument(..., help="The command and its arguments (after --)."),
    user: Optional[str] = typer.Option(None, help="Run as this user (name or uid), after joining the node."),
    init: bool = typer.Option(False, "--init", help="Run it under catatonit, which reaps the node's orphans (a killed fork bomb's zombies)."),
    cgroup: Optional[str] = typer.Option(None, help="For a node not made by `node create`: its cgroup path."),
    netns: Optional[str] = typer.Option(None, help="With --cgroup: its network namespace."),
    run_dir: str = typer.Option("/run/backdoors", help="The agent's run_dir: sets BACKDOORS_AGENT_SOCKET and BACKDOORS_ADOPT_DIR unless set."),
) -> None:
    """Run a command inside a node (root), as --user, under catatonit with --init.

    It joins the node's cgroup in every hierarchy and its netns, then becomes --user. Stdin, stdout and stderr are this terminal's; the exit status is the command's (128+N
    after signal N). Example: backdoors node run web0 --user web --init -- /usr/local/bin/web-server"""
    from . import provision

    raise typer.Exit(provision.run(name, command, user=user, init=init, cgroup=cgroup,
                                   netns=netns, run_dir=run_dir))


@node_app.command("delete")
def node_delete(name: str = typer.Argument(..., help="A node made by `backdoors node create`.")) -> None:
    """Remove a node made by `node create` (root): kill what is left, remove its cgroups,
    netns and veth; refused for a node it did not make."""
    from . import provision

    r = provision.delete(name)
    made = [f"cgroup {r['cgroup']!r}"] + [f"netns {r['netns']}"] * bool(r["netns"]) \
        + [f"veth {r['veth']}"] * bool(r["veth"])
    err.print(f"node {name}: {len(r['killed'])} processes killed; removed {', '.join(made)}"
              + (f"; kept {', '.join(r['kept'])} (other cgroups under it)" if r["kept"] else ""),
              highlight=False, soft_wrap=True)


# ---- scenarios ------------------------------------------------------------------------


def _verdict(result: dict, as_json: bool, passed: bool) -> None:
    """Print a scenario's result; exit status 1 if it did not do what it shows."""
    _emit(result, as_json)
    if not passed:
        raise typer.Exit(1)


def _emit(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        t = Table("fact", "value")
        for k, v in result.items():
            t.add_row(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
        out.print(t)


@scenario_app.command("memory-hog")
def scenario_memory_hog(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """A hog grows beside the service and a large stable cache: the hog (not the largest) is killed."""
    from .scenarios import SCENARIOS

    r = SCENARIOS["memory-hog"]()
    _verdict(r, as_json, r["detected"] and r["culprit_killed"] and r["service_survived"]
             and not r["innocent_killed"])


@scenario_app.command("fork-bomb")
def scenario_fork_bomb(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """A fork bomb wedges a node under its pids limit: lock, kill the lineage, unlock."""
    from .scenarios import SCENARIOS

    r = SCENARIOS["fork-bomb"]()
    _verdict(r, as_json, r["detected"] and r["service_survived"] and r["node_thawed"]
             and not r["bomb_processes_left"])


@scenario_app.command("hang")
def scenario_hang(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    mode: str = typer.Option("stall", help="stall (service deadlock), freeze (SIGSTOP the node) or cgroup-freeze."),
    refresh: bool = typer.Option(False, "--refresh", help="Restart the service after the diagnosis."),
) -> None:
    """The service stops progressing: detected within deadline + 2 polls, with a diagnosis."""
    from .scenarios import SCENARIOS

    r = SCENARIOS["hang"](mode=mode, refresh=refresh)
    _verdict(r, as_json, r["detected"] and (not refresh or r.get("service_restarted")))


@scenario_app.command("recovery")
def scenario_recovery(
    fault: str = typer.Option("freeze", help="freeze (SIGSTOP the node), crash (SIGKILL the server), network (link down), memory-hog (the server itself leaks: unrepairable), server-crash (SIGKILL the server, its node stays healthy: the agent pushes the death), agent-restart (SIGKILL the node's agent while sessions stream, then freeze the node) or agent-stop (SIGSTOP it: its watchdog replaces it; then freeze)."),
    sessions: int = typer.Option(10, help="Concurrent client sessions, each verified byte for byte."),
    restart_server: bool = typer.Option(True, help="server-crash: restart the server in its node (sessions stay there); --no-restart-server: they move to another node."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """A node fails; its live sessions move to another node and continue byte-exact."""
    from .scenarios.recovery import FAULTS, recovery

    if fault not in FAULTS:
        raise typer.BadParameter(f"{fault!r}; choose one of {', '.join(FAULTS)}",
                                 param_hint="--fault")
    r = recovery(fault, sessions, restart_server=restart_server)
    _verdict(r, as_json, r["detected"] and r["sessions_ok"] == sessions
             and not r["bytes_lost"] and not r["bytes_duplicated"] and not r["corrupt_sessions"])


@casestudy_app.command("rubis")
def casestudy_rubis(
    users: int = typer.Option(64, help="Locust users at the highest load level; the levels are users/16, /8, /4, /2 and users."),
    seconds: float = typer.Option(10.0, help="Seconds of load per level and kind of server."),
    scale: float = typer.Option(1.0, help="Size of the data set: 1.0 is 10,000 users, 20,000 items, 100,000 bids."),
    rounds: int = typer.Option(1, help="Pairs of runs (plain, recoverable) per level, in alternating order, averaged: a machine shared with other work drifts."),
    faults: str = typer.Option("", help="Faults under load, after the levels: comma-separated, or all. fe-* fail front-end node n0 (its client sessions move to FE b with their channels to the middle tiers), mt-* middle-tier node n2 (its channels move to MT b, its database connections ended first): *-freeze (every process stopped), *-lock (its cgroup frozen), *-network (its link down), *-crash (its recoverable server killed). Each fault runs on a site of its own (~25 s more set-up each)."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Keep the run's files here (locust's figures and logs, the acknowledged writes)."),
    ramp: Optional[float] = typer.Option(None, help="Seconds of ramp-up (the users opening their sessions) left out of each run's measurement interval, as TPC-W measures; default 2 or a quarter of --seconds, the less."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """RUBiS under locust's load, plain (uvicorn, asyncio) vs recoverable, side by side.

    A lab of two hosts: PostgreSQL with the RUBiS data set, two middle tiers and two front ends, each running a recoverable and a plain server. At each load level locust (headless, in the client namespace; a browsing and a bidding mix, about 15 % writes in the latter) loads the plain front ends, then the recoverable ones. Prints `load` (per level: users, rps, p50 and p99 ms, requests and failed ones, for both; and apart, the p50 and p99 of the users' first requests, which open the sessions, and the p99 of the later ones), `overhead_pct_max` (throughput, below saturation), `p99_overhead_pct_max` and `steady_p99_overhead_pct_max` (the same for p99 latency, of every request and of the later ones), `interval_overhead_pct_max` and `interval_p99_overhead_pct_max` (throughput and p99 of the measurement intervals, after the ramp-up), and the database checked against what the clients were told: bids_acknowledged, bids_lost, bids_duplicated, and writes_* over every kind of write. Exit status 1 if a write was lost or duplicated, or a fault failed a request. About 25 s of set-up, then 2 x 5 levels x (seconds + ~3 s)."""
    from .casestudy.rubis.dataset import Scale
    from .casestudy.rubis.study import FAULTS, rubis
    from .errors import require_root

    if users < 1 or seconds <= 0 or not 0 < scale <= 10 or rounds < 1 or (
            ramp is not None and not 0 <= ramp < seconds):
        raise typer.BadParameter("--users must be >= 1, --seconds > 0, --scale in (0, 10], "
                                 "--rounds >= 1, --ramp in [0, --seconds)")
    require_root("the case study's lab")
    chosen = FAULTS if faults == "all" else tuple(f for f in faults.split(",") if f)
    r = rubis(users, seconds, scale=Scale().scaled(scale), rounds=rounds, faults=chosen,
              work_dir=out_dir, ramp_s=ramp)
    _verdict(r, as_json, not r["writes_lost"] and not r["writes_duplicated"]
             and not any(f.get("failed_requests") for f in r.get("faults", ())))


@scenario_app.command("vm")
def scenario_vm(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    benign_minutes: float = typer.Option(10.0, help="Minutes of benign work in the guest (false positives); 10 for the benchmark."),
) -> None:
    """A VM node's kernel from outside: a hang by jiffies, the integrity scan, a rootkit healed.

    A lab with one VM node (QEMU, TCG unless KVM is asked for). Times a guest kernel hang (vCPUs stopped) by its jiffies deadline; takes the integrity baseline from the kernel image and scans the guest a slice per tick; counts findings during benign guest work (false positives) and the scan's cost on a STREAM-like benchmark in the guest (with and without, alternately); then a rootkit through QEMU's gdbstub (a system call table entry, a function's first bytes, a process unlinked from the task list), each detected and healed with the vCPUs stopped; Orion predicts a memory leak and a fork bomb in the guest from its kernel's counters, against the plain bounds. Reports boot_s, accel, guest_hang_detect_ms, tamper_detect_ms {p50, p99}, tamper_healed, hidden_process_found, false_positives, benign_minutes, overhead_pct, prediction_lead_ms {memory-leak, fork-bomb}, prediction_false_alarms (root).
    """
    from .scenarios import SCENARIOS

    if benign_minutes < 0:
        raise typer.BadParameter(f"must be >= 0, got {benign_minutes}", param_hint="--benign-minutes")
    result = SCENARIOS["vm"](benign_s=60 * benign_minutes)
    _emit(result, as_json)
    if not result["tamper_healed"] or not result["hidden_process_found"]:
        raise typer.Exit(1)


@scenario_app.command("hostile-node")
def scenario_hostile_node(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """A node's root attacks its own host's agent; every attack must fail.

    A lab of one host and two nodes: from inside n0, as the node's root, it signals every pid it sees (kill -STOP/-KILL -1), ptraces and reads the agent's memory by its host pid, mounts cgroupfs and writes the agent's and n1's cgroup files, renices / ioprio / oom_score_adj the agent, connects to the private network, floods the registration socket (10,000 malformed frames, 3,000 connections, huge, unsealed and shrinking memfds, another node's names, 250 descriptors on a frame, the region and session caps) and fills its writable directories and its memory at once. Meanwhile n1 streams two recoverable sessions and a reader asks the agent for n1's sensors every 20 ms. Reports each attack {name, succeeded, detail}, `succeeded` (must be 0), agent_answered_throughout, agent_read_p99_ms, other_node_healthy. About 10-20 s (root). 
    """
    from .scenarios import SCENARIOS

    result = SCENARIOS["hostile-node"]()
    _emit(result, as_json)
    if result["succeeded"] or not result["agent_answered_throughout"] \
            or not result["other_node_healthy"]:
        raise typer.Exit(1)


@scenario_app.command("warning")
def scenario_warning(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Two clusters warn each other over NATS: a fork bomb repaired in A, the signed warning arms B, an intruder's replayed and forged warnings are refused, the same bomb in B is killed on sight, before its pids limit.

    Two labs (each an agent, a node under a pids limit of 256, a service, its own etcd and two monitors sharing the node through it) and two NATS servers linked by a leaf node. An intruder on A's server replays the warning it heard, alters it to name B's service, signs such warnings with its own key, and sends bytes that are no warning. Reports first_cluster_repair_ms, second_cluster_repair_ms, second_cluster_service_impact (ms), warnings_sent, warnings_rejected (by reason), forged_rules_armed (must be 0), second_cluster_fork_failures (must be 0), second_cluster_killed_before_limit. About 25 s (root; etcd-server, nats-server).
    """
    from .scenarios.warning import warning

    result = warning()
    _emit(result, as_json)
    if not result.get("second_cluster_killed_before_limit"):
        raise typer.Exit(1)


@scenario_app.command("fleet")
def scenario_fleet(
    monitors: int = typer.Option(3, help="Monitor processes sharing the nodes through etcd."),
    hosts: int = typer.Option(8, help="Hosts (one agent each)."),
    nodes: int = typer.Option(64, help="Nodes with services, spread over the hosts."),
    etcd_members: int = typer.Option(3, "--etcd-members", "--etcd", help="Members of the lab's etcd cluster (odd; 3 or more lets the schedule kill one)."),
    duration: float = typer.Option(60.0, help="Seconds of random faults."),
    poll_ms: float = typer.Option(250.0, help="The monitors' poll period, ms (they also act on the agents' pushed events)."),
    sample_period_s: float = typer.Option(0.25, help="The agents' kernel sampling period, s (their default, 0.05, takes ~1.5 cores at 64 nodes)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the fault schedule (reported)."),
    schedule: Optional[list[str]] = typer.Option(None, "--fault", help="A fault kind injected first, in order (repeat), before the random ones: fork-bomb, memory-hog, freeze, monitor-kill, monitor-stop, monitor-cut, etcd-kill."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """A fleet of monitors under random faults of its nodes (fork bomb, memory hog, freeze), of its monitors (SIGKILL; SIGSTOP longer than its lease, then SIGCONT; cut off from etcd by nftables) and of its etcd (a member SIGKILLed, then restarted).

    Reports faults_injected, faults_handled, missed (must be 0), takeover_ms_p99, stale_token_ops_refused, stale_token_ops_applied (must be 0), double_acted (must be 0), from the agents' ownership, the monitors' incident logs and the agents' audit logs (root; etcd-server, nftables).
    """
    from .scenarios.fleet import fleet

    if not (1 <= poll_ms <= 60000 and 0.005 <= sample_period_s <= 10):
        raise typer.BadParameter("--poll-ms must be within 1..60000 and --sample-period-s "
                                 "within 0.005..10")
    result = fleet(monitors=monitors, hosts=hosts, nodes=nodes, etcd_members=etcd_members,
                   duration_s=duration, poll_ms=poll_ms, sample_period_s=sample_period_s,
                   seed=seed, schedule=schedule or (),
                   progress=lambda line: err.print(line, highlight=False))
    _emit(result, as_json)
    if result["missed"] or result["stale_token_ops_applied"] or result["double_acted"]:
        raise typer.Exit(1)


# ---- benchmarks -----------------------------------------------------------------------


def _bench_module(name: str):
    """Import bench/<name>.py of the source checkout the package is installed from.

    The benchmarks are not installed. Their checkout is the one an editable install
    (`make venv`) records in the package's metadata (PEP 610 direct_url.json); without
    one, a one-line error says so.
    """
    import importlib.util
    from importlib.metadata import PackageNotFoundError, distribution
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    try:
        origin = json.loads(distribution("backdoors").read_text("direct_url.json") or "{}")
    except (PackageNotFoundError, ValueError):
        origin = {}
    url = urlparse(origin.get("url", ""))
    path = Path(unquote(url.path)) / "bench" / f"{name}.py"
    if not (origin.get("dir_info", {}).get("editable") and url.scheme == "file" and path.is_file()):
        raise BackdoorsError(
            "`backdoors bench` runs the benchmarks of a source checkout, and this backdoors is "
            "not installed from one: clone backdoors, `make venv`, then `make bench` there"
        )
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@bench_app.command("sensors")
def bench_sensors(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    number: int = typer.Option(1_000_000, help="Calls per timing loop."),
) -> None:
    """Cost of a sensor update vs prometheus_client and a Unix datagram, in ns."""
    result = _bench_module("bench_sensors").run(number)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        t = Table("measure", "value")
        for k, v in result.items():
            t.add_row(k, f"{v:.1f}" if isinstance(v, float) else str(v))
        out.print(t)


@bench_app.command("repair")
def bench_repair(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    wedge_cap_s: float = typer.Option(30.0, help="Cap of the pids-limit-only baseline, seconds."),
) -> None:
    """Memory hog and fork bomb: backdoors vs the kernel OOM killer, kill-largest, pids limit."""
    _emit(_bench_module("bench_repair").run(wedge_cap_s=wedge_cap_s), as_json)


@bench_app.command("detection")
def bench_detection(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    soak_seconds: float = typer.Option(60.0, help="False-positive soak under full CPU and memory load."),
    trials: int = typer.Option(20, help="Hangs per deadline."),
    period_ms: float = typer.Option(50.0, help="Monitor poll period."),
    faults: str = typer.Option("hang,crash,freeze,link_down,memory,forks", help="Faults to time, comma-separated: hang, crash, freeze, link_down, memory, forks."),
    modes: str = typer.Option("event,poll", help="event (pushed by the agent), poll, or both."),
) -> None:
    """Detection latency p50/p99 per fault, deadline and mode (event vs poll, side by side), and false positives under load."""
    bench = _bench_module("bench_detection")
    chosen, how = tuple(f for f in faults.split(",") if f), tuple(m for m in modes.split(",") if m)
    if not chosen or set(chosen) - set(bench.FAULTS) or not how or set(how) - {"event", "poll"}:
        raise typer.BadParameter(f"--faults: some of {', '.join(bench.FAULTS)}; --modes: "
                                 "event, poll or both")
    _emit(bench.run(soak_seconds=soak_seconds, trials=trials, period_ms=period_ms,
                    faults_=chosen, modes=how), as_json)


@bench_app.command("agent")
def bench_agent(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    seconds: float = typer.Option(3.0, help="Seconds of reads per condition."),
) -> None:
    """Agent RPC read latency while the node is idle, frozen, memory-hogged, fork-bombed."""
    _emit(_bench_module("bench_agent").run(seconds=seconds), as_json)


@bench_app.command("recovery")
def bench_recovery(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    sessions: list[int] = typer.Option([1, 10, 100, 1000, 10000], help="Session counts (repeat the option)."),
    haproxy: bool = typer.Option(True, "--haproxy/--no-haproxy", help="Measure the HAProxy peer too."),
) -> None:
    """Recovery of N sessions from a frozen node vs HAProxy; overhead of Continuation Boxes."""
    _emit(_bench_module("bench_recovery").run(tuple(sessions), with_haproxy=haproxy), as_json)


@bench_app.command("nonintrusive")
def bench_nonintrusive(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """System calls and throughput of a service watched at 100 Hz vs not watched."""
    _emit(_bench_module("bench_nonintrusive").run(), as_json)


@bench_app.command("fleet")
def bench_fleet(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    trials: int = typer.Option(10, help="Monitor SIGKILLs."),
    monitors: int = typer.Option(3, help="Monitor processes of the fleet."),
    nodes: int = typer.Option(16, help="Lab nodes (on 2 hosts) they share."),
) -> None:
    """A fleet of monitors through etcd: takeover p50/p99 from a monitor's SIGKILL to its
    nodes claimed by the others (root; etcd-server)."""
    _emit(_bench_module("bench_fleet").run(trials=trials, monitors=monitors, nodes=nodes),
          as_json)


@bench_app.command("monitor")
def bench_monitor(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    sizes: str = typer.Option("8,32,128", help="Node counts of the labs, comma-separated."),
    modes: str = typer.Option("event,poll", help="Detection modes measured: event, poll or both."),
    seconds: float = typer.Option(10.0, help="Steady-state CPU window per size, seconds."),
    trials: int = typer.Option(20, help="Hangs per size."),
    period_ms: float = typer.Option(50.0, help="Monitor poll period."),
    hosts: int = typer.Option(1, help="Agents (lab hosts) the nodes are spread over."),
    event_poll_ms: float = typer.Option(1000.0, help="Monitor poll period in event mode (liveness, fallback)."),
    event_sample_s: float = typer.Option(1.0, help="Agents' kernel sampling period in event mode."),
) -> None:
    """Monitor CPU, agent CPU per node and hang detection p50/p99 per lab size, event
    mode (the agent pushes violations) and poll mode."""
    mod = _bench_module("bench_monitor")
    import logging
    logging.getLogger("backdoors.monitor").setLevel(logging.ERROR)  # the trials' incidents
    try:
        result = mod.run(sizes=mod.parse_sizes(sizes), modes=mod.parse_modes(modes),
                         seconds=seconds, trials=trials, period_ms=period_ms, hosts=hosts,
                         event_poll_ms=event_poll_ms, event_sample_s=event_sample_s)
    except ValueError as e:
        raise BackdoorsError(f"bench monitor: {e}") from None
    if as_json:
        print(json.dumps(result, indent=2))
        return
    t = Table("nodes", "mode", "monitor CPU %", "agent CPU % per node", "detect p50 ms",
              "detect p99 ms", "trials", "polls/s")
    for r in result["results"]:
        t.add_row(str(r["nodes"]), r["mode"], str(r["monitor_cpu_pct"]),
                  str(r["agent_cpu_pct_per_node"]), str(r["detect_p50_ms"]),
                  str(r["detect_p99_ms"]), str(r["trials"]), str(r["polls_per_s"]))
    out.print(t)
    for r in result["results"]:
        for e in r["errors"]:
            err.print(cell(f"{r['nodes']} nodes: {e}"))


# ---- demo -----------------------------------------------------------------------------


@app.command()
def report(
    demo_dir: Optional[str] = typer.Option(None, help="A demo run (default: the newest under out/demo)."),
    bench_dir: Optional[str] = typer.Option(None, help="Benchmark JSON folder (default: out/bench)."),
    incidents: Optional[str] = typer.Option(None, help="Incident log (default: the demo's)."),
    out: str = typer.Option("out/report.html", help="Where to write the HTML file."),
) -> None:
    """Write a self-contained HTML report (plots of repair, recovery, overhead; incidents).
    It reads incident logs and benchmark JSON; it never re-measures."""
    from .report import build_report

    path = build_report(demo_dir=demo_dir, bench_dir=bench_dir, incidents=incidents, out=out)
    err.print(f"report written: {path}")


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="One repair, a recovery, an agent restart and another recovery."),
    scenario: Optional[str] = typer.Option(None, help="Run one scenario: memory-hog, fork-bomb, deadlock, freeze, agent-restart, crash, network; or auction (the case study's auction site: a front end freezes under locust's load); or vm (the VM backdoor: a guest kernel rootkit healed, a memory hog and a fork bomb in the guest foreseen and killed; needs make vm-kernel)."),
    name: str = typer.Option("demo", help="Lab name."),
    out_dir: str = typer.Option("out/demo", help="Where results, incidents and the report go."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write the HTML report at the end."),
) -> None:
    """Build a lab with agents, a monitor and live sessions; repair, detect and recover in turn."""
    from .demo import run_demo

    result = run_demo(name=name, quick=quick, scenario=scenario, out_root=out_dir, report=report)
    if not result["passed"]:
        raise typer.Exit(1)


def _print_error(e: BackdoorsError) -> None:
    """One line on stderr, the message verbatim (brackets in it are not markup)."""
    err.print(Text("error:", "bold red") + " " + cell(e), highlight=False, soft_wrap=True)


class _Terminated:
    """SIGTERM or SIGHUP ends the command as Ctrl-C would, once: its finally blocks run, so
    a scenario, a benchmark or the demo tears its lab down (exit status 128+N). A second
    signal does not cut the teardown short (SIGKILL does; the next lab start reaps what is
    left). A child forked by this process (pyroute2's netns helpers, a test's fork) keeps
    the handler: there the signal kills as by default, or the child would unwind into this
    process's code and tear the lab down under it.

    The handler runs between any two bytecodes, also inside a __del__, a weakref callback
    or a generator the garbage collector finalizes; what it raises there Python prints and
    drops (sys.unraisablehook), and the command would run on. `unraisable`, installed as
    that hook, sees the dropped exit and has the signal delivered again just after, until
    a handler raises it where it counts (not inside the hook itself).

    `exit(signum)` makes what is raised: SystemExit(128+N) unless given (a test run raises
    KeyboardInterrupt, which pytest stops on, tearing its fixtures down)."""

    def __init__(self, exit=None) -> None:
        self.owner, self.began = os.getpid(), False
        self.exit = exit or (lambda signum: SystemExit(128 + signum))
        self.exiting: BaseException | None = None
        self.signum = 0
        self.hook = sys.unraisablehook

    def install(self) -> dict:
        """Handle SIGTERM and SIGHUP (those left at their default) and the dropped exits;
        returns what `uninstall` restores."""
        import signal

        before = {}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                before[sig] = signal.signal(sig, self)
        sys.unraisablehook = self.unraisable
        return before

    def uninstall(self, before: dict) -> None:
        import signal

        for sig, old in before.items():
            signal.signal(sig, old)
        sys.unraisablehook = self.hook

    def __call__(self, signum: int, frame) -> None:
        import signal

        if os.getpid() != self.owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if _within(frame, _Terminated.unraisable.__code__):
            return  # raised in the hook, the exit would be dropped for good: sent again
        if self.began:
            err.print("already tearing down (SIGKILL abandons it)", highlight=False)
            return
        self.began = True
        err.print(f"{signal.Signals(signum).name}: tearing down", highlight=False)
        self.exiting, self.signum = self.exit(signum), signum
        raise self.exiting

    def unraisable(self, info) -> None:
        if self.exiting is None or info.exc_value is not self.exiting:
            return self.hook(info)
        self.exiting, self.began = None, False
        self._again(self.signum)

    def _again(self, signum: int) -> None:
        """Deliver `signum` to this process again every 10 ms until a handler raises its
        exit outside a finalizer or this hook (on a loaded machine the first may come
        while the hook still runs)."""
        import threading
        import time

        def resend() -> None:
            while True:
                time.sleep(0.01)
                if self.began:
                    return
                os.kill(os.getpid(), signum)

        threading.Thread(target=resend, name="bd-resignal", daemon=True).start()


def _within(frame, code) -> bool:
    """Whether `frame` or one of its callers runs `code`."""
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def main() -> None:
    # Commands that hold on (the agent, a monitor, a lab in the foreground) set their own;
    # the handlers before are restored at the end (main() called in-process, by a test).
    handler = _Terminated()
    before = handler.install()
    try:
        app()
    except NeedRootError as e:
        _print_error(e)
        sys.exit(77)
    except BackdoorsError as e:
        _print_error(e)
        sys.exit(1)
    finally:
        handler.uninstall(before)
