"""The server-crash case of the recovery scenario: a recoverable server dies, its node
stays healthy.

    recovery("server-crash", sessions=10, restart_server=True) -> the keys of the other
        faults plus {"detected_by", "same_node", "event_ms", "other_incidents"}

Node n0 runs two recoverable servers, the stream service (with a Sensor Box) and the
HTTP example (`backdoors.examples.http_server`, no Sensor Box), and the sample service (a
Sensor Box of its own, not recoverable, which must stay healthy); n1 runs both
recoverable servers too, as the other node's recovery servers. Clients verify every byte
of `sessions` streams from n0, and HTTP_CLIENTS unmodified `curl`s download a file from
it, paced. Both servers of n0 are SIGKILLed together: the agent sees the deaths through
pidfds and pushes "owner_died"; the monitor ("heal": rule server-died) hands the sessions
to the servers restarted in n0 (`restart`), else moves them to n1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ..errors import LabError
from ..lab import Lab
from ..lab import topology
from ..common.procs import read_line
from ..lab.clients import StreamClients
from ..monitor import Monitor
from .labkit import unique_name, wait_until


HTTP_PORT = 8080
HTTP_CLIENTS = 2
HTTP_FILE = 32 << 20
HTTP_RATE = "4M"  # curl --limit-rate: the server is mid-response when it dies


def _start_http(lab: Lab, node: str) -> int:
    """The HTTP example in `node`, serving the lab's www data directory; its pid."""
    www = lab.data_dir("www")
    proc = lab.run_in_node(node, [sys.executable, "-m", "backdoors.examples.http_server",
                                  "--port", str(HTTP_PORT), "--root", str(www)],
                           stdout=subprocess.PIPE)
    line = read_line(proc, 10.0)
    proc.stdout.close()
    if "listening" not in line:
        proc.kill()
        raise LabError(f"the HTTP example did not start in node {node}; see "
                       f"{lab.plan.run_dir / node / 'stderr.log'}")
    return proc.pid


def _site(lab: Lab) -> bytes:
    data = bytes((i * 7 + i // 251) % 256 for i in range(65536)) * (HTTP_FILE // 65536)
    (lab.data_dir("www") / "file.bin").write_bytes(data)
    return data


def server_crash(sessions: int = 10, *, restart: bool = True, name: str | None = None,
                 period_ms: float = 50, deadline_ms: float = 200, rate: int = 16384,
                 chunk: int = 1024, warmup_s: float = 1.0, watch_s: float = 2.0,
                 timeout_s: float = 30.0, incidents_dir: str | None = None):
    """Run the case: (facts so far, incident, Unix time of the kill, the clients' report);
    scenarios.recovery makes the facts of the last three."""
    name = name or unique_name("r")
    out: dict = {"fault": "server-crash", "sessions": sessions, "poll_ms": period_ms,
                 "deadline_ms": deadline_ms, "rate_bytes_per_s": rate, "restart": restart}
    args = ("--rate", str(rate), "--chunk", str(chunk), "--export-every", str(chunk * 8),
            "--deadline", str(deadline_ms / 1000))
    with Lab(name, hosts=2, nodes=2, agents=True, services=False,
             pids_limit=max(512, 2 * sessions + 256)) as lab:
        for node in ("n0", "n1"):
            lab.start_service(node, *args, recoverable=True)
        lab.start_service("n0")  # another service of n0, which must stay healthy
        data = _site(lab)
        http = {node: _start_http(lab, node) for node in ("n0", "n1")}
        with lab.agent_client("h0") as c:
            wait_until(lambda: sum(k.startswith(("rsvc", "svc")) for k in c.sensors("n0").boxes) == 2,
                  10, "the services' Sensor Boxes")
            cfg = lab.monitor_config(period_ms=period_ms, incidents_dir=incidents_dir,
                                     rulesets=["heal"])
            with Monitor(cfg, key=lab.monitor_key("m1")) as mon:
                mon.wait_ready(timeout=10)
                wait_until(lambda: all(f.connected.is_set() for f in mon.followers), 10,
                      "the monitor's event subscriptions")
                vip = lab.plan.node("n0").vip
                paths = [lab.plan.run_dir / f"curl-{i}.out" for i in range(HTTP_CLIENTS)]
                curls = [lab.run_in_client(
                    ["curl", "--silent", "--show-error", "--fail", "--limit-rate", HTTP_RATE,
                     "-o", str(path), f"http://{vip}:{HTTP_PORT}/file.bin"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for path in paths]
                with StreamClients(lab, vip, topology.RECOVERABLE_PORT, sessions) as clients:
                    held = sessions + HTTP_CLIENTS
                    wait_until(lambda: len(c.call("sessions", node="n0")) == held, 30,
                          f"{held} sessions held by the agent")
                    time.sleep(warmup_s)
                    at_fault = clients.offsets()
                    pid = lab.service("n0", recoverable=True).pid
                    t_fault, wall_fault = time.monotonic(), time.time()
                    lab.node("n0").kill(pid, signal.SIGKILL)
                    lab.node("n0").kill(http["n0"], signal.SIGKILL)
                    if restart:
                        lab.start_service("n0", *args, recoverable=True)
                        _start_http(lab, "n0")
                    inc = mon.wait_for(lambda i: i.node == "n0" and any(
                        a.kind == "recover" for a in i.actions), timeout_s)
                    time.sleep(watch_s)
                    report = clients.report(t_fault, at_fault)
                http_ok, http_errors = 0, []
                for curl, path in zip(curls, paths):
                    try:
                        _, err = curl.communicate(timeout=timeout_s)
                    except subprocess.TimeoutExpired:
                        curl.kill()
                        _, err = curl.communicate()
                    got = path.read_bytes() if path.exists() else b""
                    if curl.returncode == 0 and got == data:
                        http_ok += 1
                    else:
                        http_errors.append(f"curl {curl.returncode}: {len(got)} of {len(data)} "
                                           f"bytes{', differ' if got and got != data[:len(got)] else ''}"
                                           f" {err.decode(errors='replace').strip()[:200]}")
                    if path.exists():
                        os.unlink(path)
                    others = [f"{i.rule}: {i.detectors[0].summary if i.detectors else ''}"
                              for i in mon.incidents() if inc is None or i.id != inc.id]
        out["other_incidents"] = others
        out.update(http_sessions=HTTP_CLIENTS, http_ok=http_ok, http_errors=http_errors)
        out.update(detected_by=None, same_node=None, event_ms=None, dead_pid=pid)
        if inc is not None:
            rec = next(a for a in inc.actions if a.kind == "recover")
            died = (inc.event or {}).get("died")
            out.update(detected_by=inc.detected_by, same_node=bool(rec.detail.get("same_node")),
                       # the agent's sight of the death (pidfd) to the monitor's detection
                       event_ms=round((inc.detected - died) * 1000, 1) if died else None)
    return out, inc, wall_fault, report

