"""Named network namespaces: create, remove, reap, enter, and open sockets inside them.

A named netns is a bind mount of an nsfs file on /var/run/netns/NAME, the convention shared
with `ip netns`. Names are global on the machine, so owners prefix them (the lab uses
`bd-<lab>-`) and `reap(prefix)` removes what a killed owner left behind.

Switching namespaces is per thread: `enter()` moves only the calling thread, so an agent
with other threads keeps serving while one of them works inside a node's namespace.

`iproute(None)` and `open_fd(None)` mean the calling thread's own namespace (the host's,
for a command run on a host), so links can be placed there too (a veth's host end).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import os
import socket
from collections.abc import Iterator

from pyroute2 import IPRoute
from pyroute2 import netns as _pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from backdoors.errors import NetError, require_root

NETNS_DIR = "/var/run/netns"
_CLONE_NEWNET = 0x40000000
_THREAD_NETNS = "/proc/thread-self/ns/net"
_SIOCGSKNS = 0x894C  # a socket's network namespace, as a new descriptor
_NETLINK_BUFFER = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)


def path(name: str) -> str:
    """The nsfs mount point of namespace `name` (checks the name, not the namespace)."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise NetError(
            f"invalid network namespace name {name!r}: use a non-empty name without '/'"
        )
    return os.path.join(NETNS_DIR, name)


def describe(name: str | None) -> str:
    """How messages name namespace `name` (None: the caller's own)."""
    return "the host's network namespace" if name is None else f"network namespace {name!r}"


def exists(name: str) -> bool:
    """True if `name` is a live named namespace (a stale, unmounted file does not count)."""
    try:
        st = os.stat(path(name))
    except FileNotFoundError:
        return False
    # A mounted namespace lives on the nsfs device, like our own thread's namespace.
    return st.st_dev == os.stat(_THREAD_NETNS).st_dev


def names(prefix: str = "") -> list[str]:
    """Sorted names under /var/run/netns starting with `prefix` (stale entries included)."""
    return sorted(n for n in _pyroute2_netns.listnetns() if n.startswith(prefix))


def create(name: str, *, exist_ok: bool = False) -> None:
    """Create namespace `name` with `lo` up.

    An existing namespace is an error unless `exist_ok`: a name collision usually means
    another owner's leftovers, which `reap()` should clear first.
    """
    require_root(f"creating network namespace {name!r}")
    ns_path = path(name)
    if exists(name):
        if exist_ok:
            return
        raise NetError(
            f"network namespace {name!r} already exists: remove it (netns.remove) or "
            "reap its owner's leftovers (netns.reap) first"
        )
    if os.path.lexists(ns_path):  # stale file of a create that was killed halfway
        _remove_mount(name)
    try:
        _pyroute2_netns.create(name, libc=_libc)
    except OSError as e:
        raise NetError(f"cannot create network namespace {name!r}: {e}") from e
    try:
        with iproute(name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    except (NetlinkError, IndexError) as e:
        _remove_mount(name)
        raise NetError(f"cannot bring lo up in new network namespace {name!r}: {e}") from e


def remove(name: str) -> None:
    """Remove namespace `name`; a missing one is fine.

    The kernel destroys the namespace (and its interfaces; veth peers elsewhere go too)
    once nothing else holds it: no process inside, no open socket created inside.
    """
    require_root(f"removing network namespace {name!r}", "it unmounts /run/netns")
    if os.path.lexists(path(name)):
        _remove_mount(name)


def reap(prefix: str) -> list[str]:
    """Remove every namespace whose name starts with `prefix`; return their names.

    For an owner's start-up: it clears what a previous, SIGKILLed instance left.
    """
    if not prefix:
        raise NetError("reap needs a non-empty name prefix: it would remove every namespace")
    reaped = names(prefix)
    for name in reaped:
        remove(name)
    return reaped


@contextlib.contextmanager
def enter(name: str) -> Iterator[None]:
    """Run the body with the calling thread inside namespace `name`, then switch back.

    Only this thread moves. Keep the body short and synchronous: everything the thread
    does meanwhile (including other coroutines of an event loop it runs) happens in `name`.
    """
    require_root(f"entering network namespace {name!r}", "setns(2) needs CAP_SYS_ADMIN")
    target = open_fd(name)
    try:
        saved = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, f"cannot enter network namespace {name!r}")
            try:
                yield
            finally:
                _setns(saved, f"cannot return from network namespace {name!r}")
        finally:
            os.close(saved)
    finally:
        os.close(target)


