"""Gratuitous ARP, and reading a namespace's neighbour (ARP) table.

After a service address moves, neighbours still map it to the old MAC until their entry
times out (seconds). A gratuitous ARP tells them the new MAC at once.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct
import threading
import time

from pyroute2.netlink.exceptions import NetlinkError

from backdoors.errors import NetError
from backdoors.net import links, netns

ETH_P_ARP = 0x0806
_ETH_P_IP = 0x0800
_ARPHRD_ETHER = 1
_ARPOP_REPLY = 2
_BROADCAST = b"\xff" * 6
_SIOCGIFHWADDR = 0x8927


def garp_frame(mac: str, ip: str) -> bytes:
    """The 42-byte Ethernet frame announcing that `ip` is at `mac`.

    An ARP reply broadcast on the link, with sender IP = target IP = `ip`. The target MAC
    equals the sender MAC: Linux only treats a *reply* as gratuitous when it does, and only
    a gratuitous one overrides a neighbour entry updated less than `locktime` (1 s) ago.
    """
    hw = _mac_bytes(mac)
    proto = ipaddress.IPv4Address(ip).packed
    ethernet = _BROADCAST + hw + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", _ARPHRD_ETHER, _ETH_P_IP, 6, 4, _ARPOP_REPLY)
    return ethernet + arp + hw + proto + hw + proto


def gratuitous_arp(
    ns: str, ifname: str, ip: str, count: int = 1, interval: float = 0.0, *,
    linger: bool = True,
) -> float:
    """Broadcast `count` gratuitous ARPs for `ip` from `ifname`'s MAC, `interval` s apart.

    Returns the seconds until the last frame was handed to the kernel. Closing the packet
    socket afterwards costs another ~8-16 ms (the kernel waits for an RCU grace period);
    the neighbours have their answer before that. With `linger=False` the close happens
    on a background thread and this returns as soon as the frames are out.
    """
    try:
        ipaddress.IPv4Address(ip)
    except ValueError as e:
        raise NetError(f"gratuitous ARP needs an IPv4 address, got {ip!r}") from e
    start = time.perf_counter()
    # proto 0: a send-only packet socket, it never queues received frames.
    sock = netns.socket_in(ns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        frame = garp_frame(_hardware_address(sock, ifname), ip)
        for i in range(count):
            if i and interval:
                time.sleep(interval)
            sock.sendto(frame, (ifname, ETH_P_ARP))
    except OSError as e:
        sock.close()
        raise NetError(
            f"cannot send gratuitous ARP for {ip} on {ifname!r} in network namespace "
            f"{ns!r}: {e.strerror or e} (does the interface exist, and is it up?)"
        ) from e
    sent = time.perf_counter() - start
    if linger:
        sock.close()
    else:
        threading.Thread(target=sock.close, name="bd-garp-close", daemon=True).start()
    return sent


def neighbours(ns: str, ifname: str | None = None) -> dict[str, str]:
    """IPv4 neighbour table of `ns` (of `ifname` only, if given): {ip: mac}.

    Entries without a MAC (still resolving, or failed) are left out.
    """
    with netns.iproute(ns) as ipr:
        query = {"family": socket.AF_INET}
        if ifname is not None:
            query["ifindex"] = links.index_of(ipr, ns, ifname)
        try:
            entries = [msg for msg in ipr.neigh("dump", **query) if msg.get("lladdr") is not None]
        except NetlinkError as e:
            if ifname is not None and e.code == errno.ENODEV:
                raise links.missing_interface(ns, ifname) from e  # gone meanwhile
            raise NetError(f"cannot read the neighbour table of {ns!r}: {e.args[-1]}") from e
        if ifname is not None:  # a dump for a vanished index is empty, not an error
            links.index_of(ipr, ns, ifname, expect=query["ifindex"])
        return {msg.get("dst"): msg.get("lladdr") for msg in entries}


def _hardware_address(sock: socket.socket, ifname: str) -> str:
    """MAC of `ifname`, asked through `sock` (so in the socket's namespace)."""
    request = struct.pack("16s24x", ifname.encode())  # struct ifreq
    reply = fcntl.ioctl(sock.fileno(), _SIOCGIFHWADDR, request)
    return reply[18:24].hex(":")


def _mac_bytes(mac: str) -> bytes:
    try:
        raw = bytes.fromhex(mac.replace(":", ""))
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise NetError(f"not an Ethernet MAC address: {mac!r}")
    return raw
