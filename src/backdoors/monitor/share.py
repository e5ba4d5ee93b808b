"""This monitor's share of a fleet (config key `etcd`): which nodes it watches, and the
fencing token it sends with every destructive request on each.

A `FleetMember` (backdoors.fleet) keeps the monitor in the fleet through etcd and owns the
nodes rendezvous hashing gives it; their tokens are the etcd revisions of its ownership
records. The pollers poll only the nodes of the share, and `claim` each newly owned node at
its agent first (so that the previous owner's late requests are refused there even if this
monitor never acts on the node); the agent clients attach the node's token to each op of
protocol.TOKENED, and refuse to send one for a node outside the share. Without etcd
(`degraded`) the monitor keeps its last share: it goes on watching and repairing those
nodes, and no other, and says so (log, status, metric
`backdoors_monitor_fleet_degraded`).

The share also records each owned node's open incident in etcd (`incident`, an incident
listener): the next owner of the node adopts it (`on_take`: Monitor._take). A node
whose response is running is kept until it ends (`hold`), and a response ends under the
ownership it began in (`pinned`): once the node changed hands — even back to this monitor,
after its lease expired — what is left of the response is not sent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client.core import GaugeMetricFamily

from ..errors import AgentError
from ..fleet import EtcdClient, FleetMember, Share, fencing_token

log = logging.getLogger("backdoors.monitor")


class NotOurs(AgentError):
    """A destructive request for a node outside this monitor's share: not sent."""

    code = "not_owner"


def node_key(host: str, node: str) -> str:
    """A node's name in the fleet: unique across agents."""
    return f"{host}/{node}"


