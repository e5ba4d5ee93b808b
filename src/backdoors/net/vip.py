"""Moving a service address (VIP) from one node's interface to another's.

Delete, add, announce: without the gratuitous ARP a client keeps sending to the old MAC
and stalls for seconds, until its neighbour entry expires and is resolved again.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

from backdoors.errors import NetError
from backdoors.net import arp, links

Place = tuple[str, str]  # (namespace, interface)


@dataclass(frozen=True)
class MoveTimings:
    """Seconds spent by one move_address().

    `announced` is when the last gratuitous ARP left, measured from the start: from then
    on clients reach the new place. `total` adds the packet socket's slow close.
    """

    delete: float
    add: float
    garp: float
    total: float

    @property
    def announced(self) -> float:
        return self.delete + self.add + self.garp


def move_address(
    cidr: str,
    *,
    src: Place | None,
    dst: Place,
    garp_count: int = 2,
    garp_interval: float = 0.0,
) -> MoveTimings:
    """Move `cidr` from `src` (None: it is gone already) to `dst`, then announce it.

    Deleting first means two nodes never answer for the address at once. Pass src=None
    when the old node's namespace no longer exists. IPv6 addresses move, but are not
    announced (no unsolicited neighbour advertisement yet).
    """
    try:
        iface = ipaddress.ip_interface(cidr)
    except ValueError as e:
        raise NetError(f"bad service address {cidr!r}: {e}") from e
    t0 = time.perf_counter()
    if src is not None:
        links.del_address(src[0], src[1], cidr)
    t1 = time.perf_counter()
    links.add_address(dst[0], dst[1], cidr)
    t2 = time.perf_counter()
    garp = 0.0
    if iface.version == 4 and garp_count > 0:
        garp = arp.gratuitous_arp(dst[0], dst[1], str(iface.ip), garp_count, garp_interval)
    return MoveTimings(
        delete=t1 - t0, add=t2 - t1, garp=garp, total=time.perf_counter() - t0
    )
