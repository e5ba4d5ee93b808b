"""What a new client session costs the RUBiS case study's site, by process (JSON out).

Plain vs recoverable, side by side: where the first requests' extra time goes.

The case study's site (casestudy.rubis.site: 2 front ends, 2 middle tiers, PostgreSQL, the
lab's agents; a tenth of the data set) runs both kinds of server side by side. A client
in the lab's client namespace loads one front end of each kind in turn (`rounds` each,
alternated), two ways:

- `new`: `sessions` new sessions one after another (connect, GET /categories, close):
  each opens its client connection and its channel to a middle tier (on the recoverable
  site: three boxes attached at the agents, and released at the end);
- `same`: as many requests on one session (the steady state).

Per kind and way, the median over the rounds of: CPU ms per session (or request) of the
front end process, the middle tiers, the agents (their whole processes, idle work
included), their supervisors (the lab's keepers, which hold the agents' fd stores: what
systemd does on a real host) and the database node's processes; the client's p50 and p99 ms; and the
recoverable site's ratio to the plain one's (CPU in all, and p50).

    python bench/bench_session_cost.py [--sessions 300] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import psutil

from backdoors.casestudy.rubis.dataset import Scale
from backdoors.casestudy.rubis.site import Site
from backdoors.scenarios.labkit import unique_name

# In the client namespace; argv: host, port, count, way. Prints {p50_ms, p99_ms}.
CLIENT = r"""
import http.client, json, sys, time
host, port, count, way = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def get(c):
    c.request("GET", "/categories")
    r = c.getresponse()
    body = r.read()
    assert r.status == 200, (r.status, body[:200])

times = []
kept = None if way == "new" else http.client.HTTPConnection(host, port, timeout=30)
if kept is not None:
    get(kept)  # the session set up before the timed requests
for _ in range(count):
    t0 = time.perf_counter()
    c = kept or http.client.HTTPConnection(host, port, timeout=30)
    get(c)
    if kept is None:
        c.close()
    times.append((time.perf_counter() - t0) * 1000)
times.sort()
print(json.dumps({"p50_ms": times[len(times) // 2], "p99_ms": times[int(len(times) * 0.99)]}))
"""

WAYS = ("new", "same")
PARTS = ("front_end", "middle_tiers", "agents", "supervisors", "database")


def _cpu(pids: list[int], children: bool = True) -> float:
    """CPU seconds of `pids` (and their children) so far (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in (proc, *(proc.children(recursive=True) if children else ())):
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _pids(site: Site, plain: bool) -> dict[str, list[int]]:
    lab = site.lab
    return {"front_end": [site.servers["fe", Site.FE[0], plain].pid],
            "middle_tiers": [site.servers["mt", n, plain].pid for n in Site.MT],
            "agents": (agents := [p for h in lab.plan.hosts if (p := lab.agent_pid(h.name))]),
            "supervisors": [psutil.Process(p).ppid() for p in agents],
            "database": lab.node(Site.DB).cgroup.procs()}


def run(*, sessions: int = 300, rounds: int = 3) -> dict:
    seen: dict[tuple[str, str], list[dict]] = {}
    with Site(unique_name("sc"), Scale().scaled(0.1)) as site:
        for r in range(rounds):
            for plain in ((True, False) if r % 2 == 0 else (False, True)):
                fe = site.servers["fe", Site.FE[0], plain]
                for way in WAYS:
                    pids = _pids(site, plain)
                    before = {k: _cpu(v, k != "supervisors") for k, v in pids.items()}
                    client = site.lab.run_in_client(
                        [sys.executable, "-c", CLIENT, fe.vip, str(fe.port), str(sessions), way],
                        stdout=subprocess.PIPE)
                    out, _ = client.communicate(timeout=60 + sessions)
                    if client.returncode != 0:
                        raise SystemExit(f"the client failed ({client.returncode})")
                    row = {f"{k}_cpu_ms": (_cpu(v, k != "supervisors") - before[k]) * 1000
                           / sessions for k, v in pids.items()}
                    row.update(json.loads(out))
                    seen.setdefault(("plain" if plain else "recoverable", way), []).append(row)
    rows = []
    for (kind, way), got in sorted(seen.items()):
        row = {"kind": kind, "way": way,
               **{k: round(statistics.median(g[k] for g in got), 3) for k in got[0]}}
        row["cpu_ms"] = round(sum(row[f"{p}_cpu_ms"] for p in PARTS), 3)
        rows.append(row)
    for row in rows:
        plain = next(r for r in rows if r["kind"] == "plain" and r["way"] == row["way"])
        row["cpu_ratio"] = round(row["cpu_ms"] / plain["cpu_ms"], 2) if plain["cpu_ms"] else None
        row["p50_ratio"] = round(row["p50_ms"] / plain["p50_ms"], 2)
    return {"sessions": sessions, "rounds": rounds, "page": "/categories", "results": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=300,
                    help="new sessions (and requests on one session) per run")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each kind, alternated")
    ap.add_argument("--json", action="store_true", help="print JSON (the default output)")
    a = ap.parse_args(argv)
    if a.sessions < 1 or a.rounds < 1:
        ap.error("--sessions and --rounds must be at least 1")
    print(json.dumps(run(sessions=a.sessions, rounds=a.rounds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
