"""Named network namespaces: lifecycle, reaping after a killed owner, enter(), socket_in()."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from backdoors.errors import NetError
from backdoors.net import add_veth, link_info, netns

SO_NETNS_COOKIE = 71  # Linux >= 5.14


@pytest.fixture
def prefix(root, unique):
    """A namespace name prefix owned by this test; everything under it is reaped after."""
    p = f"bdt-{unique}-"
    yield p
    netns.reap(p)


def thread_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def netns_cookie(sock: socket.socket) -> int:
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def test_create_remove_lifecycle(prefix):
    name = prefix + "life"
    netns.create(name)
    assert netns.exists(name)
    assert netns.names(prefix) == [name]
    assert netns.path(name) == f"/var/run/netns/{name}"
    assert link_info(name, "lo").state == "up"

    netns.remove(name)
    assert not netns.exists(name)
    assert netns.names(prefix) == []
    netns.remove(name)  # idempotent


def test_create_twice_is_an_error_unless_exist_ok(prefix):
    name = prefix + "twice"
    netns.create(name)
    with pytest.raises(NetError, match=f"{name}.*already exists"):
        netns.create(name)
    netns.create(name, exist_ok=True)
    assert netns.exists(name)


def test_create_over_stale_file_of_a_killed_create(prefix):
    name = prefix + "stale"
    open(netns.path(name), "w").close()  # what a create killed before its mount leaves
    assert not netns.exists(name)
    netns.create(name)
    assert netns.exists(name)


@pytest.mark.parametrize("bad", ["", "a/b", "..", "."])
def test_invalid_names_are_rejected(root, bad):
    with pytest.raises(NetError, match="invalid network namespace name"):
        netns.create(bad)


def test_reap_needs_a_prefix(root):
    with pytest.raises(NetError, match="non-empty"):
        netns.reap("")


def test_reap_after_owner_was_sigkilled(prefix):
    """A SIGKILLed owner's namespaces (with their links) are gone after reap(prefix)."""
    keeper = prefix + "keeper"
    orphans = prefix + "orphan-"
    netns.create(keeper)
    owner = textwrap.dedent(f"""
        import sys, time
        from backdoors.net import add_bridge, add_veth, netns
        netns.create({orphans + "a"!r})
        netns.create({orphans + "b"!r})
        add_bridge({orphans + "a"!r}, "br0")
        add_veth({orphans + "a"!r}, "to-b", {orphans + "b"!r}, "eth0", bridge="br0")
        add_veth({orphans + "a"!r}, "to-keeper", {keeper!r}, "from-orphan")
        sock = netns.socket_in({orphans + "b"!r})  # a socket also pins its namespace
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert link_info(keeper, "from-orphan").operstate == "UP"

    assert netns.reap(orphans) == [orphans + "a", orphans + "b"]
    assert netns.names(orphans) == []
    # The kernel destroys the namespaces asynchronously; the veth end in keeper goes too.
    # link_info says so with NetError, also when the veth goes during its own request.
    deadline = time.monotonic() + 30  # a guard against a hang, not a timing figure
    while True:
        try:
            link_info(keeper, "from-orphan")
        except NetError:
            break
        assert time.monotonic() < deadline, "veth into a reaped namespace still exists"
        time.sleep(0.02)


def test_enter_moves_the_thread_and_restores_it(prefix):
    name = prefix + "enter"
    netns.create(name)
    outside = thread_netns()
    with netns.enter(name):
        assert thread_netns() == os.stat(netns.path(name)).st_ino
    assert thread_netns() == outside


def test_enter_restores_on_exception(prefix):
    name = prefix + "exc"
    netns.create(name)
    outside = thread_netns()
    with pytest.raises(ZeroDivisionError):
        with netns.enter(name):
            1 / 0
    assert thread_netns() == outside


def test_enter_nests(prefix):
    first, second = prefix + "n1", prefix + "n2"
    netns.create(first)
    netns.create(second)
    outside = thread_netns()
    with netns.enter(first):
        with netns.enter(second):
            assert thread_netns() == os.stat(netns.path(second)).st_ino
        assert thread_netns() == os.stat(netns.path(first)).st_ino
    assert thread_netns() == outside


def test_enter_does_not_move_other_threads(prefix):
    name = prefix + "thr"
    netns.create(name)
    outside = thread_netns()
    inside = os.stat(netns.path(name)).st_ino
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with netns.enter(name):
            seen["worker"] = thread_netns()
            entered.set()
            release.wait(5)
        seen["worker_after"] = thread_netns()

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert entered.wait(5)
        assert thread_netns() == outside  # this thread did not move
        assert seen["worker"] == inside
    finally:
        release.set()
        t.join(5)
    assert seen["worker_after"] == outside


def test_enter_missing_namespace_is_a_clear_error(prefix):
    outside = thread_netns()
    with pytest.raises(NetError, match=f"{prefix}missing.*does not exist.*netns.create"):
        with netns.enter(prefix + "missing"):
            pass
    assert thread_netns() == outside


def test_namespace_removed_after_the_check_is_the_same_clear_error(prefix, monkeypatch):
    """Removed between exists() and open: NetError, not a raw FileNotFoundError."""
    here = prefix + "here"
    netns.create(here)
    monkeypatch.setattr(netns, "exists", lambda name: True)
    with pytest.raises(NetError, match=f"{prefix}gone.*does not exist"):
        with netns.enter(prefix + "gone"):
            pass
    with pytest.raises(NetError, match=f"{prefix}gone.*does not exist"):
        add_veth(here, "v0", prefix + "gone", "eth0")


def test_socket_in_belongs_to_the_namespace(prefix):
    name = prefix + "sock"
    netns.create(name)
    with netns.socket_in(name) as a, netns.socket_in(name, socket.AF_INET, socket.SOCK_DGRAM) as b:
        with socket.socket() as here:
            assert netns_cookie(a) == netns_cookie(b) != netns_cookie(here)
        # The namespace's own loopback works for its sockets.
        a.bind(("127.0.0.1", 0))
        a.listen()
        with netns.socket_in(name) as client:
            client.settimeout(2)
            client.connect(a.getsockname())


def test_iproute_refuses_a_running_event_loop(prefix):
    name = prefix + "aio"
    netns.create(name)

    async def main():
        with netns.iproute(name):
            pass

    with pytest.raises(NetError, match="asyncio.to_thread"):
        asyncio.run(main())

    async def via_thread():
        return await asyncio.to_thread(link_info, name, "lo")

    assert asyncio.run(via_thread()).state == "up"


def test_add_veth_into_missing_namespace_fails_and_leaves_nothing(prefix):
    name = prefix + "solo"
    netns.create(name)
    with pytest.raises(NetError, match=f"{prefix}nowhere.*does not exist"):
        add_veth(name, "v0", prefix + "nowhere", "eth0")
    with pytest.raises(NetError, match="no interface 'v0'"):
        link_info(name, "v0")
