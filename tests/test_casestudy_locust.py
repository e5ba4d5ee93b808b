"""The load driver's locustfile under a slow start: a real headless locust run against a
small HTTP server, its import stalled as on a loaded machine."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time

#: the study's locustfile, its import made to take 2.5 s of CPU (a starved machine)
SLOW = """
import time
_s = time.monotonic()
while time.monotonic() - _s < 2.5:
    pass
from backdoors.casestudy.rubis.locustfile import Browsing  # noqa: F401 - the user class
"""


class _Home(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b'<p id="who">nobody</p>'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_slow_start_does_not_cut_the_run_time(tmp_path):
    """gevent's loop keeps the time it was created until it first runs; locust sets its
    --run-time timer from it. Without the locustfile's init hook a 3 s run whose start-up
    took 2.5 s ends at once, with no request completed."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Home)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    slow = tmp_path / "slow_locustfile.py"
    slow.write_text(SLOW)
    host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(slow), "--headless", "-u", "1", "-r", "1",
             "-t", "3s", "--only-summary", "--host", host, "--stop-timeout", "2", "--exit-code-on-error", "0", "Browsing"],
            capture_output=True, text=True, timeout=120,
            env={"RUBIS_HOSTS": host, "PATH": "/usr/bin:/bin"})
    finally:
        server.shutdown()
    log = proc.stderr
    assert proc.returncode == 0, log[-2000:]
    stamps = {}
    for line in log.splitlines():
        for what in ("Run time limit set", "--run-time limit reached"):
            if what in line:
                stamps[what] = time.mktime(time.strptime(line[1:20], "%Y-%m-%d %H:%M:%S")) + \
                    int(line[21:24]) / 1000
    assert len(stamps) == 2, log[-2000:]
    ran = stamps["--run-time limit reached"] - stamps["Run time limit set"]
    assert ran >= 2.9, f"the run lasted {ran:.2f} s of its 3 s"


class _KeptAlive(_Home):
    """Keeps connections open (HTTP/1.1) and notes each request's client port."""
    protocol_version = "HTTP/1.1"
    ports: list[int] = []

    def do_GET(self):  # noqa: N802
        self.ports.append(self.client_address[1])
        super().do_GET()


def _browsing(handler, stop_timeout: int, env: dict, before_shutdown=lambda: None):
    """The study's locustfile, 3 Browsing users for 2 s, against a local server of
    `handler`; the finished locust process."""
    from backdoors.casestudy.rubis.study import LOCUSTFILE

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        return subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE),
             "--headless", "-u", "3", "-r", "3", "-t", "2s", "--only-summary", "--host", host,
             "--stop-timeout", str(stop_timeout), "--exit-code-on-error", "0", "Browsing"],
            capture_output=True, text=True, timeout=120,
            env={"RUBIS_HOSTS": host, "PATH": "/usr/bin:/bin", **env})
    finally:
        before_shutdown()
        server.shutdown()


def test_each_users_first_request_is_recorded_apart(tmp_path):
    """RUBIS_LATENCIES: a line per request, its response time and whether it was its
    user's first -- the one that opened the user's keep-alive connection."""
    from backdoors.casestudy.rubis.latency import read_latencies

    path = tmp_path / "latencies"
    proc = _browsing(_KeptAlive, 5, {"RUBIS_LATENCIES": str(path), "RUBIS_THINK_MIN": "0.01",
                                     "RUBIS_THINK_MAX": "0.02"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, later = read_latencies(path)
    ports = _KeptAlive.ports
    assert len(set(ports)) == 3, "each user keeps one connection"
    assert len(first) == 3 and len(first) + len(later) == len(ports), (first, len(later), ports)
    assert all(ms > 0 for ms in first + later)


class _Hangs(_Home):
    """Answers nothing: every request waits (a frozen server no one moved)."""
    release = threading.Event()

    def do_GET(self):  # noqa: N802
        self.release.wait(60)


def test_a_request_left_waiting_at_the_end_is_counted(tmp_path):
    """Outside review: locust kills the users still in a request --stop-timeout after the
    run, and counts their requests nowhere: a site whose requests hang showed 0 failed.
    RUBIS_UNANSWERED says how many it left waiting."""
    count = tmp_path / "unanswered"
    proc = _browsing(_Hangs, 1, {"RUBIS_UNANSWERED": str(count)},
                     before_shutdown=_Hangs.release.set)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert count.read_text() == "3\n", proc.stderr[-2000:]
