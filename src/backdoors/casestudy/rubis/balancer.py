"""The baseline a user would deploy today: HAProxy in front of the plain site's front ends.

    with Balancer(site) as lb:        # HAProxy in the database node n4, both servers UP
        lb.url                        # http://<n4's address>:8090, what the load targets
        lb.marked_down("fe0", since)  # ms from `since` until HAProxy marked fe0 DOWN

HTTP mode, round robin over the plain front ends (uvicorn, FE_PLAIN_PORT) of n0 and n1,
with the active health checks of the recovery benchmark's baseline made HTTP: GET / every
100 ms, DOWN after 2 failures, UP after 1 success, an answer within 200 ms; the sessions of
a server marked DOWN are shut down at once (its clients learn it and reconnect), and a
request whose connection to a server fails is sent to the other (`option redispatch`,
`retries 2`). A request in flight on a server that hangs is lost: HAProxy cannot know
whether it was applied. Debian's `haproxy` (installed by `make`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from ...common import haproxy
from ...common.logs import log_tail
from ...errors import LabError
from .site import FE_PLAIN_PORT, Site

PORT = 8090
SERVERS = ("fe0", "fe1")  # the plain front ends of Site.FE, in order


def config(site: Site, stats_socket: str) -> str:
    """HAProxy's configuration for `site`."""
    lab = site.lab
    servers = "\n".join(f"    server {srv} {lab.plan.node(node).vip}:{FE_PLAIN_PORT} check"
                        for srv, node in zip(SERVERS, site.FE))
    return f"""\
global
    maxconn 4096
    stats socket {stats_socket} mode 600 level admin
    log stderr format raw local0 info

defaults
    mode http
    log global
    option log-health-checks
    option redispatch
    retries 2
    timeout connect 1s
    timeout client 60s
    timeout server 30s
    timeout check 200ms

frontend rubis_in
    bind {lab.plan.node(site.DB).vip}:{PORT}
    default_backend rubis_fe

backend rubis_fe
    balance roundrobin
    option httpchk GET /
    http-check expect status 200
    default-server inter 100ms fall 2 rise 1 on-marked-down shutdown-sessions
{servers}
"""


class Balancer:
    """HAProxy for `site`, run in its database node (no fault touches it); stopped on
    exit (the lab's teardown would end it with the node anyway)."""

    def __init__(self, site: Site):
        self.site, lab = site, site.lab
        self.binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        if not os.access(self.binary, os.X_OK):
            raise LabError("HAProxy is not installed (the case study's baseline needs it): "
                           "`make system-deps` or `apt-get install haproxy`")
        run_dir = lab.node_run_dir(site.DB)  # the one directory of /run/backdoors it sees
        self.socket_path = str(run_dir / "haproxy.sock")
        self.config_path = run_dir / "haproxy.cfg"
        self.log_path = lab.plan.run_dir / site.DB / "haproxy.log"
        self.url = f"http://{lab.plan.node(site.DB).vip}:{PORT}"
        self.proc = None

    def __enter__(self) -> Balancer:
        self.config_path.write_text(config(self.site, self.socket_path))
        checked = subprocess.run([self.binary, "-c", "-q", "-f", str(self.config_path)],
                                 capture_output=True, text=True)
        if checked.returncode != 0:
            raise LabError(f"HAProxy rejects the configuration {self.config_path}: "
                           f"{(checked.stderr or checked.stdout).strip()}")
        with open(self.log_path, "ab") as log:
            self.proc = self.site.lab.run_in_node(
                self.site.DB, [self.binary, "-db", "-f", str(self.config_path)], stderr=log)
        try:
            self._wait_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def status(self) -> dict[str, str]:
        """Each server's state by HAProxy's health checks ("UP", "DOWN", ...)."""
        return {name: row["status"] for name, row in self._stats().items()}

    def sessions_total(self) -> dict[str, int]:
        """Each server's sessions since HAProxy started (its `stot`)."""
        return {name: int(row["stot"] or 0) for name, row in self._stats().items()}

    def marked_down(self, server: str, since: float, timeout: float = 10.0) -> float | None:
        """Milliseconds from `since` (time.monotonic()) until HAProxy has `server` DOWN,
        polled every 10 ms; None if it does not within `timeout`."""
        end = since + timeout
        while time.monotonic() < end:
            if self.status().get(server, "").startswith("DOWN"):
                return round((time.monotonic() - since) * 1000, 1)
            time.sleep(0.01)
        return None

    def _wait_up(self, timeout: float = 15.0) -> None:
        end, status = time.monotonic() + timeout, {}
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise LabError(f"HAProxy exited ({self.proc.returncode}) at start: "
                               f"{log_tail(self.log_path)}")
            if os.path.exists(self.socket_path):
                try:
                    status = self.status()
                except LabError:  # bound, not listening yet
                    status = {}
                if len(status) == len(SERVERS) and all(s == "UP" for s in status.values()):
                    return
            time.sleep(0.05)
        raise LabError(f"HAProxy's servers not all UP within {timeout:g} s ({status}): "
                       f"{log_tail(self.log_path)}")

    def _stats(self) -> dict[str, dict[str, str]]:
        try:
            return haproxy.server_stats(self.socket_path, "rubis_fe", SERVERS, error=LabError)
        except LabError as e:
            if self.proc is not None and self.proc.poll() is not None:  # say why
                raise LabError(f"HAProxy exited ({self.proc.returncode}): "
                               f"{log_tail(self.log_path)}") from None
            raise e
