"""What registering a Continuation Box with the agent costs, per box (JSON out).

A process in a lab node holds `sessions` real TCP sessions, each with its box, and has
the node's agent hold them, three ways side by side in one run, in turns (`rounds` of
each, releasing everything between turns):

- `two_requests`: register_region then hold_socket, one box at a time (the registration
  before the "attach" op, and still what the C header and older agents do);
- `attach_one`: one "attach" request per box (what create_cb does);
- `attach_batch`: "attach" requests of runtime.MAX_ATTACH boxes (what an asyncio server's
  worker sends for a burst of new sessions, or for recovered ones).

Per box: the caller's wall time (ms) and the agent's CPU time (ms, its whole process), the
median over the rounds, and each way's ratio to `two_requests`. The boxes have
`state_capacity` and `log_capacity` (4 KiB each by default; an asgi channel's are 16 KiB
and 256 KiB).

`checks`: what the agent's check of one box costs, for the box shapes the servers make
(create_cb's default, an asgi session's, an asgi channel's; new, and with a state nearly
filling its capacity), two ways side by side in this
process: `read_cb` (a consistent copy of the whole box, what the agent read before
check_cb) and `check_cb` (its header and active slot); microseconds per check (median of
`rounds` runs of 200) and the ratio.

    python bench/bench_registration.py [--sessions 256] [--rounds 5]
                                       [--state-capacity B] [--log-capacity B] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from backdoors.continuations.cbformat import Encoding
from backdoors.continuations.image import check_cb, read_cb
from backdoors.continuations.region import CbRegion
from backdoors.lab.lab import Lab
from backdoors.scenarios.labkit import unique_name
from backdoors.sensors import Region

# In the node: the sessions and boxes, then per turn (way) one JSON line of its wall time.
DRIVER = r"""
import json, os, socket, sys, time
from backdoors.common import runtime
from backdoors.continuations.region import CbRegion

sessions, rounds, state_cap, log_cap = (int(a) for a in sys.argv[1:5])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(sessions)
boxes, keep = [], []
for _ in range(sessions):
    c = socket.create_connection(srv.getsockname())
    s, _ = srv.accept()
    region = CbRegion.create(os.urandom(16), state_capacity=state_cap, log_capacity=log_cap)
    keep += [c, s, region]
    boxes.append(("cb-" + bytes(region.mm[16:32]).hex(), region.fd, s.fileno()))

def two_requests():
    for name, box, sock in boxes:
        runtime.register_region(box, name, kind="cb")
        runtime.hold_socket(sock, name=name)

def attach(per):
    def run():
        for i in range(0, len(boxes), per):
            got = runtime.attach_sessions(boxes[i:i + per])
            assert len(got["held"]) == len(boxes[i:i + per]), got
    return run

ways = {"two_requests": two_requests, "attach_one": attach(1),
        "attach_batch": attach(runtime.MAX_ATTACH)}
print(json.dumps({"ready": True}), flush=True)
for r in range(rounds):
    for way, fn in ways.items():
        sys.stdin.readline()  # the bench reads the agent's CPU time before each turn
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        for name, _, _ in boxes:
            runtime.release(name)
        print(json.dumps({"way": way, "wall_s": wall}), flush=True)
"""


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime (clock ticks)


#: (name, state capacity, log capacity, bytes of exported state) of the boxes servers
#: make: new (never exported, as when they register) and with their state nearly full (the
#: check reads and checksums the state: its worst case)
SHAPES = (("create_cb", 4096, 64 * 1024, 0), ("asgi_session", 64 * 1024, 64 * 1024, 0),
          ("asgi_channel", 16 * 1024, 256 * 1024, 0),
          ("create_cb_full", 4096, 64 * 1024, 4000),
          ("asgi_session_full", 64 * 1024, 64 * 1024, 60 * 1024),
          ("asgi_channel_full", 16 * 1024, 256 * 1024, 15 * 1024))


def checks(rounds: int, per_round: int = 200) -> list[dict]:
    """Microseconds per check of one box of each shape, read_cb vs check_cb, alternated."""
    rows = []
    for shape, state_cap, log_cap, state in SHAPES:
        box = CbRegion.create(os.urandom(16), state_capacity=state_cap, log_capacity=log_cap)
        if state:
            box.write_export(1, 0, 0, Encoding.RAW, os.urandom(state))
        region = Region(box.fd, label=shape, map=False)  # as the agent holds a box
        times: dict[str, list[float]] = {"read_cb": [], "check_cb": []}
        try:
            for _ in range(rounds):
                for way, fn in (("read_cb", read_cb), ("check_cb", check_cb)):
                    t0 = time.perf_counter()
                    for _ in range(per_round):
                        fn(region)
                    times[way].append((time.perf_counter() - t0) / per_round * 1e6)
        finally:
            region.close()
            box.close()
        read_us, check_us = (round(statistics.median(times[w]), 1) for w in times)
        rows.append({"shape": shape, "state_capacity": state_cap, "log_capacity": log_cap,
                     "state_bytes": state,
                     "read_cb_us": read_us, "check_cb_us": check_us,
                     "check_ratio": round(check_us / read_us, 3)})
    return rows


def run(*, sessions: int = 256, rounds: int = 5, state_capacity: int = 4096,
        log_capacity: int = 4096) -> dict:
    lab = Lab(unique_name("rg"), hosts=1, nodes=1, agents=True, services=False)
    with lab:
        agent = lab.agent_pid("h0")
        proc = lab.run_in_node("n0", [sys.executable, "-c", DRIVER, str(sessions), str(rounds),
                                      str(state_capacity), str(log_capacity)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            json.loads(proc.stdout.readline())
            seen: dict[str, list[tuple[float, float]]] = {}
            for _ in range(rounds * 3):
                cpu = _cpu_s(agent)
                proc.stdin.write(b"\n")
                proc.stdin.flush()
                line = json.loads(proc.stdout.readline())
                # the agent's CPU includes the releases after the turn (the same for each way)
                seen.setdefault(line["way"], []).append((line["wall_s"], _cpu_s(agent) - cpu))
        finally:
            proc.kill()
            proc.wait(10)
    rows = []
    for way, runs in seen.items():
        rows.append({"way": way,
                     "wall_ms_per_box": round(1000 * statistics.median(w for w, _ in runs) / sessions, 4),
                     "agent_cpu_ms_per_box": round(1000 * statistics.median(c for _, c in runs) / sessions, 4)})
    base = rows[0]
    for row in rows:
        row["wall_ratio"] = round(row["wall_ms_per_box"] / base["wall_ms_per_box"], 3)
        row["agent_cpu_ratio"] = (round(row["agent_cpu_ms_per_box"] / base["agent_cpu_ms_per_box"], 3)
                                  if base["agent_cpu_ms_per_box"] else None)
    return {"sessions": sessions, "rounds": rounds, "state_capacity": state_capacity,
            "log_capacity": log_capacity, "results": rows, "checks": checks(rounds),
            "note": "agent CPU per box includes the release of each box after its turn"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--state-capacity", type=int, default=4096, help="of each box (bytes)")
    ap.add_argument("--log-capacity", type=int, default=4096, help="of each box (bytes)")
    ap.add_argument("--json", action="store_true", help="print JSON (the default output)")
    a = ap.parse_args(argv)
    print(json.dumps(run(sessions=a.sessions, rounds=a.rounds, state_capacity=a.state_capacity,
                         log_capacity=a.log_capacity), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
