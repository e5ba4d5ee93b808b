"""The HAProxy baseline of the recovery benchmark: what a health-checking balancer does
when one of its servers freezes, with the same workload and fault as backdoors' recovery.

    python bench/haproxy_baseline.py --sessions 1 10 100 1000 [--seconds 12] [--json]

In a lab (one host, three nodes) nodes n0 and n1 run the lab's plain sample service, which
sends every TCP client the numbered stream of `backdoors.lab.stream` at a paced rate, so
sessions last as long as the client stays. HAProxy runs in node n2 in TCP mode with
`balance roundrobin` over the two and active health checks (see HEALTHCHECK). N client
sessions from the lab's client namespace connect through HAProxy and verify every byte.
After a warm-up the backend holding the most sessions is frozen the way the recovery
benchmark fails its node: SIGSTOP of every process (`inject(lab, "freeze", node)`).

Measured, from the fault on:
  haproxy_broken      sessions that got EOF, RST or a wrong byte, or stalled longer than
                      the stall cutoff (10 s: far beyond any client-visible hiccup; a TCP
                      session pinned to a frozen server never resumes)
  haproxy_resume_ms   fault -> first stream bytes on a NEW connection, from which on every
                      new connection got the stream (probes every 10 ms, ±10 ms)
  haproxy_detect_ms   fault -> HAProxy marks the frozen server DOWN (stats socket, 10 ms)
  haproxy_ok_sessions sessions still streaming at the end, every byte verified

Sessions are assigned to servers by HAProxy's own `show sess`, not guessed, so the result
also says how many sessions were pinned to the frozen server (`haproxy_pinned`).
Needs root; installs the Debian package haproxy when it is missing (`ensure_haproxy`).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import resource
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid

from backdoors.common import haproxy
from backdoors.errors import BackdoorsError, require_root
from backdoors.lab import SERVICE_PORT, Lab, inject, stream

# The health check. A plain TCP connect check (`check` alone) does NOT notice a SIGSTOPped
# server: the kernel completes handshakes for the frozen listener until its accept backlog
# fills (128 checks, ~13 s here). So the check asks the application, as an HTTP check
# would: connect and expect the first bytes of the stream. Every 100 ms, DOWN after 2
# failures, UP again after 1 success; a reply must come within 200 ms (the service answers
# in about a millisecond; 200 ms leaves room for 2 loaded cores at 1000 sessions). Sessions
# on a server marked DOWN are shut down at once, so their clients learn it and can
# reconnect, instead of hanging until `timeout server`.
CHECK_INTER_MS = 100
CHECK_FALL = 2
CHECK_RISE = 1
CHECK_TIMEOUT_MS = 200
_STREAM_HEAD = stream.expected(0, 8)
HEALTHCHECK = (
    f"tcp-check expect binary {_STREAM_HEAD.hex()} (the stream's first bytes), "
    f"inter {CHECK_INTER_MS}ms fall {CHECK_FALL} rise {CHECK_RISE}, timeout check {CHECK_TIMEOUT_MS}ms, "
    "on-marked-down shutdown-sessions"
)

RATE = 2048            # stream bytes/s per session: 2 chunks of 1 KiB, small for 1000 sessions
STALL_CUTOFF = 10.0    # s without a byte after which a session counts as broken
WARMUP = 1.0           # s of verified streaming before the fault
PROBE_EVERY = 0.010    # s between new-connection probes after the fault
PROBE_BYTES = 1024     # verified bytes a probe needs (the stream's first chunk)
PROBE_TIMEOUT = 1.0    # s a probe may wait for them before it counts as failed
PROBE_CONFIRM = 50     # consecutive good probes (0.5 s) that end the probing
CONNECT_BATCH = 100    # sessions connected at once during set-up
SETUP_TIMEOUT = 30.0   # s for one batch of sessions to get their first bytes
SERVERS = {"s0": "n0", "s1": "n1"}
BALANCER = "n2"


class HaproxyError(BackdoorsError):
    """HAProxy could not be installed, configured, started or queried."""


# ---- HAProxy: install, configure, talk to ------------------------------------------------

def _find_haproxy() -> str | None:
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def ensure_haproxy() -> str:
    """The path of the haproxy binary; installs Debian's `haproxy` with apt-get if absent."""
    found = _find_haproxy()
    if found:
        return found
    if os.geteuid() != 0:
        raise HaproxyError("haproxy is not installed and installing it needs root: "
                           "run as root, or `apt-get install haproxy` first")
    if not shutil.which("apt-get"):
        raise HaproxyError("haproxy is not installed and there is no apt-get to install it "
                           "with: install HAProxy 2.x by hand and pass its path")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "haproxy"]
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a stale package index is the usual cause: refresh, retry once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    found = _find_haproxy()
    if done.returncode != 0 or not found:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise HaproxyError(f"could not install the Debian package haproxy "
                           f"(apt-get exit {done.returncode}: {tail}); "
                           "install it by hand: apt-get install haproxy")
    return found


