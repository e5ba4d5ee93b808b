"""What a burst of new sessions pays for the agent holding their boxes before they are
served: the first answers of an asyncio server whose boxes are registered, against the
same server with no agent to tell (JSON out).

In a lab node, two asyncio servers side by side, the same but for their registrar:

- `registered`: the default (each new session's box attached, on the registration
  worker, before the session is served: what a recoverable server does);
- `unregistered`: no agent to tell (the boxes made, not registered): the floor.

Each request costs the server `work_ms` of CPU (a page to render). A client process in the
node opens `burst` connections at once to one server, sends a request on each and times
its answer (the first: the session's box registered before it), then a second request on
each (a session set up). Bursts alternate between the servers, `rounds` each. Per way:
the medians over the bursts of the first answers' p50 and max and of the second answers'
p50; and the first answers' ratio to `unregistered`.

    python bench/bench_new_sessions.py [--burst 64] [--rounds 10] [--work-ms 0.5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from backdoors.lab.lab import Lab
from backdoors.scenarios.labkit import unique_name

# In the node: an asyncio server whose sessions have boxes; argv: way, work_ms. Prints its port.
SERVER = r"""
import asyncio, json, socket, sys, time
from backdoors.continuations import create_cb_async
from backdoors.continuations.agent_link import NULL, default_registrar

way, work = sys.argv[1], float(sys.argv[2]) / 1000
registrar = default_registrar() if way == "registered" else NULL

async def serve(conn):
    cb = await create_cb_async(conn, registrar=registrar)
    assert cb.registered == (way == "registered")
    try:
        while await cb.reader.readline():
            end = time.thread_time() + work
            while time.thread_time() < end:
                pass
            cb.writer.write(b"ok\n")
            await cb.writer.drain()
    finally:
        cb.close()

async def main():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1024)
    srv.setblocking(False)
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        conn, _ = await loop.sock_accept(srv)
        loop.create_task(serve(conn))

asyncio.run(main())
"""

# In the node: the bursts; argv: JSON {way: port}, burst, rounds. A JSON line per burst.
CLIENT = r"""
import asyncio, json, statistics, sys, time
ports, burst, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

async def one(port, go):
    await go.wait()
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"x\n")
    assert await r.readline() == b"ok\n"
    t1 = time.perf_counter()
    w.write(b"x\n")
    assert await r.readline() == b"ok\n"
    t2 = time.perf_counter()
    w.close()
    await w.wait_closed()
    return (t1 - t0) * 1000, (t2 - t1) * 1000

async def main():
    ways = list(ports)
    for r in range(rounds):
        for way in (ways if r % 2 == 0 else ways[::-1]):
            go = asyncio.Event()
            tasks = [asyncio.create_task(one(ports[way], go)) for _ in range(burst)]
            await asyncio.sleep(0.2)
            go.set()
            got = await asyncio.gather(*tasks)
            first = sorted(f for f, _ in got)
            print(json.dumps({"way": way, "first_p50_ms": first[len(first) // 2],
                              "first_max_ms": first[-1],
                              "second_p50_ms": statistics.median(s for _, s in got)}), flush=True)
            await asyncio.sleep(0.5)  # the sessions' releases at the agent

asyncio.run(main())
"""

WAYS = ("registered", "unregistered")


def run(*, burst: int = 64, rounds: int = 10, work_ms: float = 0.5) -> dict:
    lab = Lab(unique_name("ns"), hosts=1, nodes=1, agents=True, services=False)
    with lab:
        servers, ports = [], {}
        try:
            for way in WAYS:
                p = lab.run_in_node("n0", [sys.executable, "-c", SERVER, way, str(work_ms)],
                                    stdout=subprocess.PIPE)
                servers.append(p)
                ports[way] = json.loads(p.stdout.readline())["port"]
            client = lab.run_in_node("n0", [sys.executable, "-c", CLIENT, json.dumps(ports),
                                            str(burst), str(rounds)], stdout=subprocess.PIPE)
            out, _ = client.communicate(timeout=60 + rounds * len(WAYS) * 10)
            if client.returncode != 0:
                raise SystemExit(f"the client failed ({client.returncode})")
        finally:
            for p in servers:
                p.kill()
                p.wait(10)
    seen: dict[str, list[dict]] = {}
    for line in out.decode().splitlines():
        got = json.loads(line)
        seen.setdefault(got.pop("way"), []).append(got)
    rows = [{"way": way, **{k: round(statistics.median(b[k] for b in seen[way]), 2)
                            for k in ("first_p50_ms", "first_max_ms", "second_p50_ms")}}
            for way in WAYS]
    base = rows[-1]
    for row in rows:
        row["first_p50_ratio"] = round(row["first_p50_ms"] / base["first_p50_ms"], 3)
        row["first_max_ratio"] = round(row["first_max_ms"] / base["first_max_ms"], 3)
    return {"burst": burst, "rounds": rounds, "work_ms": work_ms, "results": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burst", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--work-ms", type=float, default=0.5)
    ap.add_argument("--json", action="store_true", help="print JSON (the default output)")
    a = ap.parse_args(argv)
    print(json.dumps(run(burst=a.burst, rounds=a.rounds, work_ms=a.work_ms), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
