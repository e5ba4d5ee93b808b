"""The TCP connections of a namespace, from the kernel's socket table (sock_diag)."""

from __future__ import annotations

import contextlib
import ipaddress
import socket

from pyroute2 import DiagSocket
from pyroute2.netlink.exceptions import NetlinkError

from backdoors.errors import NetError
from backdoors.net import netns

_LISTEN = 10  # TCP_LISTEN in include/net/tcp_states.h
_NOT_LISTENING = 0xFFF & ~(1 << _LISTEN)

Endpoint = tuple[str, int]  # (IP in its canonical text form, port)


def endpoint(ip: str, port: int) -> Endpoint:
    """`(ip, port)` with `ip` in canonical form, as `connections` keys carry it."""
    return (str(ipaddress.ip_address(ip)), port)


def connections(ns: str | None) -> dict[tuple[Endpoint, Endpoint], int]:
    """Every TCP connection of namespace `ns` (None: the caller's) in any state but LISTEN,
    from SYN_SENT to TIME_WAIT, keyed by (local, remote) `endpoint`s, valued by the socket's
    inode (0 for TIME_WAIT, which has no socket left)."""
    found: dict[tuple[Endpoint, Endpoint], int] = {}
    with netns.enter(ns) if ns is not None else contextlib.nullcontext():
        diag = DiagSocket()
    with diag:
        try:
            diag.bind()
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in diag.get_sock_stats(family=family, states=_NOT_LISTENING):
                    key = (endpoint(msg["idiag_src"], msg["idiag_sport"]),
                           endpoint(msg["idiag_dst"], msg["idiag_dport"]))
                    found[key] = msg["idiag_inode"]
        except (NetlinkError, OSError) as e:
            raise NetError(f"cannot list the TCP connections of {netns.describe(ns)}: {e}") \
                from None
    return found
