"""Misbehaving programs the lab starts inside a node to inject faults.

    python -m backdoors.lab.hogs memory --rate-mb 40 --cap-mb 400 [--forks | --spread]
                                        [--register NAME]
    python -m backdoors.lab.hogs cache --mb 256
    python -m backdoors.lab.hogs forkbomb [--shape tree|orphans|threads|spawner|sessions|zombies]
                                          [--after S] [--register NAME]
    python -m backdoors.lab.hogs cpu --procs 2

Each sets its process name (comm) to `bd-<kind>` so the lab can find and stop it by name,
without remembering pids across commands.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import sys
import threading
import time

_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)

BOMB_SHAPES = ("tree", "orphans", "threads", "spawner", "sessions", "zombies")
COMM = {"memory": "bd-memhog", "cache": "bd-cache", "forkbomb": "bd-forkbomb", "cpu": "bd-cpuhog"}


def set_comm(name: str) -> None:
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def hold_forever() -> None:
    while True:
        time.sleep(3600)


#: a spread hog's processes each grow this fast: under the default memory-hog bound (1 MB/s)
SPREAD_RATE_MB = 0.7


def memory(rate_mb: float, cap_mb: float, step: float = 0.05, forks: bool = False,
           spread: bool = False, register: str | None = None, after: float = 0.0) -> None:
    """Grow resident memory by `rate_mb` MB/s up to `cap_mb`, touching every page.
    `forks`: by forking instead, a child every 0.25 s that allocates its share and holds
    it (no process grows for long). `spread`: by orphans instead (each double-forked, in a
    session of its own), one every 0.2 s, each growing SPREAD_RATE_MB MB/s: no process is
    a hog alone, and they make no family. `register`: first register a Sensor Box of that
    name with the node's agent, as the service does (a hog passing itself off as it).
    `after`: seconds of quiet first (a spawner slow to start)."""
    box = _registered(register)  # noqa: F841 (held)
    time.sleep(after)
    if spread:
        count = max(1, round(rate_mb / SPREAD_RATE_MB))
        for _ in range(count):
            child = os.fork()
            if child == 0:
                os.setsid()
                if os.fork() == 0:
                    _grow(SPREAD_RATE_MB, cap_mb / count, step)
                os._exit(0)
            os.waitpid(child, 0)
            time.sleep(0.2)
        hold_forever()
    if forks:
        per_child, held = int(rate_mb * 2**20 * 0.25), 0
        while held < cap_mb * 2**20:
            if os.fork() == 0:
                data = bytearray(b"\1") * per_child  # noqa: F841 (held)
                hold_forever()
            held += per_child
            time.sleep(0.25)
        hold_forever()
    _grow(rate_mb, cap_mb, step)


def _registered(name: str | None):
    """A Sensor Box `name` registered with the node's agent, as the service registers
    its own (None: none); the caller holds it for as long as it runs."""
    if not name:
        return None
    from ..common.runtime import register_box
    from ..sensors import SensorBox

    box = SensorBox.create(name)
    register_box(box)
    return box


def _grow(rate_mb: float, cap_mb: float, step: float) -> None:
    """Allocate `rate_mb` MB/s (written, so resident) up to `cap_mb`, then hold it."""
    chunks = []
    per_step = max(1, int(rate_mb * 2**20 * step))
    held = 0
    next_at = time.monotonic()
    while held < cap_mb * 2**20:
        chunks.append(bytearray(b"\1") * per_step)  # written, so resident
        held += per_step
        next_at += step
        time.sleep(max(0.0, next_at - time.monotonic()))
    hold_forever()


def cache(mb: float) -> None:
    """A legitimate, stable cache: allocate once and keep it."""
    data = bytearray(b"\2") * int(mb * 2**20)  # noqa: F841 (held)
    print("ready", flush=True)
    hold_forever()


def forkbomb(shape: str = "tree", after: float = 0.0, register: str | None = None) -> None:
    """Fork without end; every process keeps forking, none ever exits on its own.

    "tree": the root is a child subreaper, so the lineage stays one tree even if a member
    is killed. "orphans": each fork is a double fork (the child forks the next bomb
    process and exits at once), so every bomb process is orphaned to the node's init as
    soon as it is born and no two of them share a tree. "threads": one process starts
    threads without end (each sleeps), no process is born. "spawner": one process starts
    `sleep` processes without end (another program, in its process group, as a shell or
    subprocess starts them) and reaping those that end; "sessions": the same, each in a
    session of its own; "zombies": as "sessions", never reaping. `after`: seconds of
    quiet first (a process that ran a while before it turned into a bomb). `register`:
    first register a Sensor Box of that name, as memory() does.
    """
    box = _registered(register)  # noqa: F841 (held)
    time.sleep(after)
    if shape == "threads":
        _thread_bomb()
    if shape in ("spawner", "sessions", "zombies"):
        _spawner(setsid=shape != "spawner", reap=shape != "zombies")
    if shape == "tree":
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    while True:
        try:
            pid = os.fork()
        except OSError:
            time.sleep(0.001)  # the pids limit: keep trying, as a real bomb does
            continue
        if shape != "orphans":
            continue
        if pid != 0:
            os.waitpid(pid, 0)
            continue
        try:  # the child: fork the next bomb process, which the node's init inherits
            if os.fork() != 0:
                os._exit(0)
        except OSError:
            os._exit(1)


def _thread_bomb() -> None:
    while True:
        try:
            threading.Thread(target=hold_forever, daemon=True).start()
        except RuntimeError:  # "can't start new thread": the pids limit
            time.sleep(0.001)


def _spawner(setsid: bool, reap: bool) -> None:
    sleep = shutil.which("sleep") or "/bin/sleep"
    while True:
        try:
            os.posix_spawn(sleep, [sleep, "3600"], os.environ, setsid=setsid)
        except OSError:
            time.sleep(0.001)
        while reap:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def cpu(procs: int) -> None:
    """Busy-loop on `procs` processes."""
    for _ in range(procs - 1):
        if os.fork() == 0:
            break
    while True:
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="backdoors.lab.hogs", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="kind", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--rate-mb", type=float, default=40)
    m.add_argument("--cap-mb", type=float, default=400)
    m.add_argument("--forks", action="store_true", help="grow by forking children that allocate")
    m.add_argument("--spread", action="store_true",
                   help="grow by orphans each too slow to be a hog (double-forked, setsid)")
    m.add_argument("--register", metavar="NAME",
                   help="first register a Sensor Box NAME with the node's agent")
    m.add_argument("--after", type=float, default=0.0, help="seconds of quiet first")
    c = sub.add_parser("cache")
    c.add_argument("--mb", type=float, default=256)
    f = sub.add_parser("forkbomb")
    f.add_argument("--shape", choices=BOMB_SHAPES, default="tree")
    f.add_argument("--after", type=float, default=0.0, help="seconds of quiet first")
    f.add_argument("--register", metavar="NAME",
                   help="first register a Sensor Box NAME with the node's agent")
    p = sub.add_parser("cpu")
    p.add_argument("--procs", type=int, default=2)
    a = ap.parse_args(argv)
    set_comm(COMM[a.kind])
    if a.kind == "memory":
        memory(a.rate_mb, a.cap_mb, forks=a.forks, spread=a.spread, register=a.register,
               after=a.after)
    elif a.kind == "cache":
        cache(a.mb)
    elif a.kind == "forkbomb":
        forkbomb(a.shape, a.after, a.register)
    else:
        cpu(a.procs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
