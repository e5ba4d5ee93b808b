"""A NATS server process of its own, for clusters that warn each other (docs/operations.md,
"Warnings between clusters"); the lab and the tests run one per cluster.

    hub = NatsProcess("bd-a-nats", "/dev/shm/bd-a-nats", leaf_port=0).start()
    spoke = NatsProcess("bd-b-nats", "/dev/shm/bd-b-nats", remotes=[hub.leaf_url]).start()
    spoke.wait_linked()

Two clusters' servers are linked by a **leaf-node connection**: one listens for leaf nodes
(`leaf_port`), the other names it in `remotes`; a message published on either side reaches
the subscribers of both (interest crosses the link), while each cluster keeps its own
server, and its own failure domain. Its config and log are in its own folder (removed at
stop); its name (`--name`, on its command line) starts with the owner's prefix, so that
`reap(prefix)` finds a crashed owner's server. `within()`: a context manager start() enters
to start it (e.g. a lab's monitor network namespace).

A port left 0 is the kernel's pick, made by the server as it binds (its config says -1),
and read back once it listens (its ports file, `ports_file_dir`; the leaf port from
/varz): a port picked beforehand could be taken by another process before the server
bound it, and a server that found it taken would exit while the other's listener answered.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from ..common.logs import log_tail
from ..errors import BackdoorsError
from . import named

NATS_SERVER = "nats-server"


class NatsError(BackdoorsError):
    """The NATS server could not be started, or did not link."""


def available() -> str | None:
    """The nats-server executable, None when not installed (Debian: nats-server)."""
    return shutil.which(NATS_SERVER)


class NatsProcess:
    """One nats-server: clients on `host`:`port`, monitoring (HTTP) on `http_port`, leaf
    nodes accepted on `leaf_port` (None: none; 0, as the others: the kernel's pick, known
    once started), and leaf links to `remotes`
    ("nats-leaf://HOST:PORT" of other servers). `users`: name -> (password, subjects it
    may publish on, subjects it may subscribe to); given, only they may connect as
    clients, each within its permissions (leaf links are not affected)."""

    def __init__(self, name: str, run_dir: str, *, host: str = "127.0.0.1",
                 port: int = 0, http_port: int = 0,
                 leaf_port: int | None = None, remotes: list[str] | None = None,
                 users: dict[str, tuple[str, list[str], list[str]]] | None = None,
                 within: Callable[[], AbstractContextManager] | None = None):
        self.name, self.run_dir, self.host = name, run_dir, host
        self.port, self.http_port = port, http_port
        self.leaf_port, self.remotes = leaf_port, list(remotes or [])
        self.users = dict(users or {})
        self.within = within
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self._known(self.port)}"

    @property
    def leaf_url(self) -> str:
        if self.leaf_port is None:
            raise NatsError(f"nats {self.name} accepts no leaf nodes (no leaf_port)")
        return f"nats-leaf://{self.host}:{self._known(self.leaf_port)}"

    def _known(self, port: int) -> int:
        if not port:
            raise NatsError(f"nats {self.name}: its port is the kernel's pick, known once "
                            "it is started (start() first, or give the port)")
        return port

    def config(self) -> str:
        """Its configuration file (NATS's format, of which JSON is a subset)."""
        conf: dict = {"server_name": self.name, "listen": f"{self.host}:{self.port or -1}",
                      "http": f"{self.host}:{self.http_port or -1}", "max_payload": 65536,
                      "ports_file_dir": self.run_dir}
        leaf: dict = {}
        if self.leaf_port is not None:
            leaf["listen"] = f"{self.host}:{self.leaf_port or -1}"
        if self.remotes:
            leaf["remotes"] = [{"url": r} for r in self.remotes]
            leaf["reconnect"] = 1  # seconds between tries while the other side is away
        if leaf:
            conf["leafnodes"] = leaf
        if self.users:  # (an empty list would allow every subject: deny them all then)
            conf["authorization"] = {"users": [
                {"user": u, "password": pw, "permissions": {
                    "publish": {"allow": pub} if pub else {"deny": [">"]},
                    "subscribe": {"allow": sub} if sub else {"deny": [">"]}}}
                for u, (pw, pub, sub) in sorted(self.users.items())]}
        return json.dumps(conf, indent=1)

    def url_of(self, user: str) -> str:
        """The URL a client connects with as `user` (its password in it)."""
        return f"nats://{user}:{self.users[user][0]}@{self.host}:{self._known(self.port)}"

    def start(self, timeout: float = 10.0) -> NatsProcess:
        with self.within() if self.within is not None else nullcontext():
            return self._start(timeout)

    def _start(self, timeout: float) -> NatsProcess:
        exe = available()
        if exe is None:
            raise NatsError("nats-server is not installed (Debian: apt-get install "
                            "nats-server; make system-deps installs it)")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        os.makedirs(self.run_dir, mode=0o700)
        conf = os.path.join(self.run_dir, "nats.conf")
        with open(conf, "w") as f:
            f.write(self.config())
        log = open(os.path.join(self.run_dir, "nats.log"), "wb")
        self.proc = subprocess.Popen([exe, "--name", self.name, "-c", conf], stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        end = time.monotonic() + timeout
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > end:
                why = (f"exited with status {self.proc.returncode}"
                       if self.proc.poll() is not None else f"did not listen within {timeout:g} s")
                why += f": {self._log_tail()}"
                self.stop()
                raise NatsError(f"nats-server {self.name} {why}")
            time.sleep(0.05)
        return self

    def _listening(self) -> bool:
        """Whether the server listens on all its ports; their numbers taken from it. Its
        ports file is written once its client port listens, after the others."""
        pattern = os.path.join(glob.escape(self.run_dir), f"*_{self.proc.pid}.ports")
        try:
            with open(glob.glob(pattern)[0]) as f:
                ports = json.load(f)
            self.port = _port(ports["nats"][0])
            self.http_port = _port(ports["monitoring"][0])
        except (OSError, ValueError, KeyError, IndexError):  # (not yet, or half written)
            return False
        if self.leaf_port == 0:
            import httpx
            try:
                varz = httpx.get(f"http://{self.host}:{self.http_port}/varz", timeout=1.0)
                self.leaf_port = max(0, int(varz.json()["leaf"]["port"]))
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                return False
        return self.leaf_port != 0

    def leafs(self) -> int:
        """How many leaf-node links this server has up (its /leafz)."""
        import httpx
        with self.within() if self.within is not None else nullcontext():
            r = httpx.get(f"http://{self.host}:{self.http_port}/leafz", timeout=1.0)
        return int(r.json().get("leafnodes", 0))

    def subscriptions(self) -> int:
        """How many subscriptions this server knows (its /subsz): its clients', those its
        leaf links brought (interest from the other side), and its own system ones (a few
        dozen: count from a baseline)."""
        import httpx
        with self.within() if self.within is not None else nullcontext():
            r = httpx.get(f"http://{self.host}:{self.http_port}/subsz", timeout=1.0)
        return int(r.json().get("num_subscriptions", 0))

    def wait_subscriptions(self, n: int, timeout: float = 10.0) -> None:
        """Wait until this server knows at least `n` subscriptions (e.g. the other
        cluster's monitors', across the leaf link); NatsError after `timeout`."""
        end = time.monotonic() + timeout
        while True:
            try:
                if self.subscriptions() >= n:
                    return
            except Exception:  # noqa: BLE001 - not answering yet
                pass
            if time.monotonic() > end:
                raise NatsError(f"nats-server {self.name}: fewer than {n} subscriptions "
                                f"within {timeout:g} s")
            time.sleep(0.02)

    def wait_linked(self, timeout: float = 10.0) -> None:
        """Wait until a leaf-node link of this server is up; NatsError after `timeout`."""
        end = time.monotonic() + timeout
        while True:
            try:
                if self.leafs() > 0:
                    return
            except Exception:  # noqa: BLE001 - not answering yet
                pass
            if time.monotonic() > end:
                raise NatsError(f"nats-server {self.name}: no leaf-node link up within "
                                f"{timeout:g} s (remotes {self.remotes}): {self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        return log_tail(os.path.join(self.run_dir, "nats.log"))

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) and remove its folder."""
        named.stop(self.proc, self.run_dir)
        self.proc = None

    def __enter__(self) -> NatsProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def reap(prefix: str) -> list[int]:
    """SIGKILL the nats-server processes whose `--name` starts with `prefix` (a crashed
    owner's); the pids killed."""
    return named.reap(NATS_SERVER, prefix)


def _port(url: str) -> int:
    """The port of a URL of a ports file (`nats://127.0.0.1:4222`)."""
    return int(url.rsplit(":", 1)[1])