def socket_in(
    name: str,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,  # noqa: A002 - mirrors socket.socket()
    proto: int = 0,
) -> socket.socket:
    """A new socket that belongs to namespace `name` (a socket's netns is fixed at creation)."""
    with enter(name):
        return socket.socket(family, type, proto)


@contextlib.contextmanager
def iproute(name: str | None) -> Iterator[IPRoute]:
    """A pyroute2 IPRoute talking to namespace `name` (None: the caller's), closed on exit.

    Its netlink socket is opened with `socket_in`, which costs ~0.1 ms, where
    `IPRoute(netns=...)` forks a child per socket (~10 ms, more in a big process) and
    silently creates a missing namespace. Like any synchronous IPRoute it cannot run in a
    thread with a running asyncio loop: use asyncio.to_thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise NetError(
            f"netlink on namespace {name!r} called from a running asyncio loop: "
            "pyroute2's synchronous API cannot run there; call it via asyncio.to_thread"
        )
    args = (socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
    sock = socket.socket(*args) if name is None else socket_in(name, *args)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _NETLINK_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _NETLINK_BUFFER)
        ipr = IPRoute(use_socket=sock)
    except BaseException:
        sock.close()
        raise
    try:
        yield ipr
    finally:
        ipr.close()  # closes sock too


def open_fd(name: str | None) -> int:
    """An O_CLOEXEC descriptor of namespace `name` (None: the calling thread's; the caller
    closes it); NetError if it does not exist, also when it is removed between the check
    and the open."""
    if name is None:
        return os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    missing = NetError(
        f"network namespace {name!r} does not exist: create it first (netns.create)"
    )
    if not exists(name):
        raise missing
    try:
        return os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise missing from None


def same_as_socket(name: str, fd: int) -> bool:
    """Whether the socket `fd` lives in namespace `name` (SIOCGSKNS: the kernel's own
    answer, whichever namespace the socket's maker had entered since); NetError if `fd`
    is no socket or namespace `name` does not exist."""
    try:
        ns_fd = fcntl.ioctl(fd, _SIOCGSKNS)
    except OSError as e:
        raise NetError(f"cannot tell the socket's network namespace (SIOCGSKNS): "
                       f"{e.strerror}") from None
    try:
        theirs = os.fstat(ns_fd)
    finally:
        os.close(ns_fd)
    try:
        ours = os.stat(path(name))
    except OSError as e:
        raise NetError(f"network namespace {name!r}: {e.strerror} ({path(name)})") from None
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetError(f"{what}: setns: {os.strerror(err)} (needs CAP_SYS_ADMIN)")


def _remove_mount(name: str) -> None:
    try:
        _pyroute2_netns.remove(name, libc=_libc)  # lazy unmount (errors ignored), then unlink
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise NetError(f"cannot remove network namespace {name!r}: {e}") from e


def set_sysctl(name: str, key: str, value: str | int) -> None:
    """Write a network sysctl (e.g. "net/ipv4/conf/eth0/arp_announce") inside namespace
    `name`: /proc/sys/net belongs to the namespace of the thread that opens it."""
    with enter(name):
        try:
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(str(value))
        except OSError as e:
            raise NetError(f"cannot set {key} = {value} in namespace {name!r}: {e.strerror}") from None