def haproxy_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else "unknown"


def haproxy_config(lab: Lab, *, maxconn: int, stats_socket: str) -> str:
    """HAProxy's configuration: TCP frontend on n2's service address, two checked servers."""
    servers = "\n".join(
        f"    server {srv} {lab.plan.node(node).address}:{SERVICE_PORT} check"
        for srv, node in SERVERS.items()
    )
    return f"""\
global
    maxconn {maxconn}
    stats socket {stats_socket} mode 600 level admin
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    option log-health-checks
    timeout connect 1s
    timeout client 120s
    timeout server 120s
    timeout check {CHECK_TIMEOUT_MS}ms

frontend stream_in
    bind {lab.plan.node(BALANCER).vip}:{SERVICE_PORT}
    maxconn {maxconn}
    default_backend stream_servers

backend stream_servers
    balance roundrobin
    option tcp-check
    tcp-check expect binary {_STREAM_HEAD.hex()}
    default-server inter {CHECK_INTER_MS}ms fall {CHECK_FALL} rise {CHECK_RISE} on-marked-down shutdown-sessions
{servers}
"""


def cli(path: str, command: str, timeout: float = 2.0) -> str:
    """One command on HAProxy's stats socket; its whole answer."""
    return haproxy.command(path, command, timeout, error=HaproxyError)


def server_stats(path: str) -> dict[str, dict[str, str]]:
    """`show stat` of the servers of the stream backend, by server name."""
    return haproxy.server_stats(path, "stream_servers", SERVERS, error=HaproxyError)


def session_servers(path: str) -> dict[int, str]:
    """Client source port -> server name, for every session HAProxy forwards now."""
    found = {}
    for line in cli(path, "show sess", timeout=10.0).splitlines():
        m = re.search(r"src=[\d.]+:(\d+) .*\bsrv=(\S+)", line)
        if m and m.group(2) in SERVERS:
            found[int(m.group(1))] = m.group(2)
    return found


