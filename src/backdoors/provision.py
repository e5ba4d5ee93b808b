"""Hand-made nodes on a real host: what `backdoors node create|run|delete` do.

A hand-made node is a cgroup with a directory in every hierarchy of the host's layout
(hybrid: memory, pids, freezer, cpu, cpuacct and the controller-less v2 one; unified: one v2
directory), and optionally a network namespace joined to the host by a veth, whose host end
may be a port of a bridge, with addresses and a default route. It is not a container: its
processes share the host's PID, mount and user namespaces (docs/operations.md, "Node
isolation").

`create` writes a record of what it made (`RECORDS/NAME.json`) before making each object,
so `delete` removes exactly that, also after a `create` killed half way, and refuses a node
it did not make. `run` starts a command inside (every hierarchy and the netns), optionally
as another user and under catatonit, which reaps the orphans a fork bomb leaves.
"""

from __future__ import annotations

import errno
import json
import ipaddress
import os
import pwd
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import msgspec

from . import net
from .agent.config import NODE_NAME
from .common.runtime import service_env
from .errors import NetError, NodeError, require_root
from .nodes import Cgroup, Layout, Node, detect

#: Where `create` records what it made, one JSON file per node (gone at reboot, like them).
RECORDS = Path("/run/backdoors-nodes")
#: The agent's default run directory: <run_dir>/<node>/agent.sock.
RUN_DIR = "/run/backdoors"
IFNAMSIZ = 15

_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(i?B?)", re.IGNORECASE)


class Record(msgspec.Struct, forbid_unknown_fields=True):
    """What `create` made for node `name` (and so what `delete` may remove)."""

    name: str
    cgroup: str
    #: cgroup directories made, parents before children, in every hierarchy
    dirs: list[str] = []
    memory: int | None = None
    pids: int | None = None
    netns: str | None = None
    made_netns: bool = False
    interface: str = "eth0"
    veth: str | None = None  # its host end, once made
    bridge: str | None = None
    addresses: list[str] = []
    gateway: str | None = None


def parse_size(text: str) -> int:
    """Bytes from "2G", "512M", "1024K" or "1048576" (K, M, G, T are powers of 1024)."""
    m = _SIZE.fullmatch(text.strip())
    if not m or int(m.group(1)) == 0:
        raise NodeError(f"invalid memory size {text!r}: give a positive size like 2G, 512M "
                        "or 1048576 (bytes)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def record_path(name: str, records: Path = RECORDS) -> Path:
    _check_name(name)
    return records / f"{name}.json"


def load(name: str, records: Path = RECORDS, hint: str = "") -> Record:
    """The record of node `name`; NodeError (with `hint`) if `backdoors node create` did not
    make it."""
    path = record_path(name, records)
    try:
        return msgspec.json.decode(path.read_bytes(), type=Record)
    except FileNotFoundError:
        raise NodeError(f"node {name} was not made by `backdoors node create` on this host "
                        f"(no record {path}){hint}") from None
    except (OSError, msgspec.DecodeError) as e:
        raise NodeError(f"cannot read the record of node {name} ({path}): {e}") from None


def _save(rec: Record, records: Path) -> None:
    records.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = record_path(rec.name, records)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(rec))
    os.replace(tmp, path)


def _check_name(name: str) -> None:
    if not NODE_NAME.fullmatch(name) or name.startswith("."):
        raise NodeError(f"invalid node name {name!r}: 1-24 of A-Z a-z 0-9 _ . - "
                        "(not starting with '.')")


def _dirs_to_make(cgroup: Cgroup) -> list[Path]:
    """The directories of `cgroup` (parents included) missing in each hierarchy."""
    out = []
    for mount in cgroup.layout.hierarchies().values():
        path = mount
        for part in cgroup.relpath.split("/"):
            path = path / part
            if not path.is_dir():
                out.append(path)
    return out


def _shared_parents(cgroup: Cgroup, records: Path) -> list[Path]:
    """The existing parent directories of `cgroup` that another node's `create` made: they
    are this node's too, so that whichever node is deleted last removes them (`backdoors/`
    of web0 and api0)."""
    made = set()
    for path in records.glob("*.json") if records.is_dir() else ():
        try:
            made.update(msgspec.json.decode(path.read_bytes(), type=Record).dirs)
        except (OSError, msgspec.DecodeError):
            continue  # not ours to judge: that directory stays
    out = []
    for mount in cgroup.layout.hierarchies().values():
        path = mount
        for part in cgroup.relpath.split("/")[:-1]:
            path = path / part
            if path.is_dir() and str(path) in made:
                out.append(path)
    return out


def _check_bridge(bridge: str) -> None:
    try:
        info = net.link_info(None, bridge)
    except NetError as e:
        raise NodeError(f"--bridge {bridge}: {e}; create it (ip link add {bridge} type "
                        "bridge) or leave --bridge out") from None
    if info.kind != "bridge":
        raise NodeError(f"--bridge {bridge}: {bridge} in the host's network namespace is a "
                        f"{info.kind or 'plain'} interface, not a bridge")


