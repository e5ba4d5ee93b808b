"""Is the process at the other end of a node's Unix socket the agent? The node side's check.

A recovery server hands its clients' sessions to nobody, but it *receives* them from
whoever connects to its adoption socket, and a service hands its regions and session
sockets to whoever listens at its `agent.sock`. Inside a node both paths are reachable by
the node's own processes (the run directory is the node's, so it can even replace
`agent.sock`). The node side therefore checks the peer's kernel credentials (SO_PEERCRED,
translated by the kernel into this process's PID and user namespaces) against what only
the agent can look like from here:

- **outside this PID namespace** (SO_PEERCRED pid 0: the kernel shows 0 for a process not
  visible here) and **root, or unmapped here** (uid 0, or the overflow uid that an id of
  an outer user namespace shows as): the agent seen from inside a container node. Every
  process of the node, its nested namespaces included, has a visible pid and one of the
  node's own uids.
- or **root in the initial user namespace** with a visible pid: the agent of a node that
  shares its PID namespace (a hand-made node, `isolation = "trusted"` or one without a PID
  namespace of its own). The agent's node check refuses nodes whose processes are root in
  its namespaces (agent/isolation.py), so no process of a checked node looks like this.

Where the kernel offers SO_PEERPIDFD (Linux 6.5+), the pid its pidfd shows here (fdinfo
`Pid:`; -1 once the peer exited) must agree with SO_PEERCRED's. Light (stdlib and
common.ipc): services import it through common.runtime.
"""

from __future__ import annotations

import os
import socket
import struct

from .ipc import peer_credentials

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+


def _overflow_uid() -> int:
    try:
        with open("/proc/sys/kernel/overflowuid") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65534


_INITIAL_USERNS: dict[int, bool] = {}  # this process's user namespace (inode) -> the answer


def _initial_userns() -> bool:
    """True if this process is in the initial user namespace (the identity map). Kept
    per user namespace, read first at import: a server out of descriptors (EMFILE) when
    it checks a peer could not open the map then, and would refuse the agent."""
    try:
        ns = os.stat("/proc/self/ns/user").st_ino  # (no descriptor needed)
        if ns not in _INITIAL_USERNS:
            with open("/proc/self/uid_map") as f:
                _INITIAL_USERNS[ns] = f.read().split() == ["0", "0", "4294967295"]
        return _INITIAL_USERNS[ns]
    except OSError:
        return False  # not known now: refused, asked again next time


def _pidfd_pid(sock: socket.socket) -> int | None:
    """The peer's pid as its SO_PEERPIDFD pidfd shows it here (0: outside this PID
    namespace, -1: exited), or None where the kernel has no SO_PEERPIDFD."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4)
    except OSError:
        return None
    pidfd = struct.unpack("i", raw)[0]
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(pidfd)
    return None


def not_the_agent(sock: socket.socket) -> str | None:
    """Why the peer of the connected Unix socket `sock` cannot be the agent (one sentence
    naming its pid and uid as seen here), or None if it can (the rules above)."""
    pid, uid, _ = peer_credentials(sock)
    seen = _pidfd_pid(sock)
    if seen is not None and seen not in (pid, -1):
        return f"the peer's pidfd shows pid {seen} but SO_PEERCRED pid {pid}"
    if pid == 0:
        if uid in (0, _overflow_uid()):
            return None
        return (f"the peer is outside this PID namespace but runs as uid {uid} of this user "
                "namespace, not as root or an unmapped uid")
    if uid == 0 and _initial_userns():
        return None
    return (f"the peer (pid {pid}, uid {uid}) is a process of this node: its pid is visible "
            "here and it is not root in the initial user namespace")


_initial_userns()
