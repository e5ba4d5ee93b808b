"""Which of a guest's processes are its service: the ones a kill must spare.

There is no agent inside a guest for the service to register with, and a comm is a
process's own choice (prctl PR_SET_NAME, a write to /proc/self/comm, or a file of that
name to exec): a runaway named `httpd` would be spared and the next largest process
killed in its stead. So a name in `protect` stands for one tree of processes: the
oldest process of that comm (the service, started when the guest booted, before anything
could take its name) and those forked from it, parent to child, that still carry its
comm and its exec -- the same `mm->exe_file`, which a fork shares and every exec
replaces: its workers, running the code it runs. A process of that name elsewhere, or
one that exec'd anything since (a CGI program, a script run as `httpd` by the same
interpreter, even the service's own file again), is not the service.

What this cannot tell apart: several independent instances of one name (only the
oldest's tree is the service), and a service restarted after boot when an older process
of its name lives on (that one is the oldest). Rows without start times and execs (0:
from an older agent) make the service the lowest pid's tree of the name.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol


class Row(Protocol):
    """A process of a guest's table (vm.memory.GuestTask, agent.protocol.GuestProcess)."""

    pid: int
    ppid: int
    comm: str
    start_ns: int
    exe: int


def service(rows: Iterable[Row], protect: Collection[str]) -> set[int]:
    """The pids of the service processes of each comm in `protect` (see above)."""
    rows = [r for r in rows if r.comm in protect]
    children: dict[int, list[Row]] = {}
    for r in rows:
        children.setdefault(r.ppid, []).append(r)
    out: set[int] = set()
    for comm in set(protect):
        named = [r for r in rows if r.comm == comm]
        if not named:
            continue
        root = min(named, key=lambda r: (r.start_ns, r.pid))
        todo = [root]
        while todo:
            r = todo.pop()
            if r.pid not in out:
                out.add(r.pid)
                todo += [c for c in children.get(r.pid, ()) if c.comm == comm and c.exe == root.exe]
    return out