class FleetShare:
    """The monitor's side of the fleet; `universe()` gives every node key it knows of
    (host/node of every agent polled); `on_change(share)` follows each change."""

    def __init__(self, monitor_id: str, etcd: list[str] | EtcdClient,
                 universe: Callable[[], set[str]],
                 *, prefix: str, ttl_s: int, poll_s: float,
                 on_change: Callable[[Share], None] | None = None, netns: str | None = None,
                 hold: Callable[[str], bool] | None = None,
                 on_take: Callable[[str, dict | None], None] | None = None,
                 listed: Callable[[], set[str]] | None = None,
                 reach: Callable[[], set[str]] | None = None, reach_grace_s: float = 1.0):
        self.client = etcd if isinstance(etcd, EtcdClient) else EtcdClient(etcd)
        self._on_change = on_change
        within = None
        if netns is not None:  # etcd is reached from there (the lab's monitor namespace)
            from ..net.netns import enter
            within = lambda: enter(netns)  # noqa: E731
        self.member = FleetMember(self.client, monitor_id, universe, prefix=prefix,
                                  ttl_s=ttl_s, poll_s=poll_s, on_change=self._changed,
                                  within=within, hold=hold, on_take=on_take, listed=listed,
                                  reach=reach, reach_grace_s=reach_grace_s)
        self._lock = threading.Lock()
        self._claimed: dict[str, int] = {}  # node key -> token the agent acknowledged
        self._refused: dict[str, int] = {}  # node key -> token the agent found stale
        self._pins = threading.local()  # .pin: (node key, its token) of this thread's response

    def start(self) -> FleetShare:
        self.member.start()
        return self

    def stop(self) -> None:
        self.member.stop(release=True)
        self.client.close()

    def _changed(self, share: Share) -> None:
        log.info("fleet: monitor %s owns %d node(s) of %d member(s)%s", share.member,
                 len(share.tokens), len(share.members),
                 f"; DEGRADED (etcd: {share.degraded})" if share.degraded else "")
        if self._on_change is not None:
            self._on_change(share)

    # -- for the pollers and the clients ---------------------------------------------------

    def owns(self, host: str, node: str) -> bool:
        return self.member.token(node_key(host, node)) is not None

    def watches(self, host: str, node: str) -> bool:
        """Owned, and claimed at its agent with the current token."""
        key = node_key(host, node)
        token = self.member.token(key)
        with self._lock:
            return token is not None and self._claimed.get(key) == token

    def token(self, host: str, node: str) -> int:
        """The token to send for `node` of `host`; NotOurs if it is not this monitor's, or
        (within `pinned`) no longer the token the response began with."""
        key = node_key(host, node)
        token = self.member.token(key)
        if token is None:
            raise NotOurs(f"node {node} of {host} is not this monitor's in the fleet (another "
                          "monitor owns it, or none yet): nothing destructive is sent")
        pin = getattr(self._pins, "pin", None)
        if pin is not None and pin[0] == key and pin[1] != token:
            raise NotOurs(f"node {node} of {host} changed hands during this response (token "
                          f"{pin[1]}, now {token}): the rest of it is not sent")
        return token

    @contextmanager
    def pinned(self, host: str, node: str) -> Iterator[None]:
        """Within (on this thread): `token` for the node is the one it has now, or NotOurs.
        A response runs so: it ends under the ownership it began in."""
        key = node_key(host, node)
        self._pins.pin = (key, self.member.token(key))
        try:
            yield
        finally:
            self._pins.pin = None

    def tokens_for(self, host: str) -> Callable[[str], int]:
        """The `tokens` callable of an AgentClient to `host`."""
        return lambda node: self.token(host, node)

    def unclaimed(self, host: str, node: str) -> int | None:
        """The token still to claim at the agent for `node`, None when claimed, refused
        (asked once per token) or not ours."""
        key = node_key(host, node)
        token = self.member.token(key)
        with self._lock:
            done = token in (self._claimed.get(key), self._refused.get(key))
            return None if token is None or done else token

    def claimed(self, host: str, node: str, token: int, *, refused: bool = False) -> None:
        """The agent acknowledged `token` for the node (or, `refused`, found it stale: a
        newer owner exists, and this monitor will learn it from etcd)."""
        with self._lock:
            (self._refused if refused else self._claimed)[node_key(host, node)] = token

    def outranked(self, host: str, node: str, token: int, holder: str) -> None:
        """The agent refused this monitor's claim of the node: it holds `token` of monitor
        `holder` (the fleet moves its epoch past a token its etcd never gave:
        FleetMember._past)."""
        self.member.outranked(node_key(host, node), token, holder)

    def incident(self, event: str, inc) -> None:
        """An incident listener: record the open incident of an owned node in etcd, and
        delete the record once it is closed. An incident closed because this monitor
        stops, or lost the node, stays recorded: the next owner carries it on."""
        if not self.owns(inc.host, inc.node):
            return
        key = node_key(inc.host, inc.node)
        if event == "closed":
            if inc.outcome != "monitor stopped":
                self.member.publish(key, None)
            return
        self.member.publish(key, self.record(inc))

    def record(self, inc) -> dict:
        """An open incident as recorded in etcd (fleet.member: incidents/<node>)."""
        return {"incident": inc.id, "monitor": self.member.id, "rule": inc.rule,
                "onset": inc.onset, "detected": inc.detected, "state": inc.state,
                "attempts": inc.attempts, "adopted_from": inc.adopted_from}

    # -- for status and metrics --------------------------------------------------------

    def status(self) -> dict:
        s = self.member.snapshot()
        with self._lock:
            claimed, refused = dict(self._claimed), dict(self._refused)
        return {"member": s.member, "members": s.members, "lease": s.lease, "ttl_s": s.ttl_s,
                "degraded": s.degraded, "steps": s.steps,
                "nodes": {n: {"token": t, "claimed": claimed.get(n) == t,
                              "refused": refused.get(n) == t}
                          for n, t in sorted((n, fencing_token(s.epoch, r))
                                             for n, r in s.tokens.items())}}

    def collect(self):
        """Prometheus: this monitor's fleet state (registered in the monitor's registry)."""
        s = self.member.snapshot()
        degraded = GaugeMetricFamily("backdoors_monitor_fleet_degraded",
                                     "1 while etcd cannot be reached: the monitor keeps its "
                                     "last share and acts on no other node")
        degraded.add_metric([], float(s.degraded is not None))
        owned = GaugeMetricFamily("backdoors_monitor_fleet_nodes",
                                  "Nodes this monitor owns in the fleet")
        owned.add_metric([], float(len(s.tokens)))
        members = GaugeMetricFamily("backdoors_monitor_fleet_members",
                                    "Live monitors of the fleet, as last read from etcd")
        members.add_metric([], float(len(s.members)))
        yield from (degraded, owned, members)
