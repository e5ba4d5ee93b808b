"""The demo's world: a lab with agents, services, live client sessions and a monitor.

Two hosts, four nodes (n0, n2 on h0; n1, n3 on h1). Every node runs the sample service
(port 7000), the recoverable stream service (7100) and the recoverable HTTP example
(8080). Clients hold stream sessions and curl downloads to n0's service address; the
monitor runs the packaged "demo" ruleset. Everything is owned here and torn down by
`close()`, also on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..common.procs import alive, read_line
from ..errors import LabError
from ..lab import Lab
from ..lab import topology
from ..lab.clients import StreamClients
from ..scenarios.recovery import monitor_for

MiB = 1 << 20
HTTP_PORT = 8080
FILE_MB = 16
CURL_RATE = "120k"  # bytes/s per download: they outlast the demo


class World:
    def __init__(self, name: str, out_dir: Path, *, stream_sessions: int = 24, downloads: int = 4,
                 say=print):
        self.name, self.out_dir, self.say = name, out_dir, say
        self.stream_sessions, self.download_count = stream_sessions, downloads
        self.lab = Lab(name, hosts=2, nodes=4, agents=True, services=True,
                       memory_limit=512 * MiB, pids_limit=256)
        # the served file and the downloads: made with the lab (up), in its data directory
        # (not under /tmp: every node has a private /tmp, nodes.container.SCRATCH), so that
        # the next lab reaps them if this process is killed
        self.tmp: Path | None = None
        self.www = self.source = Path()
        self.clients: StreamClients | None = None
        self.downloads: list[tuple[subprocess.Popen, Path]] = []
        self.monitor = None
        self.session_node = "n0"  # where the client sessions are served now
        self.progress_boxes = ("svc-",)  # the boxes whose progress the view shows
        self.note = lambda text: None  # a line for the view's timeline (set by the runner)
        self._procs: list[subprocess.Popen] = []

    # ---- building -----------------------------------------------------------------------

    def up(self) -> World:
        self.say("building the lab: 2 hosts, 4 nodes, an agent per host")
        self.lab.up()
        self.tmp = self.lab.data_dir("demo")  # mode 0755: the nodes' services read www
        self.www = self.tmp / "www"
        self.source = self.www / "big.bin"
        self.www.mkdir()
        with open(self.source, "wb") as f:
            f.write(os.urandom(FILE_MB * MiB))
        self.say("starting the recoverable stream and HTTP servers on every node")
        for n in self.lab.plan.nodes:
            self.lab.start_service(n.name, "--rate", "8192", "--chunk", "256",
                                   "--export-every", "2048", recoverable=True)
            self._start_http(n.name)
        incidents = self.out_dir / "incidents"
        self.monitor = monitor_for(self.lab, incidents_dir=str(incidents), rulesets=("demo",),
                                   hooks={"restart-service": self._restart_service})
        self.monitor.start()
        self.monitor.wait_ready(timeout=15)
        self.say(f"opening {self.stream_sessions} stream sessions and {self.download_count} "
                 "HTTP downloads to n0")
        vip = self.lab.plan.node("n0").vip
        self.clients = StreamClients(self.lab, vip, topology.RECOVERABLE_PORT, self.stream_sessions)
        for i in range(self.download_count):
            out = self.tmp / f"download-{i}"
            proc = self.lab.run_in_client(
                ["curl", "-s", "--limit-rate", CURL_RATE, "-o", str(out),
                 f"http://{vip}:{HTTP_PORT}/big.bin"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.downloads.append((proc, out))
        want = self.stream_sessions + self.download_count
        with self.lab.agent_client("h0") as c:
            end = time.monotonic() + 30
            while len(c.call("sessions", node="n0")) < want:
                if time.monotonic() > end:
                    raise LabError("the sessions to n0 were not all held by its agent within 30 s")
                time.sleep(0.05)
        return self

    def start_sample(self, node: str) -> int:
        """(Re)start the sample service of `node` (port 7000); returns its pid."""
        return self.lab.start_service(node).pid

    def _start_http(self, node: str) -> None:
        proc = self.lab.run_in_node(node, [sys.executable, "-m", "backdoors.examples.http_server",
                                           "--port", str(HTTP_PORT), "--root", str(self.www)],
                                    stdout=subprocess.PIPE)
        if not read_line(proc, 10.0):
            raise LabError(f"the HTTP example did not start in node {node}")
        proc.stdout.close()
        self._procs.append(proc)

    def _restart_service(self, info: dict) -> dict:
        """The refresh hook of the deadlock rule: kill the stuck sample service, start anew."""
        node = info["node"]
        old = self.lab.service(node, recoverable=False).pid
        self.lab.node(node).kill(old, signal.SIGKILL)
        end = time.monotonic() + 5
        while alive(old) and time.monotonic() < end:
            time.sleep(0.01)
        return {"old_pid": old, "new_pid": self.start_sample(node)}

    def watch(self, fn) -> None:
        """Call `fn(event, incident)` on the monitor's incidents."""
        self.monitor.subscribe(fn)

    # ---- what the clients saw ----------------------------------------------------------

    def summary(self) -> str:
        """The clients, as the view shows them."""
        if self.clients is None:
            return ""
        offs = self.clients.offsets()
        return (f"clients: {len(offs)} stream sessions, {sum(offs) / MiB:.2f} MiB received and "
                f"verified; {len(self.downloads)} curl downloads, "
                f"{sum(self.download_sizes()) / MiB:.2f} MiB")

    def download_sizes(self) -> list[int]:
        return [out.stat().st_size if out.exists() else 0 for _, out in self.downloads]

    def downloads_intact(self) -> tuple[int, list[str]]:
        """(downloads whose bytes so far equal the file's start, problems)."""
        ok, problems = 0, []
        with open(self.source, "rb") as f:
            for i, (proc, out) in enumerate(self.downloads):
                data = out.read_bytes() if out.exists() else b""
                f.seek(0)
                if proc.poll() not in (None, 0):
                    problems.append(f"download {i}: curl exited {proc.returncode}: "
                                    f"{proc.stderr.read().decode(errors='replace').strip()}")
                elif data != f.read(len(data)):
                    problems.append(f"download {i}: bytes differ from the file")
                else:
                    ok += 1
        return ok, problems

    # ---- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        for proc, _ in self.downloads:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()
        if self.clients is not None:
            self.clients.close()
        if self.monitor is not None:
            self.monitor.stop()
        self.lab.down()
        for proc in self._procs:
            proc.poll()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
