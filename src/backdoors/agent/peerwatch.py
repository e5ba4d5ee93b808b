"""Agents watch each other over the private network (the design's "BDs monitor each other").

Each agent pings the peers of its `watch_peers` config every `peer_check_ms`, as itself
(its host id and key; each peer lists it in its `peers`, which allows ping). The op `peers` gives its view to the monitors:

    peers -> {host: {"address", "answering", "silent_ms", "checks", "error"}}

`answering` turns False once a peer has not answered for 3 checks (or never did);
`silent_ms` is the time since its last answer (since watching began, if none). A monitor
that lost its own path to an agent asks the others: peers that cannot reach it either
mean a dead agent (incident `agent-down`), peers that can mean a partition.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ..errors import BackdoorsError
from .client import AgentClient
from .ops import Call, NoArgs, Op

log = logging.getLogger("backdoors.agent")

SILENT_CHECKS = 3


@dataclass
class PeerState:
    address: str
    since: float  # watching began (monotonic)
    last_ok: float | None = None
    checks: int = 0
    error: str | None = None


class PeerWatch:
    """One thread per watched peer; `start()`, `stop()`, `view()`."""

    def __init__(self, peers: dict[str, str], *, identity, peer_keys: dict[str, tuple],
                 netns: str | None, period_s: float):
        self.period_s = period_s
        self.identity, self.peer_keys, self.netns = identity, peer_keys, netns
        now = time.monotonic()
        self.states = {host: PeerState(address, now) for host, address in peers.items()}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(host,), daemon=True,
                                          name=f"bd-peer-{host}") for host in self.states]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(2 * self.period_s + 1)

    def _run(self, host: str) -> None:
        state = self.states[host]
        timeout = max(self.period_s, 0.05)
        client = AgentClient(state.address, self.identity, host, self.peer_keys[host],
                             netns=self.netns, timeout=timeout)
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    client.ping()
                    state.last_ok, state.error = time.monotonic(), None
                except (BackdoorsError, OSError) as e:
                    state.error = str(e)
                    client.close()  # reconnect next time
                state.checks += 1
                self._stop.wait(max(0.0, self.period_s - (time.monotonic() - started)))
        finally:
            client.close()

    def view(self) -> dict[str, dict]:
        now = time.monotonic()
        out = {}
        for host, s in self.states.items():
            silent = now - (s.last_ok if s.last_ok is not None else s.since)
            out[host] = {"address": s.address,
                         "answering": s.last_ok is not None
                         and silent < SILENT_CHECKS * self.period_s,
                         "silent_ms": round(silent * 1000, 1), "checks": s.checks,
                         "error": s.error}
        return out

    def ops(self) -> list[Op]:
        return [Op("peers", NoArgs, self._peers_op, "inline")]

    def _peers_op(self, call: Call) -> dict[str, dict]:
        return self.view()