class Haproxy:
    """HAProxy running in the balancer node; the lab's teardown kills it with the node."""

    def __init__(self, lab: Lab, binary: str, maxconn: int):
        self.lab = lab
        run_dir = lab.node_run_dir(BALANCER)  # the one directory of /run/backdoors it sees
        self.socket_path = str(run_dir / "haproxy.sock")
        self.config_path = run_dir / "haproxy.cfg"
        self.log_path = lab.plan.run_dir / BALANCER / "haproxy.log"
        self.config_path.write_text(haproxy_config(lab, maxconn=maxconn, stats_socket=self.socket_path))
        checked = subprocess.run([binary, "-c", "-q", "-f", str(self.config_path)],
                                 capture_output=True, text=True)
        if checked.returncode != 0:
            raise HaproxyError(f"HAProxy rejects the generated configuration {self.config_path}: "
                               f"{(checked.stderr or checked.stdout).strip()}")
        with open(self.log_path, "ab") as log:
            self.proc = lab.run_in_node(BALANCER, [binary, "-db", "-f", str(self.config_path)],
                                        stderr=log)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until every server is UP by its health check."""
        end = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise HaproxyError(f"HAProxy exited with {self.proc.returncode} at start: "
                                   f"{self.log_tail()}")
            if os.path.exists(self.socket_path):
                status = {k: v["status"] for k, v in server_stats(self.socket_path).items()}
                if len(status) == len(SERVERS) and all(s == "UP" for s in status.values()):
                    return
            time.sleep(0.02)
        raise HaproxyError(f"HAProxy's servers not all UP within {timeout:g} s ({status}); "
                           f"log: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"


# ---- the client side ---------------------------------------------------------------------

class Session:
    """A long-lived client session that verifies the stream byte by byte."""

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.last_rx = now
        self.offset = 0
        self.broken: str | None = None  # "eof", "reset", "error", "corrupt" or "stalled"
        self.server: str | None = None  # HAProxy's server for it, from `show sess`

    def readable(self, now: float) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self.broken = "reset" if e.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.EPIPE) else "error"
            return
        if not data:
            self.broken = "eof"
            return
        if stream.expected(self.offset, len(data)) != data:
            self.broken = "corrupt"
            return
        self.offset += len(data)
        self.last_rx = now


class Probe:
    """A new connection after the fault: good once it got the stream's first chunk."""

    def __init__(self, sock: socket.socket, now: float):
        self.sock = sock
        self.launched = now
        self.got = b""
        self.good_at: float | None = None
        self.failed: str | None = None

    @property
    def done(self) -> bool:
        return self.good_at is not None or self.failed is not None

    def readable(self, now: float) -> None:
        try:
            data = self.sock.recv(PROBE_BYTES - len(self.got))
        except BlockingIOError:
            return
        except OSError as e:
            self.failed = errno.errorcode.get(e.errno, "error")
            return
        if not data:
            self.failed = "eof"
            return
        self.got += data
        if stream.expected(0, len(self.got)) != self.got:
            self.failed = "corrupt"
        elif len(self.got) >= PROBE_BYTES:
            self.good_at = now


class Client:
    """All client sockets, in the lab's client namespace, served by one epoll loop."""

    def __init__(self, lab: Lab, address: tuple[str, int]):
        self.lab = lab
        self.address = address
        self.sel = selectors.DefaultSelector()
        self.sessions: list[Session] = []
        self.probes: list[Probe] = []

    def _connect(self) -> socket.socket:
        s = self.lab.client_socket()
        s.setblocking(False)
        err = s.connect_ex(self.address)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            raise HaproxyError(f"cannot connect to HAProxy at {self.address}: {os.strerror(err)}")
        return s

    def open_sessions(self, count: int) -> None:
        """Connect `count` sessions in batches, each batch until all got their first bytes."""
        while len(self.sessions) < count:
            batch = []
            for _ in range(min(CONNECT_BATCH, count - len(self.sessions))):
                s = self._connect()
                sess = Session(s, time.monotonic())
                self.sel.register(s, selectors.EVENT_READ, sess)
                batch.append(sess)
                self.sessions.append(sess)
            end = time.monotonic() + SETUP_TIMEOUT
            while any(b.offset == 0 and not b.broken for b in batch):
                if time.monotonic() > end:
                    raise HaproxyError(f"{sum(b.offset == 0 for b in batch)} of {len(batch)} new sessions "
                                       f"got no stream within {SETUP_TIMEOUT:g} s through HAProxy")
                self.pump(0.05)
            bad = [b.broken for b in batch if b.broken]
            if bad:
                raise HaproxyError(f"{len(bad)} sessions broke while connecting ({bad[0]}), before any fault")

    def probe(self) -> None:
        s = self._connect()
        p = Probe(s, time.monotonic())
        self.sel.register(s, selectors.EVENT_READ, p)
        self.probes.append(p)

    def pump(self, timeout: float) -> None:
        """Serve readable sockets for up to `timeout` s; close what broke or finished."""
        for key, _ in self.sel.select(timeout):
            now = time.monotonic()
            obj = key.data
            obj.readable(now)
            if isinstance(obj, Session) and obj.broken or isinstance(obj, Probe) and obj.done:
                self._close(obj.sock)

    def expire(self, now: float, cutoff: float) -> None:
        """Mark sessions silent for `cutoff` s stalled, and probes past their time failed."""
        for sess in self.sessions:
            if not sess.broken and now - sess.last_rx > cutoff:
                sess.broken = "stalled"
                self._close(sess.sock)
        for p in self.probes:
            if not p.done and now - p.launched > PROBE_TIMEOUT:
                p.failed = "timeout"
                self._close(p.sock)

    def probing_confirmed(self) -> bool:
        tail = self.probes[-PROBE_CONFIRM:]
        return len(tail) == PROBE_CONFIRM and all(p.good_at is not None for p in tail)

    def _close(self, s: socket.socket) -> None:
        if s.fileno() < 0:
            return
        self.sel.unregister(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST: no TIME_WAIT
        s.close()

    def close(self) -> None:
        for obj in (*self.sessions, *self.probes):
            self._close(obj.sock)
        self.sel.close()


def resume_time(probes: list[Probe], fault_at: float) -> float | None:
    """Seconds from the fault to the first good probe after the last failed one."""
    last_failed = max((i for i, p in enumerate(probes) if p.good_at is None), default=-1)
    run = probes[last_failed + 1:]
    if not run:
        return None
    return run[0].good_at - fault_at


# ---- the benchmark -----------------------------------------------------------------------

def _collect(pids: list[int], timeout: float = 5.0) -> None:
    """Reap our children the lab has killed, so no zombie outlives the run."""
    end = time.monotonic() + timeout
    for pid in pids:
        while True:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] or time.monotonic() > end:
                    break
            except ChildProcessError:
                break
            time.sleep(0.01)


