"""Could a node reach its agent? The check the agent makes when it opens each node.

A node must not be able to silence or fool its agent. Three ways it could, each checked on
the processes the node's cgroup holds when the agent opens it (an empty node passes the
process checks: start the agent after the nodes' containers, as the lab does):

- **signal or ptrace the agent**: a process in the agent's PID namespace *and* its user
  namespace that is root or holds CAP_KILL or CAP_SYS_PTRACE (in a user namespace of its
  own, root has no power over host processes);
- **write the agent's cgroup** (freeze, limit or kill it through cgroupfs): a process whose
  credentials pass the permission check of the agent's cgroup.procs, cgroup.freeze,
  freezer.state, cgroup.kill, memory or pids limit files (owner, group and mode bits;
  CAP_DAC_OVERRIDE counts in the host's user namespace, or in its own when it maps the
  file's owner);
- **reach the private network**: the node shares the host's network namespace (no `netns`
  in its config) or one of its processes is in the agent's network namespace or the one
  it listens in.

`check_node` returns the reasons, each one sentence; `refusal` words the error the agent
stops with. A node configured with `isolation = "trusted"` is not checked.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import AgentError
from ..nodes import Node

CAP_DAC_OVERRIDE = 1
CAP_KILL = 5
CAP_SYS_PTRACE = 19
#: cgroupfs files through which a process could stop, limit or kill the agent
_CONTROL_FILES = ("cgroup.procs", "cgroup.freeze", "cgroup.kill", "freezer.state",
                  "memory.limit_in_bytes", "memory.max", "pids.max", "cpu.max",
                  "cpu.cfs_quota_us")


@dataclass(frozen=True)
class Creds:
    """What the kernel checks of a process, read from the host's /proc."""

    pid: int
    comm: str
    euid: int
    egid: int
    groups: frozenset[int]
    cap_eff: int
    userns: str
    pidns: str
    netns: str
    uid_map: tuple[tuple[int, int], ...]  # (first host id, count) mapped into its userns
    gid_map: tuple[tuple[int, int], ...]

    def has(self, cap: int) -> bool:
        return bool(self.cap_eff >> cap & 1)


def _ns(pid: int | str, name: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{name}")


def _id_map(pid: int, name: str) -> tuple[tuple[int, int], ...]:
    out = []
    with open(f"/proc/{pid}/{name}") as f:
        for line in f:
            _inside, outside, count = (int(x) for x in line.split())
            out.append((outside, count))
    return tuple(out)


def read_creds(pid: int) -> Creds | None:
    """The credentials and namespaces of host process `pid`; None if it has exited."""
    try:
        fields = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        return Creds(
            pid, fields.get("Name", "?"), int(fields["Uid"].split()[1]),
            int(fields["Gid"].split()[1]),
            frozenset(int(g) for g in fields.get("Groups", "").split()),
            int(fields["CapEff"], 16), _ns(pid, "user"), _ns(pid, "pid"), _ns(pid, "net"),
            _id_map(pid, "uid_map"), _id_map(pid, "gid_map"))
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _mapped(host_id: int, id_map: tuple[tuple[int, int], ...]) -> bool:
    return any(first <= host_id < first + count for first, count in id_map)


def can_write(c: Creds, st: os.stat_result, host_userns: str) -> bool:
    """Would the kernel let `c` open a file with stat `st` for writing (permission bits and
    CAP_DAC_OVERRIDE; ACLs and LSMs aside)?"""
    if c.has(CAP_DAC_OVERRIDE) and (c.userns == host_userns or (
            _mapped(st.st_uid, c.uid_map) and _mapped(st.st_gid, c.gid_map))):
        return True
    if st.st_uid == c.euid:
        return bool(st.st_mode & stat.S_IWUSR)
    if st.st_gid == c.egid or st.st_gid in c.groups:
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)


def agent_cgroup_files(cgroup_dirs: list[Path]) -> list[tuple[Path, os.stat_result]]:
    """The control files of the agent's cgroup directories, with their stat."""
    out = []
    for d in cgroup_dirs:
        for name in _CONTROL_FILES:
            try:
                out.append((d / name, os.stat(d / name)))
            except OSError:
                pass
    return out


