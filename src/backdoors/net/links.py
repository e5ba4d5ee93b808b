"""Links, addresses and routes inside named namespaces, over netlink (pyroute2).

Interface names are local to their namespace, so short names (eth0, br-svc) are fine.
`ns` None is the caller's own namespace (the host's).
Link down (`set_up(..., False)`) and detaching a port from its bridge (`set_master(...,
None)`) are the two ways to emulate a failed network driver on this kernel.

An interface can vanish at any moment (its namespace, or its veth peer's, is being
destroyed). Whether it went before its index was looked up or between the look-up and the
request, the caller sees the same thing: NetError "no interface ..." (`remove_link`: nothing
to do). A raw pyroute2 NetlinkError never leaves this module.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from backdoors.errors import NetError
from backdoors.net import netns

_IFF_UP = 0x1


@dataclass(frozen=True)
class LinkInfo:
    """One interface as the kernel sees it."""

    ns: str | None
    name: str
    index: int
    up: bool  # administratively up (IFF_UP)
    operstate: str  # kernel's view: UP, DOWN, LOWERLAYERDOWN (peer or carrier down), ...
    mac: str
    master: str | None  # bridge this interface is a port of
    kind: str | None  # bridge, veth, ... (None for lo)

    @property
    def state(self) -> str:
        """'up' or 'down' (administrative state)."""
        return "up" if self.up else "down"


def add_bridge(ns: str | None, name: str) -> None:
    """Create bridge `name` in `ns` and bring it up. STP is off: ports forward at once."""
    with netns.iproute(ns) as ipr:
        try:
            ipr.link("add", ifname=name, kind="bridge")
            ipr.link("set", index=index_of(ipr, ns, name), state="up")
        except NetlinkError as e:
            raise _error(e, ns, name, "cannot create bridge") from e


def add_veth(
    ns: str | None,
    ifname: str,
    peer_ns: str | None,
    peer_ifname: str,
    *,
    bridge: str | None = None,
    mac: str | None = None,
    peer_mac: str | None = None,
) -> None:
    """Create veth `ifname` in `ns` with its peer `peer_ifname` in `peer_ns`, both up.

    `ifname` becomes a port of `bridge` if given. `mac`/`peer_mac` set the MAC of each end
    (default: random). The peer is created directly in `peer_ns`, so its name never has
    to be free in `ns`. On failure nothing is left behind.
    """
    peer: dict[str, object] = {"ifname": peer_ifname}
    if peer_mac is not None:
        peer["address"] = peer_mac
    extra = {"address": mac} if mac is not None else {}
    peer_fd = None
    if peer_ns != ns:
        peer_fd = _open_ns(peer_ns, ifname=peer_ifname)
        peer["net_ns_fd"] = peer_fd
    with netns.iproute(ns) as ipr:
        try:
            ipr.link("add", ifname=ifname, kind="veth", peer=peer, **extra)
        except NetlinkError as e:
            raise _error(
                e, ns, ifname, f"cannot create veth pair (peer {peer_ifname!r} in {netns.describe(peer_ns)})"
            ) from e
        finally:
            if peer_fd is not None:
                os.close(peer_fd)
        try:
            index = index_of(ipr, ns, ifname)
            if bridge is not None:
                ipr.link("set", index=index, master=index_of(ipr, ns, bridge))
            ipr.link("set", index=index, state="up")
            set_up(peer_ns, peer_ifname)
        except BaseException as e:
            _delete_quietly(ipr, ifname)  # takes the peer with it
            if isinstance(e, NetlinkError):
                raise _error(e, ns, ifname, "cannot set up new veth") from e
            raise


def remove_link(ns: str | None, ifname: str) -> None:
    """Delete interface `ifname` (a veth takes its peer along); a missing one is fine."""
    with netns.iproute(ns) as ipr:
        index = ipr.link_lookup(ifname=ifname)
        if not index:
            return
        try:
            ipr.link("del", index=index[0])
        except NetlinkError as e:
            if e.code == errno.ENODEV:  # gone meanwhile (its peer's namespace went)
                return
            raise _error(e, ns, ifname, "cannot delete interface") from e


def set_up(ns: str | None, ifname: str, up: bool = True) -> None:
    """Set `ifname` administratively up or down (down cuts its traffic)."""
    with netns.iproute(ns) as ipr:
        try:
            ipr.link("set", index=index_of(ipr, ns, ifname), state="up" if up else "down")
        except NetlinkError as e:
            raise _error(e, ns, ifname, f"cannot set interface {'up' if up else 'down'}") from e


def set_master(ns: str | None, ifname: str, bridge: str | None) -> None:
    """Make `ifname` a port of `bridge`, or detach it from its bridge when None."""
    with netns.iproute(ns) as ipr:
        try:
            master = 0 if bridge is None else index_of(ipr, ns, bridge)
            ipr.link("set", index=index_of(ipr, ns, ifname), master=master)
        except NetlinkError as e:
            target = "detach from its bridge" if bridge is None else f"attach to {bridge!r}"
            raise _error(e, ns, ifname, f"cannot {target}") from e


def link_info(ns: str | None, ifname: str) -> LinkInfo:
    """State, MAC, bridge and index of `ifname` in `ns`."""
    with netns.iproute(ns) as ipr:
        try:
            msg = ipr.link("get", ifname=ifname)[0]  # by name: one request, no look-up race
            master = _name_of(ipr, msg.get("master"))
        except NetlinkError as e:
            raise _error(e, ns, ifname, "cannot read interface") from e
    linkinfo = msg.get("linkinfo")
    return LinkInfo(
        ns=ns,
        name=ifname,
        index=msg["index"],
        up=bool(msg["flags"] & _IFF_UP),
        operstate=msg.get("operstate", "UNKNOWN"),
        mac=msg.get("address", ""),
        master=master,
        kind=linkinfo.get("kind") if linkinfo is not None else None,
    )


def add_address(ns: str | None, ifname: str, cidr: str) -> None:
    """Add address `cidr` (e.g. 10.0.0.5/24) to `ifname`; already present is fine."""
    _change_address("add", ns, ifname, cidr, done_if=errno.EEXIST)


def del_address(ns: str | None, ifname: str, cidr: str) -> None:
    """Remove address `cidr` from `ifname`; already absent is fine."""
    _change_address("del", ns, ifname, cidr, done_if=errno.EADDRNOTAVAIL)


def _change_address(op: str, ns: str | None, ifname: str, cidr: str, done_if: int) -> None:
    with netns.iproute(ns) as ipr:
        _change_address_on(ipr, index_of(ipr, ns, ifname), op, ns, ifname, cidr, done_if)


def _change_address_on(ipr, index: int, op: str, ns: str | None, ifname: str, cidr: str,
                       done_if: int) -> None:
    """`op` ("add" or "del") address `cidr` on interface `index` over an open session;
    error `done_if` means it is already done."""
    iface = _parse_cidr(cidr, ns, ifname)
    extra = {}
    if op == "add" and iface.version == 6:
        extra["flags"] = 0x02  # IFA_F_NODAD: usable at once, as a moved VIP must be
    try:
        ipr.addr(op, index=index, address=str(iface.ip),
                 prefixlen=iface.network.prefixlen, **extra)
    except NetlinkError as e:
        if e.code == done_if:
            return
        verb = "add" if op == "add" else "delete"
        raise _error(e, ns, ifname, f"cannot {verb} address {cidr}") from e


def addresses(ns: str | None, ifname: str) -> list[str]:
    """Addresses of `ifname` as 'ip/prefixlen' strings, IPv4 first, in kernel order."""
    with netns.iproute(ns) as ipr:
        index = index_of(ipr, ns, ifname)
        found = _addresses(ipr, ns, ifname, index)
        # A dump filtered by index is empty, not an error, once the interface is gone.
        index_of(ipr, ns, ifname, expect=index)
    return found


def _addresses(ipr, ns: str | None, ifname: str, index: int) -> list[str]:
    try:
        return [f"{msg.get('address')}/{msg['prefixlen']}"
                for family in (socket.AF_INET, socket.AF_INET6)
                for msg in ipr.addr("dump", family=family, index=index)]
    except NetlinkError as e:
        raise _error(e, ns, ifname, "cannot read addresses") from e


def cut_off(ns: str | None, ifname: str, cidrs: list[str]) -> list[str]:
    """Remove those of `cidrs` that `ifname` has, then set it down (its traffic stops):
    what fencing a node does to its service link, in one netlink session (a fence is on
    the path of every recovery; three sessions took 3-9 ms). Returns the ones removed."""
    with netns.iproute(ns) as ipr:
        index = index_of(ipr, ns, ifname)
        have = _addresses(ipr, ns, ifname, index)
        removed = []
        for cidr in cidrs:
            if cidr not in have:
                continue
            # (gone meanwhile: as good)
            _change_address_on(ipr, index, "del", ns, ifname, cidr, done_if=errno.EADDRNOTAVAIL)
            removed.append(cidr)
        try:
            ipr.link("set", index=index, state="down")
        except NetlinkError as e:
            raise _error(e, ns, ifname, "cannot set interface down") from e
    return removed


def add_route(ns: str | None, dst_cidr: str, via: str) -> None:
    """Route `dst_cidr` ('default' for the default route) through gateway `via` in `ns`.

    Replaces an existing route to the same destination, so calling it twice is fine.
    """
    dst = "0.0.0.0/0" if dst_cidr == "default" else dst_cidr
    with netns.iproute(ns) as ipr:
        try:
            ipr.route("replace", dst=dst, gateway=via)
        except NetlinkError as e:
            raise NetError(
                f"cannot route {dst_cidr} via {via} in {netns.describe(ns)}: "
                f"{e.args[-1]} (is {via} on a directly connected subnet of an up interface?)"
            ) from e


def index_of(ipr, ns: str | None, ifname: str, *, expect: int | None = None) -> int:
    """Index of `ifname` through `ipr` (an IPRoute of `ns`); NetError if there is none
    (or, with `expect`, another one: the interface was replaced meanwhile)."""
    found = ipr.link_lookup(ifname=ifname)
    if not found or (expect is not None and found[0] != expect):
        raise missing_interface(ns, ifname)
    return found[0]


def missing_interface(ns: str | None, ifname: str) -> NetError:
    """The error for an interface that is not there (any more)."""
    return NetError(
        f"no interface {ifname!r} in {netns.describe(ns)}: "
        "check the name, or create it (add_bridge/add_veth)"
    )


def _name_of(ipr, index: int | None) -> str | None:
    """Name of interface `index`; None for no index, or an interface gone meanwhile (a
    bridge that is deleted lets go of its ports, so "no bridge" is then the truth)."""
    if not index:
        return None
    try:
        return ipr.link("get", index=index)[0].get("ifname")
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise


def _open_ns(ns: str | None, *, ifname: str) -> int:
    try:
        return netns.open_fd(ns)
    except NetError as e:
        raise NetError(f"cannot place {ifname!r} there: {e}") from None


def _parse_cidr(cidr: str, ns: str | None, ifname: str):
    if "/" not in cidr:
        raise NetError(
            f"address {cidr!r} for {ifname!r} in {netns.describe(ns)} needs a prefix length, like 10.0.0.5/24"
        )
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError as e:
        raise NetError(f"bad address {cidr!r} for {ifname!r} in {netns.describe(ns)}: {e}") from e


def _delete_quietly(ipr, ifname: str) -> None:
    try:
        for index in ipr.link_lookup(ifname=ifname):
            ipr.link("del", index=index)
    except NetlinkError:
        pass


_HINTS = {
    1: "needs root (CAP_NET_ADMIN)",
    17: "the name is taken: pick another or remove the old interface first",
    34: "the name is too long: at most 15 characters",
}


def _error(e: NetlinkError, ns: str | None, ifname: str, what: str) -> NetError:
    """The NetError for a failed request on `ifname`. ENODEV (the interface vanished after
    its index was looked up) is the same error as not finding it at all."""
    if e.code == errno.ENODEV:
        return missing_interface(ns, ifname)
    hint = _HINTS.get(e.code, "")
    return NetError(
        f"{what}: {ifname!r} in {netns.describe(ns)}: {e.args[-1]}"
        + (f" ({hint})" if hint else "")
    )


class LinkWatch:
    """Whether one interface of a namespace is up and running, for frequent sampling.

    One SIOCGIFFLAGS ioctl on a socket made inside the namespace once: microseconds, where
    a netlink round trip through pyroute2 costs about a millisecond.
    """

    _SIOCGIFFLAGS = 0x8913
    _IFF_RUNNING = 0x40

    def __init__(self, ns: str, ifname: str):
        self.ns, self.ifname = ns, ifname
        self._sock = netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
        self._req = struct.pack("16sH14x", ifname.encode(), 0)

    def up(self) -> bool:
        """Administratively up and with carrier (IFF_UP and IFF_RUNNING)."""
        try:
            flags = struct.unpack_from("16sH", fcntl.ioctl(self._sock, self._SIOCGIFFLAGS, self._req))[1]
        except OSError:
            return False  # the interface is gone
        return bool(flags & _IFF_UP and flags & self._IFF_RUNNING)

    def close(self) -> None:
        self._sock.close()


class LinkEvents:
    """The kernel's link notifications (rtnetlink RTMGRP_LINK) of one namespace.

    A netlink socket made inside the namespace and bound to the link group: the kernel
    sends a message on every change of an interface there (up/down, carrier, added,
    removed), so a watcher waits on `fd` instead of asking every tick. `changed()`
    empties the socket and says whether anything came; the state itself is then one
    `LinkWatch.up()`. An overrun socket (ENOBUFS: messages lost) counts as a change.
    """

    _RTMGRP_LINK = 1

    def __init__(self, ns: str):
        self.ns = ns
        self._sock = netns.socket_in(ns, socket.AF_NETLINK,
                                     socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)  # NETLINK_ROUTE
        try:
            self._sock.bind((0, self._RTMGRP_LINK))
        except OSError as e:
            self._sock.close()
            raise NetError(f"cannot listen to link changes in namespace {ns}: {e.strerror}") from None

    @property
    def fd(self) -> int:
        return self._sock.fileno()

    def changed(self) -> bool:
        """Read every pending message; True if there was one (or some were lost)."""
        seen = False
        while True:
            try:
                if not self._sock.recv(65536):
                    return seen
                seen = True
            except BlockingIOError:
                return seen
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise NetError(f"link changes in namespace {self.ns}: {e.strerror}") from None
                seen = True

    def close(self) -> None:
        self._sock.close()
