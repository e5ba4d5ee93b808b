"""Agent RPC latency while the node it serves suffers (JSON out).

A monitor-side client (in the lab's monitor namespace, over the private network) reads
the sample service's Sensor Box region with `read` (and the whole node with `sensors`,
the monitor's poll) while the node is idle, frozen (locked by the agent), memory-hogged
(a hog held just under the memory limit) and fork-bombed (a bomb against the pids
limit). Nothing repairs the node meanwhile. Latency is the client's round trip.

It also measures what request verification costs, side by side in one run: the agent's
Ed25519 check (`Authenticator.open`: envelope, signature, strict body, replay cache) against
the same path with the HMAC-SHA256 check it replaced, on the same request bodies
(`verification`; `--verify-only` runs just that, without root).

    python bench/bench_agent.py [--json] [--seconds 3] [--verify-only]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import msgspec

from backdoors.agent.auth import Authenticator, ReplayGuard
from backdoors.agent.keys import new_identity
from backdoors.agent.protocol import REQUEST_DOMAIN, VERSION, Envelope, MonitorOf, Request
from backdoors.lab import hogs
from backdoors.scenarios.labkit import AgentLab, unique_name
from backdoors.sensors import KERNEL_BOX

MiB = 1 << 20


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


def _measure(client, node: str, region: str, size: int, seconds: float) -> dict:
    reads_ms, polls_ms = [], []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        t = time.perf_counter()
        data = client.read(node, region, 0, size)
        reads_ms.append((time.perf_counter() - t) * 1000)
        assert len(data) == size
        if i % 4 == 0:
            t = time.perf_counter()
            client.sensors(node)
            polls_ms.append((time.perf_counter() - t) * 1000)
    return {"reads": len(reads_ms), "read_p50_ms": _pct(reads_ms, 0.50), "read_p99_ms": _pct(reads_ms, 0.99),
            "read_max_ms": round(max(reads_ms), 3), "read_mean_ms": round(statistics.mean(reads_ms), 3),
            "sensors_p50_ms": _pct(polls_ms, 0.50), "sensors_p99_ms": _pct(polls_ms, 0.99)}


def _keep_hogging(al, node: str, memory_mb: int, stop) -> None:
    """Run memory hogs in `node` one after the other until `stop` is set."""
    argv = [sys.executable, "-m", "backdoors.lab.hogs", "memory", "--rate-mb", "400",
            "--cap-mb", str(memory_mb * 2)]
    hog = None
    try:
        while not stop.is_set():
            if hog is None or hog.poll() is not None:
                hog = al.lab.run_in_node(node, argv)
            stop.wait(0.02)
    finally:
        _kill(hog)


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _requests(n: int, args: dict, sign) -> list[bytes]:
    out = []
    ts = time.time()
    for _ in range(n):
        body = msgspec.msgpack.encode({"v": VERSION, "monitor": "m1", "agent": "h0",
                                       "nonce": os.urandom(16), "ts": ts, "op": "read",
                                       "args": args})
        out.append(msgspec.msgpack.encode(Envelope(body, sign(body))))
    return out


def _rate(fn, frames: list[bytes]) -> float:
    t = time.perf_counter()
    for f in frames:
        fn(f)
    return len(frames) / (time.perf_counter() - t)


def verification(n: int = 20000) -> dict:
    """Requests verified per second, Ed25519 vs HMAC-SHA256, the rest of the path alike
    (decode the envelope and the signer, check, decode the body strictly, time bounds,
    replay cache); a read-sized request (the monitor's poll)."""
    me = new_identity("m1")
    secret = os.urandom(32)
    args = {"node": "n0", "region": "app", "offset": 0, "length": 4096}
    ed_frames = _requests(n, args, lambda b: me.sign(REQUEST_DOMAIN, b))
    mac_frames = _requests(n, args, lambda b: hmac.new(secret, b, hashlib.sha256).digest())

    guard = ReplayGuard(4 * n)
    envelope, monitor_of = msgspec.msgpack.Decoder(Envelope), msgspec.msgpack.Decoder(MonitorOf)
    request = msgspec.msgpack.Decoder(Request)

    def hmac_open(payload: bytes) -> Request:
        """Authenticator.open's steps with the HMAC check of protocol version 1."""
        env = envelope.decode(payload)
        assert monitor_of.decode(env.body).monitor == "m1"
        tag = hmac.new(secret, env.body, hashlib.sha256).digest()
        assert hmac.compare_digest(tag, env.sig)
        req = request.decode(env.body)
        now = time.time()
        assert req.v == VERSION and req.agent == "h0" and abs(req.ts - now) < 30
        assert guard.admit(req.monitor, req.nonce, req.ts, now) is None
        return req

    ed = Authenticator("h0", {"m1": (me.public,)}, cache_entries=4 * n, started=0.0)
    out = {"requests": n, "request_bytes": len(ed_frames[0])}
    rounds = {"ed25519": [], "hmac_sha256": []}
    for i in range(3):  # alternate, best of three: the same machine state for both
        rounds["hmac_sha256"].append(_rate(hmac_open, mac_frames))
        rounds["ed25519"].append(_rate(ed.open, ed_frames))
        ed = Authenticator("h0", {"m1": (me.public,)}, cache_entries=4 * n, started=0.0)
        guard = ReplayGuard(4 * n)
    out["ed25519_per_s"] = round(max(rounds["ed25519"]))
    out["hmac_sha256_per_s"] = round(max(rounds["hmac_sha256"]))
    out["hmac_over_ed25519"] = round(out["hmac_sha256_per_s"] / out["ed25519_per_s"], 2)
    out["ed25519_us_per_request"] = round(1e6 / out["ed25519_per_s"], 2)
    out["hmac_sha256_us_per_request"] = round(1e6 / out["hmac_sha256_per_s"], 2)
    return out


def run(*, seconds: float = 3.0, memory_mb: int = 512, pids_limit: int = 128) -> dict:
    """Latency of back-to-back region reads for `seconds` in each condition."""
    out: dict = {"seconds_per_condition": seconds, "memory_limit_mb": memory_mb,
                 "pids_limit": pids_limit, "verification": verification()}
    node = "n0"
    with AgentLab(unique_name("b"), nodes=1, memory_limit=memory_mb * MiB,
                  pids_limit=pids_limit) as al:
        al.wait_registered(node)
        n = al.lab.node(node)
        with al.agent_client("h0", timeout=5.0) as c:
            [region] = [r for r in c.regions(node) if r.name != KERNEL_BOX]
            conditions = {}
            _measure(c, node, region.name, region.size, 0.2)  # warm up the connection
            conditions["idle"] = _measure(c, node, region.name, region.size, seconds)

            c.lock(node, 60.0)
            try:
                assert n.stats().frozen
                conditions["frozen"] = _measure(c, node, region.name, region.size, seconds)
            finally:
                c.unlock(node)

            # Memory-hogged: a hog grows at 400 MB/s until the kernel OOM-kills it at the
            # limit, and is started again at once: the node lives at its limit.
            oom0 = n.stats().oom_kills
            stop = threading.Event()
            hogger = threading.Thread(target=_keep_hogging, args=(al, node, memory_mb, stop))
            hogger.start()
            try:
                end = time.monotonic() + 10
                while n.stats().memory_bytes < memory_mb * 0.9 * MiB and time.monotonic() < end:
                    time.sleep(0.02)
                conditions["memory_hog"] = _measure(c, node, region.name, region.size, seconds)
            finally:
                stop.set()
                hogger.join(20)
            conditions["memory_hog"]["oom_kills"] = n.stats().oom_kills - oom0

            bomb = al.lab.run_in_node(node, [sys.executable, "-m", "backdoors.lab.hogs", "forkbomb"])
            try:
                end = time.monotonic() + 10
                while n.stats().pids < pids_limit and time.monotonic() < end:
                    time.sleep(0.05)
                conditions["fork_bomb"] = _measure(c, node, region.name, region.size, seconds)
                conditions["fork_bomb"]["node_pids"] = n.stats().pids
                conditions["fork_bomb"]["bomb_processes"] = sum(
                    1 for p in n.processes() if p.comm == hogs.COMM["forkbomb"])
            finally:
                with n.locked(5.0):
                    for p in n.processes():
                        if p.comm == hogs.COMM["forkbomb"]:
                            n.kill(p.pid)
                _kill(bomb)
    for cond, m in conditions.items():
        out[f"read_p50_ms_{cond}"] = m["read_p50_ms"]
        out[f"read_p99_ms_{cond}"] = m["read_p99_ms"]
    out["conditions"] = conditions
    out["region_bytes"] = region.size
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds of reads per condition")
    ap.add_argument("--verify-only", action="store_true",
                    help="only the request verification cost, Ed25519 vs HMAC-SHA256")
    a = ap.parse_args(argv)
    if a.verify_only:
        v = verification()
        print(json.dumps(v, indent=2) if a.json else
              f"Ed25519 {v['ed25519_per_s']}/s, HMAC-SHA256 {v['hmac_sha256_per_s']}/s: "
              f"HMAC is {v['hmac_over_ed25519']}x faster")
        return 0
    r = run(seconds=a.seconds)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        for cond, m in r["conditions"].items():
            print(f"{cond:12} read p50 {m['read_p50_ms']:.3f} ms  p99 {m['read_p99_ms']:.3f} ms  "
                  f"sensors p99 {m['sensors_p99_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
