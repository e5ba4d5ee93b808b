"""An etcd server process of its own: for the lab and the tests (one member, or one
member of a small cluster).

    with EtcdProcess("bd-lab-etcd", "/run/backdoors/lab/etcd", port=23790) as etcd:
        client = EtcdClient(etcd.url)

A cluster: `cluster(...)` gives its members (each knowing the others' peer URLs); launch
them all, then `wait()` for each (a member answers only once a quorum is up). `kill()`
SIGKILLs one and keeps its data; `start(fresh=False)` brings it back with it (it rejoins
and catches up from the leader).

Its data dir is its own (removed at stop), its name starts with the owner's prefix (the
lab's reaper finds a crashed owner's etcd by it: `reap(prefix)`), and it runs with a short
heartbeat (50 ms) and election timeout (500 ms) so that etcd grants 1 s leases (its
minimum TTL is 1.5 election timeouts, rounded up to a second). `within()`: a context
manager that start() enters to start it and wait for it (e.g. the lab's monitor network
namespace: the child is made, and its readiness checked, from there).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from ..common.logs import log_tail
from . import named
from .etcd import EtcdClient, EtcdError

ETCD = "etcd"


def available() -> str | None:
    """The etcd server executable, None when it is not installed (Debian: etcd-server)."""
    return shutil.which(ETCD)


class EtcdProcess:
    """One etcd member listening on `host`:`port` (clients) and `port`+1 (peers); alone,
    or one of `initial_cluster` (every member's name -> its peer URL; see `cluster`)."""

    def __init__(self, name: str, data_dir: str, *, host: str = "127.0.0.1", port: int = 2379,
                 within: Callable[[], AbstractContextManager] | None = None,
                 initial_cluster: dict[str, str] | None = None):
        self.name, self.data_dir, self.host, self.port = name, data_dir, host, port
        self.within = within
        # every member's name -> its peer URL (None: this member alone)
        self.initial_cluster = initial_cluster or {name: self.peer_url}
        self.proc: subprocess.Popen | None = None

    @classmethod
    def cluster(cls, name: str, data_dir: str, members: int, *, host: str = "127.0.0.1",
                port: int = 2379, within: Callable[[], AbstractContextManager] | None = None
                ) -> list[EtcdProcess]:
        """`members` members of one cluster: the first named `name` (data in `data_dir`,
        clients on `port`, peers on `port`+1), the others `name`1, `name`2, ... (data in
        `data_dir`1, ..., ports 2 apart)."""
        if members < 1:
            raise EtcdError(f"an etcd cluster needs at least one member, not {members}")
        names = [name if i == 0 else f"{name}{i}" for i in range(members)]
        peers = {n: f"http://{host}:{port + 2 * i + 1}" for i, n in enumerate(names)}
        return [cls(n, data_dir if i == 0 else f"{data_dir}{i}", host=host, port=port + 2 * i,
                    within=within, initial_cluster=peers) for i, n in enumerate(names)]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.port + 1}"

    def start(self, timeout: float = 15.0, *, fresh: bool = True) -> EtcdProcess:
        """Launch it and wait until it answers; `fresh`: from an empty data dir (else it
        restarts with the data it had, e.g. after `kill()`)."""
        self.launch(fresh=fresh)
        return self.wait(timeout)

    def launch(self, *, fresh: bool = True) -> EtcdProcess:
        """Start the process without waiting for it (a cluster's members, all at once)."""
        with self.within() if self.within is not None else nullcontext():
            return self._launch(fresh)

    def _launch(self, fresh: bool) -> EtcdProcess:
        exe = available()
        if exe is None:
            raise EtcdError("etcd is not installed (Debian: apt-get install etcd-server; "
                            "make system-deps installs it)")
        if self.proc is not None and self.proc.poll() is None:
            raise EtcdError(f"etcd {self.name} is already running (pid {self.proc.pid})")
        if fresh:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        cluster = ",".join(f"{n}={u}" for n, u in self.initial_cluster.items())
        argv = [exe, "--name", self.name, "--data-dir", os.path.join(self.data_dir, "data"),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", cluster,
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--log-level", "warn", "--logger", "zap"]
        log = open(os.path.join(self.data_dir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        return self

    def wait(self, timeout: float = 15.0) -> EtcdProcess:
        """Wait until it answers a read (a cluster's member: once a quorum is up)."""
        if self.proc is None:
            raise EtcdError(f"etcd {self.name} was not started")
        with self.within() if self.within is not None else nullcontext():
            return self._wait(timeout)

    def _wait(self, timeout: float) -> EtcdProcess:
        assert self.proc is not None
        client = EtcdClient(self.url, timeout=0.5)
        end = time.monotonic() + timeout
        try:
            while True:
                if self.proc.poll() is not None:
                    raise EtcdError(f"etcd {self.name} exited with status {self.proc.returncode}"
                                    f": {self._log_tail()}")
                try:
                    client.prefix("/")
                    return self
                except EtcdError:
                    if time.monotonic() > end:
                        self.stop()
                        raise EtcdError(f"etcd {self.name} did not answer at {self.url} within "
                                        f"{timeout:g} s: {self._log_tail()}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def _log_tail(self) -> str:
        return log_tail(os.path.join(self.data_dir, "etcd.log"))

    def kill(self) -> None:
        """SIGKILL it (a member's crash), keeping its data dir for `start(fresh=False)`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) and remove its data dir."""
        named.stop(self.proc, self.data_dir)
        self.proc = None

    def __enter__(self) -> EtcdProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def reap(prefix: str) -> list[int]:
    """SIGKILL the etcd processes whose member name starts with `prefix` (a crashed
    owner's); the pids killed."""
    return named.reap(ETCD, prefix)