def create(name: str, *, cgroup: str | None = None, memory: int | None = None,
           pids: int | None = None, netns: str | None = None, addresses: Sequence[str] = (),
           bridge: str | None = None, gateway: str | None = None, interface: str = "eth0",
           veth: str | None = None, records: Path = RECORDS,
           layout: Layout | None = None) -> Record:
    """Make node `name`: its cgroup in every hierarchy with the limits given, and with
    `netns` a network namespace, a veth (`interface` inside, `veth` on the host, default
    NAME-h, a port of `bridge` if given), `addresses` and a default route via `gateway`.

    Everything is checked before anything is made; what exists already is refused (it is
    someone else's). If a step fails, what was made is removed again.
    """
    _check_name(name)
    cgroup = cgroup or f"backdoors/{name}"
    if netns is None and (addresses or bridge or gateway or veth):
        raise NodeError("--address, --bridge, --gateway and --veth need --netns: they "
                        "configure the node's own network namespace")
    for cidr in addresses:
        try:
            ipaddress.ip_interface(cidr)
        except ValueError:
            raise NodeError(f"invalid address {cidr!r}: give ADDR/PREFIXLEN, like "
                            "10.20.0.10/24") from None
        if "/" not in cidr:
            raise NodeError(f"address {cidr!r} needs a prefix length, like {cidr}/24")
    if gateway is not None:
        try:
            ipaddress.ip_address(gateway)
        except ValueError:
            raise NodeError(f"invalid gateway {gateway!r}: give an address") from None
    veth = veth or (f"{name}-h" if netns is not None else None)
    for what, ifname in (("--veth", veth), ("--interface", interface)):
        if ifname is not None and not (0 < len(ifname) <= IFNAMSIZ and "/" not in ifname):
            raise NodeError(f"{what} {ifname!r}: interface names have 1-{IFNAMSIZ} "
                            "characters" + (" (pass a shorter --veth)" if what == "--veth" else ""))
    require_root(f"creating node {name}")
    layout = layout or detect()
    cg = Cgroup(cgroup, layout)
    path = record_path(name, records)
    if path.exists():
        raise NodeError(f"node {name} exists (record {path}): delete it first with "
                        f"`backdoors node delete {name}`")
    if cg.exists():
        found = ", ".join(str(p) for p in cg.paths.values() if p.is_dir())
        raise NodeError(f"cgroup {cg.relpath!r} exists already ({found}): it is not ours to "
                        "take over; pick another --cgroup, or remove it first")
    if netns is not None:
        if net.netns.exists(netns):
            raise NodeError(f"network namespace {netns!r} exists already: not ours to take "
                            "over; pick another --netns, or remove it (ip netns del)")
        if _host_link_exists(veth):
            raise NodeError(f"interface {veth!r} exists in the host's network namespace: "
                            "pass another --veth")
        if bridge is not None:
            _check_bridge(bridge)
    rec = Record(name, cg.relpath, memory=memory, pids=pids, netns=netns,
                 interface=interface, bridge=bridge, addresses=list(addresses),
                 gateway=gateway)
    try:
        rec.dirs = [str(p) for p in _shared_parents(cg, records) + _dirs_to_make(cg)]
        _save(rec, records)
        Node.create(name, cg.relpath, memory_limit=memory, pids_limit=pids, layout=layout)
        if netns is not None:
            rec.made_netns = True
            _save(rec, records)
            net.netns.create(netns)
            net.add_veth(None, veth, netns, interface, bridge=bridge)
            rec.veth = veth
            _save(rec, records)
            for cidr in addresses:
                net.add_address(netns, interface, cidr)
            if addresses:  # only the recovery's gratuitous ARP announces a moved address
                net.netns.set_sysctl(netns, f"net/ipv4/conf/{interface}/arp_announce", 2)
            if gateway is not None:
                net.add_route(netns, "default", gateway)
    except BaseException:
        _remove(rec, layout, records)
        raise
    return rec


def _host_link_exists(ifname: str | None) -> bool:
    if ifname is None:
        return False
    try:
        net.link_info(None, ifname)
    except NetError:
        return False
    return True


def _remove(rec: Record, layout: Layout, records: Path) -> dict:
    """Remove what `rec` says was made; returns what was removed and what was kept."""
    killed = []
    cg = Cgroup(rec.cgroup, layout)
    if cg.exists():
        killed = cg.kill_all()
        cg.destroy()
    kept = []
    for d in reversed(rec.dirs):  # children before parents
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EBUSY):
                raise NodeError(f"cannot remove cgroup {d}: {e.strerror}") from None
            kept.append(d)  # another node's cgroup lives under it
    if rec.veth is not None:
        net.remove_link(None, rec.veth)
    if rec.made_netns and rec.netns is not None:
        net.netns.remove(rec.netns)
    record_path(rec.name, records).unlink(missing_ok=True)
    return {"killed": killed, "cgroup": rec.cgroup, "netns": rec.netns if rec.made_netns
            else None, "veth": rec.veth, "kept": kept}


