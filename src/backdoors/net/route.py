"""A large initial congestion window for restored sockets, through a temporary host route.

Network policy for session recovery; the agent combines it with tcprepair (which says how
many segments a restored socket needs: tcprepair.segments_needed). Restoring
sent-but-unacknowledged data as unsent (tcprepair's resend_unacked) makes it go out at
once instead of after a 1-3 s retransmission timer. But the peer may already hold part of
it, its acknowledgement lost under the network lock: it then acknowledges a sequence
number beyond what the new socket has sent, and Linux ignores an ACK of unsent data. The
new socket must therefore send past that point in its first flight, i.e. its initial
congestion window must cover what the peer's window allowed. The kernel takes the initial
window from the route (RTAX_INITCWND) when the restored socket connects, so a host route
to each peer carries it for the duration of the restore, and is removed afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
from collections.abc import Iterable, Iterator

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("backdoors.net")


@contextlib.contextmanager
def initial_window(peers: Iterable[str], segments: int) -> Iterator[None]:
    """Host routes to `peers` with initcwnd `segments`, in the calling thread's netns.

    Restore the sockets inside the block. A peer that already has a host route of its own
    is left alone (its route is the operator's), and so is one with no route here, or
    whose host route cannot be added: its sockets restore without the larger window (a
    session to such a peer fails alone, if it must, not the others).
    """
    added: list[dict] = []
    with IPRoute() as ipr:
        try:
            for peer in sorted(set(peers)):
                addr = ipaddress.ip_address(peer)
                plen = addr.max_prefixlen
                try:
                    found = ipr.route("get", dst=peer)[0]
                except NetlinkError as e:
                    log.warning("initial window: no route to %s (%s): left as it is", peer, e)
                    continue
                spec = {"dst": peer, "dst_len": plen, "oif": found.get_attr("RTA_OIF"),
                        "family": found["family"]}
                gateway = found.get_attr("RTA_GATEWAY")
                if gateway:
                    spec["gateway"] = gateway
                try:
                    ipr.route("add", metrics={"initcwnd": segments}, **spec)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:  # (EEXIST: the operator's own host route)
                        log.warning("initial window: cannot add a host route to %s (%s): "
                                    "left as it is", peer, e)
                    continue
                added.append(spec)
            yield
        finally:
            for spec in added:
                with contextlib.suppress(NetlinkError):
                    ipr.route("del", **spec)
