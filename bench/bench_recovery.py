"""Session recovery vs HAProxy, and the cost of being recoverable, measured in one run.

For N = 1, 10, 100, 1,000 and 10,000 concurrent sessions and a frozen node:
  backdoors: `scenario recovery` (agents, monitor, TCP_REPAIR, Continuation Boxes) —
             broken sessions, detection, recovery time, client stall p50/p99, and
             where the move went (phases: fence, dump, transfer, restore, arp, resume,
             hand-over send, hold, first byte; `move` = fence to the last session's
             first byte again);
  haproxy:   the same stream workload behind HAProxy balancing two plain servers with
             health checks, one server frozen (bench/haproxy_baseline.py) — broken
             sessions, time until new connections are served again.
Overhead: the HTTP example serving keep-alive requests with Continuation Boxes (exports,
agent registration) vs the same server with --plain, rounds alternated; and `roundtrip`,
the CPU of one request-reply exchange through a box's reader/writer vs plain asyncio
socket calls, in one process (steadier than throughput on a shared machine).

    python bench/bench_recovery.py [--sessions 1 10 100 1000 10000] [--json]

Stalls include the stream's pacing interval (reported): a session receives a chunk every
`chunk / rate` seconds, so the gap around a fault is stall + up to one interval.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _haproxy():
    spec = importlib.util.spec_from_file_location("haproxy_baseline", HERE / "haproxy_baseline.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pacing(n: int) -> tuple[int, int]:
    """(rate bytes/s, chunk bytes) per session: ~2 MB/s in all, keeping 2 cores usable;
    beyond 1,000 sessions 128-byte chunks at most ~20,000 sends/s in all (10,000 sessions:
    one chunk every 0.5 s each, the stalls' resolution)."""
    if n > 1000:
        return max(256, 2_560_000 // n), 128
    rate = max(2048, min(65536, 2_000_000 // n))
    chunk = max(128, min(1024, rate // 32))
    return rate, chunk


def recovery_row(n: int) -> dict:
    import resource

    from backdoors.errors import LabError
    from backdoors.lab.lab import raise_nofile
    from backdoors.scenarios.recovery import recovery

    raise_nofile()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    # the lab's server holds a socket and two memfds per session, and takes new sessions
    # for half its descriptors (fdtable.session_limit): the other half is for recovered ones
    if 6 * n + 256 > hard:
        raise LabError(f"{n} sessions need about {6 * n + 256} descriptors in the lab's "
                       f"server; the hard RLIMIT_NOFILE is {hard} and cannot be raised here "
                       "(raising it takes CAP_SYS_RESOURCE)")
    rate, chunk = pacing(n)
    # beyond 1,000 sessions a chunk takes 0.5 s: an export every 2 chunks, not 8, so that
    # what a recovered session regenerates (paced) stays within a second; and the
    # progress deadline is 1 s, not 200 ms: the lab's server (one asyncio loop) ticks its
    # progress between thousands of sessions' sends on a shared 2-core machine
    big = n > 1000
    r = recovery("freeze", n, rate=rate, chunk=chunk, watch_s=max(2.0, 4 * chunk / rate),
                 timeout_s=60.0 + n / 100, export_every=chunk * 2 if big else None,
                 deadline_ms=1000 if big else 200)
    return {
        "sessions": n,
        "backdoors_broken": r["broken_connections"] + (n - r["sessions_ok"]),
        "backdoors_sessions_ok": r["sessions_ok"],
        "backdoors_bytes_lost": r["bytes_lost"],
        "backdoors_bytes_duplicated": r["bytes_duplicated"],
        "backdoors_detect_ms": r["detect_ms"],
        "backdoors_recovery_ms": r["recovery_ms"],
        "backdoors_stall_p50_ms": r["stall_p50_ms"],
        "backdoors_stall_p99_ms": r["stall_p99_ms"],
        "backdoors_stall_p99_beyond_detection_ms": (
            round(r["stall_p99_ms"] - r["detect_ms"], 1) if r["detect_ms"] is not None else None),
        "pace_interval_ms": round(chunk / rate * 1000, 1),
        "deadline_ms": r["deadline_ms"],
        "backdoors_steps": r.get("recover_detail"),
        # where the move went, ms (scenarios.recovery.phases): fence, dump, transfer,
        # restore, arp, resume, connect, send, hold, first_byte, move
        "backdoors_phases": r.get("phases"),
        "backdoors_move_ms": (r.get("phases") or {}).get("move"),
        "backdoors_error": r.get("error"),
    }


def haproxy_row(n: int) -> dict:
    h = _haproxy().run(sessions=n)
    return {"haproxy_broken": h["haproxy_broken"], "haproxy_resume_ms": h["haproxy_resume_ms"],
            "haproxy_pinned": h.get("haproxy_pinned")}


# ---- overhead -----------------------------------------------------------------------------


CLIENT = r"""
import http.client, sys, time, json
host, port, seconds, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection(host, port, timeout=10)
lat = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    t = time.perf_counter()
    c.request("GET", path)
    r = c.getresponse(); body = r.read()
    assert r.status == 200, r.status
    lat.append(time.perf_counter() - t)
lat.sort()
print(json.dumps({"requests": len(lat), "seconds": seconds,
                  "p50_ms": lat[len(lat)//2]*1000, "p99_ms": lat[int(len(lat)*0.99)]*1000}))
"""


def overhead(seconds: float = 3.0, rounds: int = 8, size: int = 16 * 1024,
             clients: int = 2) -> dict:
    """Requests/s and latency of the HTTP example with CBs vs --plain (same lab node), at
    saturation: `clients` client processes at once, each on one keep-alive connection,
    which with the server keep both cores busy. `rounds` pairs, back to back in
    alternating order (each pair shares the rest of the machine's load); the overhead is
    the median over the pairs of each pair's throughput loss, with its spread."""
    from backdoors.lab import Lab

    with Lab(_name("o"), hosts=1, nodes=1, agents=True, services=False) as lab:
        # in the node's run directory: its /tmp is a tmpfs of its own (nodes.container)
        www = str(lab.node_run_dir("n0") / "www")
        os.mkdir(www, 0o755)  # the node's server runs as an unprivileged uid
        os.chmod(www, 0o755)
        with open(os.path.join(www, "f.bin"), "wb") as f:
            f.write(os.urandom(size))
        servers = {}
        for mode, port in (("plain", 8080), ("cb", 8081)):
            argv = [sys.executable, "-m", "backdoors.examples.http_server", "--port", str(port),
                    "--root", www] + (["--plain"] if mode == "plain" else [])
            servers[mode] = (lab.run_in_node("n0", argv, stdout=subprocess.PIPE), port)
            servers[mode][0].stdout.readline()  # listening
        vip = lab.plan.node("n0").vip
        runs: dict[str, list[dict]] = {"plain": [], "cb": []}
        for i in range(rounds):
            for mode in (("plain", "cb") if i % 2 == 0 else ("cb", "plain")):
                procs = [lab.run_in_client([sys.executable, "-c", CLIENT, vip,
                                            str(servers[mode][1]), str(seconds), "/f.bin"],
                                           stdout=subprocess.PIPE) for _ in range(clients)]
                each = [json.loads(p.communicate(timeout=seconds + 30)[0]) for p in procs]
                runs[mode].append({"rps": sum(r["requests"] for r in each) / seconds,
                                   "p50_ms": statistics.median(r["p50_ms"] for r in each),
                                   "p99_ms": max(r["p99_ms"] for r in each)})
        for proc, _ in servers.values():
            proc.kill()
            proc.wait()
    losses = sorted((p["rps"] - c["rps"]) / p["rps"] * 100 for p, c in zip(runs["plain"], runs["cb"]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
           for m, rs in runs.items()}
    return {"response_bytes": size, "seconds_per_round": seconds, "rounds": rounds,
            "clients": clients,
            "plain_rps": round(med["plain"]["rps"], 1), "cb_rps": round(med["cb"]["rps"], 1),
            "plain_p50_ms": round(med["plain"]["p50_ms"], 3), "cb_p50_ms": round(med["cb"]["p50_ms"], 3),
            "plain_p99_ms": round(med["plain"]["p99_ms"], 3), "cb_p99_ms": round(med["cb"]["p99_ms"], 3),
            "overhead_pct": round(statistics.median(losses), 2),
            "overhead_pct_iqr": [round(losses[len(losses) // 4], 2),
                                 round(losses[(3 * len(losses)) // 4], 2)],
            "pair_overheads_pct": [round(x, 2) for x in losses]}


def roundtrip(exchanges: int = 20000, rounds: int = 5) -> dict:
    """CPU per request-reply exchange of a line protocol on loopback, one event loop
    running client and server: the server's reader/writer being a Continuation Box's
    (exporting every 100 exchanges) vs the plain asyncio socket calls of the HTTP
    example's --plain mode. The client's share is the same in both: the difference is
    the box's. Rounds alternate; medians."""
    import asyncio
    import socket
    import time

    from backdoors.continuations import AsyncListener, create_cb_async
    from backdoors.continuations.agent_link import NULL
    from backdoors.examples.http_server import PlainStream

    async def once(mode: str) -> float:
        loop = asyncio.get_running_loop()
        async with AsyncListener.tcp("127.0.0.1", 0) as listener:
            client = socket.socket()
            client.setblocking(False)
            await loop.sock_connect(client, listener.address)
            conn = await listener.accept()
            if mode == "cb":
                cb = await create_cb_async(conn, registrar=NULL)
                reader, writer, export = cb.reader, cb.writer, cb.export
            else:
                cb = None
                reader = writer = PlainStream(conn)
                export = None

            async def serve() -> None:
                n = 0
                while await reader.readline():
                    writer.write(b"pong\n")
                    await writer.drain()
                    n += 1
                    if export is not None and n % 100 == 0:
                        await export(n)
            task = asyncio.create_task(serve())
            began = time.process_time()
            for _ in range(exchanges):
                await loop.sock_sendall(client, b"ping\n")
                await loop.sock_recv(client, 64)
            cpu = time.process_time() - began
            client.close()
            await task
            cb.close() if cb is not None else conn.close()
            return cpu / exchanges * 1e6

    us: dict[str, list[float]] = {"plain": [], "cb": []}
    for i in range(rounds):
        for mode in (("plain", "cb") if i % 2 == 0 else ("cb", "plain")):
            us[mode].append(asyncio.run(once(mode)))
    plain, cb = statistics.median(us["plain"]), statistics.median(us["cb"])
    return {"exchanges": exchanges, "rounds": rounds, "plain_us": round(plain, 1),
            "cb_us": round(cb, 1), "cb_extra_us": round(cb - plain, 1),
            "cb_over_plain": round(cb / plain, 3)}


def _name(prefix: str) -> str:
    return prefix + os.urandom(3).hex()


SESSIONS = (1, 10, 100, 1000, 10000)


def run(sessions: tuple[int, ...] = SESSIONS, *, with_haproxy: bool = True,
        with_overhead: bool = True) -> dict:
    from backdoors.errors import BackdoorsError

    results = []
    for n in sessions:
        try:
            row = recovery_row(n)
        except BackdoorsError as e:  # one size that cannot run must not lose the others
            row = {"sessions": n, "backdoors_error": f"{type(e).__name__}: {e}"}
        if with_haproxy:
            try:
                row.update(haproxy_row(n))
            except Exception as e:  # noqa: BLE001 - reported in the row, the others kept
                row["haproxy_error"] = f"{type(e).__name__}: {e}"
        results.append(row)
    out: dict = {"fault": "freeze", "results": results}
    if with_overhead:
        try:
            o = overhead()
        except (BackdoorsError, OSError, ValueError, AssertionError) as e:
            out["overhead_pct"], out["overhead"] = None, {"error": f"{type(e).__name__}: {e}"}
        else:
            out["overhead_pct"] = o["overhead_pct"]
            out["overhead"] = o
        out["roundtrip"] = roundtrip()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=list(SESSIONS))
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--no-overhead", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = run(tuple(a.sessions), with_haproxy=not a.no_haproxy, with_overhead=not a.no_overhead)
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