def own_cgroup_dirs(node: Node, relpaths: list[str]) -> list[Path]:
    """The directories of cgroups `relpaths` (e.g. the agent's own) in every hierarchy of
    the node's layout, those that exist."""
    out = []
    for rel in relpaths:
        for mount in node.cgroup.layout.hierarchies().values():
            path = mount / rel.strip("/")
            if rel.strip("/") and path.is_dir() and path not in out:
                out.append(path)
    return out


def self_cgroup_relpaths() -> list[str]:
    """The agent's current cgroups (one path per hierarchy), from /proc/self/cgroup."""
    out = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                path = line.rstrip("\n").split(":", 2)[-1]
                if path.strip("/") and path not in out:
                    out.append(path)
    except OSError:
        pass
    return out


def check_node(node: Node, *, agent_cgroups: list[str], agent_netns: str | None) -> list[str]:
    """The ways node `node` could reach the agent (this process), one sentence each; []
    when it is isolated. `agent_cgroups`: the agent's cgroup paths (relative); `agent_netns`:
    the named netns the agent listens in, if any."""
    reasons = []
    if node.netns is None:
        reasons.append("it shares the host's network namespace (no netns configured), so it "
                       "can reach the private network: give it a network namespace of its own")
    me = os.getpid()
    host_userns, host_pidns = _ns(me, "user"), _ns(me, "pid")
    agent_nets = {_ns(me, "net")}
    if agent_netns is not None:
        try:
            agent_nets.add(f"net:[{os.stat(f'/var/run/netns/{agent_netns}').st_ino}]")
        except OSError:
            pass
    files = agent_cgroup_files(own_cgroup_dirs(node, agent_cgroups))
    seen: set[str] = set()

    def once(kind: str, sentence: str) -> None:
        if kind not in seen:
            seen.add(kind)
            reasons.append(sentence)

    for pid in node.cgroup.procs():
        c = read_creds(pid)
        if c is None or pid == me:
            continue
        who = f"process {c.pid} ({c.comm}, uid {c.euid})"
        if c.pidns == host_pidns and c.userns == host_userns and (
                c.euid == 0 or c.has(CAP_KILL) or c.has(CAP_SYS_PTRACE)):
            once("pid", f"{who} runs as root in the agent's PID namespace, so it can signal "
                 "and ptrace the agent: give the node a PID namespace of its own and run it "
                 "as an unprivileged uid or in a user namespace (PrivatePIDs=, "
                 "PrivateUsers=, User=)")
        writable = [str(path) for path, st in files if can_write(c, st, host_userns)]
        if writable:
            once("cgroup", f"{who} can write the agent's cgroup ({writable[0]}), so it can "
                 "freeze, limit or kill the agent: run it as a uid that does not own the "
                 "cgroupfs, without CAP_DAC_OVERRIDE over it (a user namespace)")
        if c.netns in agent_nets:
            once("net", f"{who} shares the agent's network namespace, so it can reach the "
                 "private network: give the node a network namespace of its own")
    return reasons


def refuse_unisolated(name: str, node: Node, *, own_cgroup: str, netns: str | None) -> None:
    """AgentError (see refusal) if node `name` could reach the agent, whose configured cgroup
    is `own_cgroup` and private-network namespace `netns`."""
    reasons = check_node(node, agent_cgroups=[own_cgroup, *self_cgroup_relpaths()],
                         agent_netns=netns)
    if reasons:
        raise AgentError(refusal(name, reasons))


def refusal(name: str, reasons: list[str]) -> str:
    """The message the agent stops with when node `name` could reach it."""
    return (f"node {name} could reach the agent: {'; '.join(reasons)}. Isolate the node "
            "(docs/operations.md, \"Node isolation\"), or, if it runs only what you trust "
            f"as much as the agent, say isolation = \"trusted\" in its [[nodes]] entry")
