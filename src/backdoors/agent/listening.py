"""Listening sockets of the agent and the monitor, optionally bound to one interface.

Linux accepts a packet for any of its addresses on any interface (the weak host model): a
listener on the private address 10.99.0.11 also answers a connection that reaches that
address through the service network, from a node. Bound to the private interface as well
(SO_BINDTODEVICE, `listen_interface`), it accepts only connections whose packets arrive
on that interface, whatever the firewall. A process of the same host connecting to an
address of that interface is still accepted: the kernel counts its looped-back packets as
arriving on the interface that holds the address.
"""

from __future__ import annotations

import errno
import re
import socket

from ..common.configfile import parse_address
from ..errors import AgentError, BackdoorsError

#: a Linux interface name: at most IFNAMSIZ - 1 bytes, no '/', ':' or whitespace
IFNAME = re.compile(r"[^/:\s]{1,15}")


class ListenError(AgentError):
    """A listening socket could not be made; the message says which and why."""


def interface_problem(name: str) -> str | None:
    """Why `name` cannot be an interface name, or None."""
    if IFNAME.fullmatch(name) is None or name in (".", ".."):
        return f"{name!r} is not an interface name (1-15 characters, no '/', ':' or spaces)"
    return None


def listen_socket(listen: str, *, netns: str | None = None, interface: str | None = None,
                  backlog: int = 128, what: str = "listener") -> socket.socket:
    """A TCP socket listening on `listen` ("ADDR:PORT"), made in `netns` if given, and
    bound to `interface` if given (then `listen` should be one of its addresses, or the
    wildcard: any of them). ListenError names `what`, the address, the interface and the
    cause. Called on the agent's event loop before its seal: no netlink, no thread."""
    host, port = parse_address(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    where = (f" on interface {interface}" if interface else "") + \
        (f" in netns {netns}" if netns else "")
    prefix = f"cannot serve {what} on {listen}{where}"
    try:
        sock = _tcp_socket(netns, family)
    except (OSError, BackdoorsError) as e:
        raise ListenError(f"{prefix}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if interface is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            except OSError as e:
                raise ListenError(f"{prefix}: SO_BINDTODEVICE: " + (
                    "it needs CAP_NET_RAW on Linux before 5.7" if e.errno == errno.EPERM else
                    f"no interface {interface} (listen_interface)" if e.errno == errno.ENODEV else
                    e.strerror)) from None
        sock.bind((host, port))
        sock.listen(backlog)
        if interface is not None and host not in ("0.0.0.0", "::"):
            _check_on_interface(sock, host, netns, family, prefix, interface)
    except OSError as e:
        sock.close()
        raise ListenError(f"{prefix}: {e.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _check_on_interface(sock: socket.socket, host: str, netns: str | None, family: int,
                        prefix: str, interface: str) -> None:
    """ListenError unless `host` is an address of `interface`: bound to the interface, a
    listener on another one's address is never reached (a connection from this host to an
    address of the interface counts as arriving on it, so one is tried)."""
    with _tcp_socket(netns, family) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(sock.getsockname()[:2])
        except OSError:
            raise ListenError(f"{prefix}: {host} is not an address of interface {interface}, "
                              "so nothing can reach it (listen_interface must hold the "
                              "listen address)") from None
        sock.settimeout(1.0)
        try:
            sock.accept()[0].close()  # (the probe, not left for the server to find)
        finally:
            sock.settimeout(None)


def _tcp_socket(netns: str | None, family: int) -> socket.socket:
    if netns:
        from ..net.netns import socket_in  # pyroute2: only when needed
        return socket_in(netns, family)
    return socket.socket(family, socket.SOCK_STREAM)