def _raise_nofile(needed: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        new_hard = max(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, new_hard))
        except (ValueError, OSError) as e:
            raise HaproxyError(f"cannot raise RLIMIT_NOFILE to {needed} for the client's "
                               f"sockets (now {soft}/{hard}): {e}") from None
    return soft, hard


def run(sessions: int = 10, *, seconds: float = 12.0, haproxy_bin: str | None = None,
        rate: int = RATE, stall_cutoff: float = STALL_CUTOFF) -> dict:
    """Freeze one of HAProxy's two servers under `sessions` live streams; see the module doc.

    `seconds` is how long the sessions are watched after the fault; it must exceed
    `stall_cutoff` so a session pinned to the frozen server is caught even if HAProxy
    never closes it.
    """
    if sessions < 1:
        raise ValueError(f"sessions must be at least 1, got {sessions}")
    if seconds <= stall_cutoff:
        raise ValueError(f"seconds ({seconds:g}) must exceed the stall cutoff ({stall_cutoff:g} s)")
    require_root("the HAProxy baseline (it builds a lab)")
    binary = haproxy_bin or ensure_haproxy()
    if not os.access(binary, os.X_OK):
        raise HaproxyError(f"haproxy binary {binary!r} is not executable")
    probes_max = int(seconds / PROBE_EVERY) + 16
    maxconn = sessions + probes_max + 256
    saved_nofile = _raise_nofile(sessions + probes_max + 1024)
    lab = Lab(f"hp{uuid.uuid4().hex[:8]}", hosts=1, nodes=3, services=False,
              pids_limit=sessions + 2048)
    client = None
    haproxy = None
    service_pids = []
    try:
        lab.up()
        for node in SERVERS.values():
            service_pids.append(lab.start_service(node, "--rate", str(rate)).pid)
        haproxy = Haproxy(lab, binary, maxconn)
        haproxy.wait_ready()
        client = Client(lab, (lab.plan.node(BALANCER).vip, SERVICE_PORT))
        client.open_sessions(sessions)

        placed = session_servers(haproxy.socket_path)
        for sess in client.sessions:
            sess.server = placed.get(sess.port)
        unplaced = sum(s.server is None for s in client.sessions)
        if unplaced:
            raise HaproxyError(f"HAProxy's `show sess` does not list {unplaced} of {sessions} sessions")
        counts = {srv: sum(s.server == srv for s in client.sessions) for srv in SERVERS}
        victim = max(SERVERS, key=lambda srv: (counts[srv], srv == "s0"))

        end = time.monotonic() + WARMUP
        while time.monotonic() < end:
            client.pump(0.05)
            client.expire(time.monotonic(), stall_cutoff)
        broken_before = sum(s.broken is not None for s in client.sessions)
        if broken_before:
            raise HaproxyError(f"{broken_before} sessions broke during the warm-up, before any fault")

        fault_at = time.monotonic()
        inject(lab, "freeze", SERVERS[victim])
        detect_at = None
        next_probe = next_stat = next_expire = fault_at
        end = fault_at + seconds
        while (now := time.monotonic()) < end:
            probing = not client.probing_confirmed()
            if probing and now >= next_probe:
                client.probe()
                next_probe += PROBE_EVERY
            if detect_at is None and now >= next_stat:
                if server_stats(haproxy.socket_path)[victim]["status"].startswith("DOWN"):
                    detect_at = time.monotonic()
                next_stat = now + PROBE_EVERY
            if now >= next_expire:
                client.expire(now, stall_cutoff)
                next_expire = now + 0.05
            client.pump(max(0.0, min(next_probe - time.monotonic(), 0.01)) if probing else 0.05)

        stats = server_stats(haproxy.socket_path)
        healthy = next(srv for srv in SERVERS if srv != victim)
        by_reason: dict[str, int] = {}
        for s in client.sessions:
            if s.broken:
                by_reason[s.broken] = by_reason.get(s.broken, 0) + 1
        resume = resume_time(client.probes, fault_at)
        return {
            "sessions": sessions,
            "haproxy_broken": sum(by_reason.values()),
            "haproxy_resume_ms": None if resume is None else round(resume * 1000, 1),
            "haproxy_ok_sessions": sum(s.broken is None and s.offset > 0 for s in client.sessions),
            "healthcheck": HEALTHCHECK,
            "haproxy_detect_ms": None if detect_at is None else round((detect_at - fault_at) * 1000, 1),
            "haproxy_pinned": counts[victim],
            "haproxy_healthy_ok": sum(s.broken is None for s in client.sessions if s.server == healthy),
            "haproxy_broken_by": by_reason,
            "haproxy_false_downs": int(stats[healthy].get("chkdown") or 0),
            "haproxy_probes": len(client.probes),
            "bytes_verified": sum(s.offset for s in client.sessions),
            "failed_server": f"{victim} ({SERVERS[victim]}, freeze)",
            "stall_cutoff_s": stall_cutoff,
            "rate_bytes_per_s": rate,
            "seconds": seconds,
            "haproxy_version": haproxy_version(binary),
            "lab": lab.name,
        }
    finally:
        try:
            if client is not None:
                client.close()  # before the lab goes: open sockets would pin its namespaces
        finally:
            try:
                lab.down()  # kills HAProxy and the services with their nodes
            finally:
                _collect(([haproxy.proc.pid] if haproxy else []) + service_pids)
                resource.setrlimit(resource.RLIMIT_NOFILE, saved_nofile)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 10, 100, 1000], metavar="N")
    ap.add_argument("--seconds", type=float, default=12.0, help="watch time after the fault (s)")
    ap.add_argument("--haproxy", help="haproxy binary (default: installed, or apt-get install haproxy)")
    ap.add_argument("--json", action="store_true", help="print JSON")
    a = ap.parse_args(argv)
    try:
        binary = a.haproxy or ensure_haproxy()
        results = []
        for n in a.sessions:
            results.append(run(n, seconds=a.seconds, haproxy_bin=binary))
            if not a.json:
                r = results[-1]
                print(f"sessions={n:5d} broken={r['haproxy_broken']:4d} (pinned {r['haproxy_pinned']}) "
                      f"ok={r['haproxy_ok_sessions']:4d} detect={r['haproxy_detect_ms']} ms "
                      f"resume={r['haproxy_resume_ms']} ms false_downs={r['haproxy_false_downs']}",
                      flush=True)
    except BackdoorsError as e:
        print(f"haproxy_baseline: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps({"results": results, "healthcheck": HEALTHCHECK}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