def delete(name: str, *, records: Path = RECORDS, layout: Layout | None = None) -> dict:
    """Kill what is left in node `name` and remove the cgroups, netns and veth `create`
    made; NodeError (nothing touched) if `create` did not make it."""
    rec = load(name, records, ": its cgroup and netns are not ours to remove; remove them "
               "the way they were made")
    require_root(f"deleting node {name}", "it removes cgroups and network namespaces")
    return _remove(rec, layout or detect(), records)


def run(name: str, argv: Sequence[str], *, user: str | None = None, init: bool = False,
        cgroup: str | None = None, netns: str | None = None, run_dir: str = RUN_DIR,
        records: Path = RECORDS) -> int:
    """Run `argv` inside node `name` (every hierarchy of its cgroup, its netns), as `user`
    if given, under catatonit with `init`; wait for it and return its exit status (128+N
    after signal N). This terminal's stdin, stdout and stderr; SIGTERM and SIGHUP are
    passed on; the command gets the node's agent socket variables unless already set.
    A node not made by `create` is named by `cgroup` (and `netns`)."""
    if not argv:
        raise NodeError("no command given: backdoors node run NAME -- CMD [ARGS...]")
    if cgroup is None:
        rec = load(name, records, ": for a node made otherwise give its --cgroup PATH "
                   "(and --netns NS)")
        cgroup, netns = rec.cgroup, rec.netns
    require_root(f"running a command in node {name}", "it enters the node's cgroups and namespaces")
    node = Node.open(name, cgroup, netns=netns)
    argv = list(argv)
    if init:
        catatonit = shutil.which("catatonit")
        if catatonit is None:
            raise NodeError("--init needs catatonit (Debian/Ubuntu/Fedora package "
                            "'catatonit'), which reaps the node's orphans")
        argv = [catatonit, "--", *argv]
    env = dict(os.environ)
    for key, value in service_env(f"{run_dir}/{name}/agent.sock").items():
        env.setdefault(key, value)
    uid = None
    if user is not None:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise NodeError(f"no user {user!r} on this host (getent passwd {user}): create "
                            "it (useradd --system NAME) or give another") from None
        uid = entry.pw_uid
        env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
    started: list[subprocess.Popen] = []

    def on_signal(sig: int, _frame) -> None:
        # SIGINT, SIGQUIT: the terminal sends them to the command too (same process group);
        # SIGTERM, SIGHUP (a supervisor's stop): passed on. A handler, unlike SIG_IGN, is
        # reset to the default in the command by exec.
        if started and sig in (signal.SIGTERM, signal.SIGHUP):
            started[0].send_signal(sig)

    sigs = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, on_signal) for s in sigs}
    try:
        started.append(node.run(argv, env=env, new_session=False, user=uid))
        code = started[0].wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code


def _toml(value: str) -> str:
    """A TOML basic string (a JSON string is one: quotes and controls escaped)."""
    return json.dumps(value)


def stanza(rec: Record) -> str:
    """The agent's config entry for node `rec`, TOML with comments, to paste."""
    lines = [
        "[[agent.nodes]]        # in /etc/backdoors/backdoors.toml ([[nodes]] in an agent-only file)",
        f"name = {_toml(rec.name)}",
        f"cgroup = {_toml(rec.cgroup)}",
    ]
    if rec.netns is not None:
        lines += [f"netns = {_toml(rec.netns)}", f"interface = {_toml(rec.interface)}"]
        if rec.addresses:
            lines.append("addresses = [" + ", ".join(_toml(a) for a in rec.addresses)
                         + "]   # keep only the service addresses that move on recovery")
    if rec.netns is None:
        lines += ['isolation = "trusted"   # no netns: it shares the host network, which the '
                  "agent's check refuses"]
    else:
        lines += ['# isolation = "trusted"   # only if its services must run as root '
                  '(docs/operations.md, Node isolation)']
    return "\n".join(lines) + "\n"


def what_it_is(rec: Record) -> str:
    """What the node is, and what the agent will say about it (for `node create`)."""
    return (
        f"node {rec.name} is a cgroup{' + netns' if rec.netns else ''} node, not a container: "
        "its processes share the host's PID, mount and user namespaces. The agent accepts it "
        "(without isolation = \"trusted\") only if "
        + ("it has a netns and " if rec.netns is None else "")
        + f"everything in it runs as an unprivileged user: `backdoors node run {rec.name} "
        "--user USER --init -- CMD`. For a real boundary run the service in a container "
        "runtime (docs/operations.md, Node isolation)."
    )

