"""A real evacuation whose target answers badly loses nothing (issue 10, finding 11).

First test: one host, two container nodes with the recoverable service, three verifying
stream clients on n0. n0 is fenced and evacuated first to the real agent but a node it
does not have (a failed reply), then to a fake peer agent (a listener on the private
network answering garbage to whatever it is sent): each evacuate fails with the reason,
and the dumped sessions stay at the source (limbo). A good evacuate to n1 moves all
three, and every client's stream continues byte-exact. Only the public lab and client
helpers are used, so the test does not depend on how agents authenticate each other.

The others: a target agent killed during an evacuate; a target whose answer is lost after
it took the sessions (a relay drops it), evacuated to again or to another node; a lost
answer followed by hung-up clients and an unreachable first target; a target that refused
some sessions while it took the others.
"""

import socket
import threading
import time

import pytest

from backdoors.errors import AgentError
from backdoors.lab import Lab, topology
from backdoors.lab.clients import StreamClients
from backdoors.net import netns as netns_mod
from backdoors.net import sockets as net_sockets

pytestmark = pytest.mark.root


def wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Listener:
    """A listener on the private network of `netns` at `address`, a port of its own; each
    connection goes to `serve`, on the listener's thread (started last: a subclass sets
    what `serve` uses first)."""

    def __init__(self, netns: str, address: str):
        self.netns = netns
        with netns_mod.enter(netns):
            self.sock = socket.create_server((address, 0))
        self.address = f"{address}:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class GarbagePeer(Listener):
    """A listener that answers every connection with garbage."""

    connections = 0

    def serve(self, conn: socket.socket) -> None:
        self.connections += 1
        with conn:
            conn.settimeout(2.0)
            try:
                conn.recv(65536)
                conn.sendall(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1 not an agent\n" * 4)
            except OSError:
                pass


def test_sessions_survive_a_malformed_and_a_failed_evacuate_then_move(root, unique):
    """A target that refuses (no such node), then one whose answer is garbage (the
    sessions may be there: another target must wait for its word), then the good one."""
    with Lab(f"e{unique}", hosts=1, nodes=2, agents=True, services=False) as lab:
        for node in ("n0", "n1"):
            lab.start_service(node, "--rate", "4096", recoverable=True)
        host = lab.plan.host("h0")
        vip = lab.plan.node("n0").vip
        fake = GarbagePeer(host.netns, host.address)
        try:
            with lab.agent_client("h0", timeout=30) as c, \
                    StreamClients(lab, vip, topology.RECOVERABLE_PORT, 3) as clients:
                wait(lambda: len(c.call("sessions", node="n0")) == 3, 20, "3 held sessions")
                wait(lambda: all(o > 0 for o in clients.offsets()), 20, "data on every session")
                c.call("fence", node="n0")

                with pytest.raises(AgentError, match=r"3 sessions dumped .*did not adopt.*n9.*kept"):
                    c.call("evacuate", node="n0", to=lab.agent_address("h0"), to_agent="h0",
                           to_node="n9")
                assert c.call("sessions", node="n1") == []

                with pytest.raises(AgentError, match=r"3 sessions dumped but the agent at "
                                                     rf"{fake.address} did not adopt them.*kept"):
                    c.call("evacuate", node="n0", to=fake.address, to_agent="h0", to_node="n1")
                assert fake.connections >= 1
                assert c.call("sessions", node="n1") == []  # nothing arrived anywhere

                # its answer unreadable, "n1 of h0" may have them: it is asked before they
                # go elsewhere, and cannot say (garbage again)
                with pytest.raises(AgentError, match=r"3 sessions may be served on node n1 of "
                                                     r"agent h0 already.*cannot say.*kept"):
                    c.call("evacuate", node="n0", to=lab.agent_address("h0"), to_agent="h0",
                           to_node="n9")

                at = clients.offsets()
                since = time.monotonic()
                moved = c.call("evacuate", node="n0", to=lab.agent_address("h0"), to_agent="h0",
                               to_node="n1")
                assert moved["moved"] == 3 and not moved["failed"], moved
                wait(lambda: clients.beyond(at), 30,
                     "every stream to continue after the good evacuate")
                report = clients.report(since, progressed_from=at)
                assert report["sessions_ok"] == 3, report
                assert report["bytes_lost"] == report["bytes_duplicated"] == 0, report
                assert len(c.call("sessions", node="n1")) == 3
        finally:
            fake.close()


def _accept_queue(netns: str, address: str) -> int:
    """Connections waiting to be accepted on the TCP listener at "IPv4:PORT" `address` of
    namespace `netns` (for a listener, /proc/net/tcp's rx_queue is that count)."""
    ip, port = address.rsplit(":", 1)
    local = f"{int.from_bytes(socket.inet_aton(ip), 'little'):08X}:{int(port):04X}"
    with netns_mod.enter(netns):
        table = open("/proc/thread-self/net/tcp").read()
    for line in table.splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no listener at {address} in namespace {netns}")


def test_a_target_agent_killed_during_an_evacuate_loses_no_session(root, unique):
    """The target's agent is stopped before the evacuate, so that it takes nothing, and
    killed (SIGKILL) once the source, its 400 sessions dumped, waits on it: the evacuate
    fails with every session kept at the source; once the keeper has started a new agent
    there, the next evacuate moves them all, byte-exact. (A kill after the target handed
    the sessions to its server is the case of the next test: the answer lost.)"""
    import os
    import signal

    count = 400
    with Lab(f"e{unique}", hosts=2, nodes=2, agents=True, services=False,
             pids_limit=2 * count + 256) as lab:
        for node in ("n0", "n1"):
            lab.start_service(node, "--rate", "2048", recoverable=True)
        vip = lab.plan.node("n0").vip
        with lab.agent_client("h0", timeout=60) as c, \
                StreamClients(lab, vip, topology.RECOVERABLE_PORT, count) as clients:
            wait(lambda: len(c.call("sessions", node="n0")) == count, 60,
                 f"{count} held sessions")
            c.call("fence", node="n0")
            target = lab.agent_pid("h1")
            failed: list[str] = []

            def evacuate():
                try:
                    c.call("evacuate", node="n0", to=lab.agent_address("h1"), to_agent="h1",
                           to_node="n1")
                except AgentError as e:
                    failed.append(str(e))

            os.kill(target, signal.SIGSTOP)
            t = threading.Thread(target=evacuate)
            try:
                t.start()
                wait(lambda: _accept_queue(lab.plan.host("h1").netns,
                                           lab.agent_address("h1")) > 0, 60,
                     "the source's connection to the stopped target")
            finally:
                os.kill(target, signal.SIGKILL)
            t.join()
            assert failed and f"{count} sessions dumped" in failed[0] and "kept" in failed[0], failed
            wait(lambda: lab.agent_pid("h1") not in (None, target), 30, "a new agent on h1")

            at = clients.offsets()
            since = time.monotonic()
            deadline = time.monotonic() + 30
            while True:  # the new agent may still be taking its nodes back
                try:
                    moved = c.call("evacuate", node="n0", to=lab.agent_address("h1"),
                                   to_agent="h1", to_node="n1")
                    break
                except AgentError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            assert moved["moved"] == count and not moved["failed"], moved["failed"]
            wait(lambda: clients.beyond(at), 60,
                 "every stream to continue after the good evacuate")
            report = clients.report(since, progressed_from=at)
            assert report["sessions_ok"] == count, report
            assert report["bytes_lost"] == report["bytes_duplicated"] == 0, report


class Relay(Listener):
    """A relay to a real agent. While `lose` is set it forwards a connection's request but
    loses the answer: once the agent has answered (read whole, so it acted), the relay
    closes the connection instead of passing the answer on. While `refuse` is set it
    closes every connection at once (the agent cannot be reached). Else it relays both
    ways."""

    def __init__(self, netns: str, address: str, upstream: str):
        self.upstream = upstream
        self.lose, self.refuse, self.lost = True, False, 0
        super().__init__(netns, address)

    def serve(self, conn: socket.socket) -> None:
        if self.refuse:
            conn.close()
            return
        host, port = self.upstream.rsplit(":", 1)
        with netns_mod.enter(self.netns):
            up = socket.create_connection((host, int(port)), timeout=60)
        threading.Thread(target=self._forward, args=(conn, up), daemon=True).start()
        if not self.lose:
            threading.Thread(target=self._forward, args=(up, conn), daemon=True).start()
            return
        with conn, up, up.makefile("rb") as answers:
            answers.read(int.from_bytes(answers.read(4), "big"))  # the answer, dropped
            self.lost += 1
            conn.shutdown(socket.SHUT_RDWR)  # (wakes the forwarding thread's recv)

    @staticmethod
    def _forward(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _lose_an_answer(lab, c, relay, count: int) -> None:
    """Fence n0 and evacuate it to n1 through `relay`, which loses the answer."""
    c.call("fence", node="n0")
    with pytest.raises(AgentError, match=rf"{count} sessions dumped .*kept"):
        c.call("evacuate", node="n0", to=relay.address, to_agent="h1", to_node="n1")
    assert relay.lost == 1
    assert c.held("n0").limbo == count  # the source's copies, stale from now on


@pytest.mark.parametrize("retry", ["same", "another"])
def test_an_evacuate_whose_answer_was_lost_is_not_moved_twice(root, unique, retry):
    """The target agent takes the sessions but its answer is lost (as when it dies right
    after handing them to its server): the evacuate fails and the source keeps its dumps,
    now stale copies of sessions served on the target. Evacuating to that target again
    finds them there (its adopt answers "present"); evacuating to another node first asks
    that target (op `present`). Either way the source drops its copies, nothing is
    restored twice, the other node does not take the service address, and every stream
    continues byte-exact across both evacuates."""
    count = 20
    with Lab(f"e{unique}", hosts=2, nodes=3, agents=True, services=False) as lab:
        for node in ("n0", "n1", "n2"):
            lab.start_service(node, "--rate", "4096", recoverable=True)
        vip = lab.plan.node("n0").vip
        host = lab.plan.host("h0")
        relay = Relay(host.netns, host.address, lab.agent_address("h1"))
        try:
            with lab.agent_client("h0", timeout=60) as c, lab.agent_client("h1") as c1, \
                    StreamClients(lab, vip, topology.RECOVERABLE_PORT, count) as clients:
                wait(lambda: len(c.call("sessions", node="n0")) == count, 30,
                     f"{count} held sessions")
                wait(lambda: all(o > 0 for o in clients.offsets()), 20, "data on every session")
                at = clients.offsets()
                since = time.monotonic()
                _lose_an_answer(lab, c, relay, count)
                wait(lambda: clients.beyond(at), 30,
                     "every stream to continue, served on n1")
                wait(lambda: len(c1.call("sessions", node="n1")) == count, 30,
                     f"{count} sessions held on n1")

                relay.lose = False
                if retry == "same":
                    again = c.call("evacuate", node="n0", to=lab.agent_address("h1"),
                                   to_agent="h1", to_node="n1")
                    assert sum(r["restored"] for r in again["adopt"]) == 0
                else:  # asked through the relay: the address the lost answer came from
                    again = c.call("evacuate", node="n0", to=lab.agent_address("h0"),
                                   to_agent="h0", to_node="n2")
                    assert again["adopt"] == []  # n2 is not sent anything, nor the address
                    assert c.call("sessions", node="n2") == []
                assert again["failed"] == {}, again["failed"]
                assert again["moved"] == again["present"] == count, again
                assert c.held("n0").limbo == 0
                assert len(c1.call("sessions", node="n1")) == count

                later = clients.offsets()
                wait(lambda: clients.beyond(later), 30,
                     "every stream to go on after the second evacuate")
                report = clients.report(since, progressed_from=at)
                assert report["sessions_ok"] == count, report
                assert report["bytes_lost"] == report["bytes_duplicated"] == 0, report
        finally:
            relay.close()


def test_after_a_lost_answer_sessions_go_elsewhere_only_once_their_target_says(root, unique):
    """After an evacuate to n1 lost its answer, an evacuate to n2 asks n1's agent first:
    while it cannot be reached the evacuate fails and every copy is kept; once it answers
    that it has some of the sessions but not all (5 clients hung up meanwhile), their
    copies are dropped and the others are kept, not sent to n2: n1 took the service
    address with the sessions it serves, and n2 taking it too would draw their packets
    away. Those 15 streams go on byte-exact on n1; n2 gets nothing."""
    with Lab(f"e{unique}", hosts=2, nodes=3, agents=True, services=False) as lab:
        for node in ("n0", "n1", "n2"):
            lab.start_service(node, "--rate", "4096", recoverable=True)
        vip = lab.plan.node("n0").vip
        host = lab.plan.host("h0")
        relay = Relay(host.netns, host.address, lab.agent_address("h1"))
        port = topology.RECOVERABLE_PORT

        def on_n1() -> int:
            return sum(local[1] == port for local, _ in
                       net_sockets.connections(lab.plan.node("n1").netns))

        try:
            with lab.agent_client("h0", timeout=60) as c, lab.agent_client("h1") as c1, \
                    StreamClients(lab, vip, port, 15) as kept, \
                    StreamClients(lab, vip, port, 5) as leaving:
                wait(lambda: len(c.call("sessions", node="n0")) == 20, 30, "20 held sessions")
                wait(lambda: all(o > 0 for o in kept.offsets() + leaving.offsets()), 20,
                     "data on every session")
                at = kept.offsets()
                since = time.monotonic()
                _lose_an_answer(lab, c, relay, 20)
                wait(lambda: len(c1.call("sessions", node="n1")) == 20, 30, "20 sessions on n1")

                relay.lose, relay.refuse = False, True
                with pytest.raises(AgentError, match=r"20 sessions may be served on node n1 "
                                                     r"of agent h1 already.*cannot say.*kept"):
                    c.call("evacuate", node="n0", to=lab.agent_address("h0"), to_agent="h0",
                           to_node="n2")
                assert c.held("n0").limbo == 20

                leaving.close()
                wait(lambda: on_n1() == 15, 30, "the 5 hung-up sessions to end on n1")
                relay.refuse = False
                with pytest.raises(AgentError, match=r"15 of its sessions are served on node n1 "
                                                     r"of agent h1 already.*other 5 are kept"):
                    c.call("evacuate", node="n0", to=lab.agent_address("h0"), to_agent="h0",
                           to_node="n2")
                assert c.held("n0").limbo == 5
                assert c.call("sessions", node="n2") == []

                later = kept.offsets()
                wait(lambda: kept.beyond(later), 30,
                     "the 15 streams to go on, on n1")
                report = kept.report(since, progressed_from=at)
                assert report["sessions_ok"] == 15, report
                assert report["bytes_lost"] == report["bytes_duplicated"] == 0, report
        finally:
            relay.close()



def test_sessions_a_target_refused_while_it_took_the_others_follow_them_only(root, unique):
    """n0 serves two recoverable services (ports 7100 and 7101); n1 runs only the first.
    An evacuate to n1 moves the 7100 sessions and n1 refuses the 7101 ones (no server for
    them): kept at the source. n1 now holds n0's service address with the sessions it
    serves, so the kept ones may not go to n2 (n2 taking the address would draw the
    others' packets away); once n1 runs the second service they follow there, and every
    stream continues byte-exact."""
    second = topology.RECOVERABLE_PORT + 1
    with Lab(f"e{unique}", hosts=2, nodes=3, agents=True, services=False) as lab:
        for node in ("n0", "n1", "n2"):
            lab.start_service(node, "--rate", "4096", recoverable=True)
        for node in ("n0", "n2"):
            lab.start_service(node, "--rate", "4096", "--port", str(second),
                              "--name", f"rsvc2-{node}", recoverable=True)
        vip = lab.plan.node("n0").vip
        with lab.agent_client("h0", timeout=60) as c, \
                StreamClients(lab, vip, topology.RECOVERABLE_PORT, 3) as first, \
                StreamClients(lab, vip, second, 2) as other:
            wait(lambda: len(c.call("sessions", node="n0")) == 5, 30, "5 held sessions")
            wait(lambda: all(o > 0 for o in first.offsets() + other.offsets()), 20,
                 "data on every session")
            at = first.offsets() + other.offsets()
            since = time.monotonic()
            c.call("fence", node="n0")
            moved = c.call("evacuate", node="n0", to=lab.agent_address("h1"), to_agent="h1",
                           to_node="n1")
            assert moved["sessions"] == 5 and moved["moved"] == 3, moved
            assert len(moved["failed"]) == 2 and all(
                "no recovery server" in why and "kept here" in why
                for why in moved["failed"].values()), moved["failed"]
            assert c.held("n0").limbo == 2

            with pytest.raises(AgentError, match=r"its 2 sessions kept here were refused by "
                                                 r"node n1 of agent h1.*can go only there"):
                c.call("evacuate", node="n0", to=lab.agent_address("h0"), to_agent="h0",
                       to_node="n2")
            assert c.held("n0").limbo == 2 and c.call("sessions", node="n2") == []

            lab.start_service("n1", "--rate", "4096", "--port", str(second),
                              "--name", "rsvc2-n1", recoverable=True)
            again = c.call("evacuate", node="n0", to=lab.agent_address("h1"), to_agent="h1",
                           to_node="n1")
            assert again["moved"] == 2 and again["failed"] == {}, again
            assert c.held("n0").limbo == 0

            wait(lambda: first.beyond(at[:3]) and other.beyond(at[3:]), 30,
                 "every stream to continue")
            for group, start in ((first, at[:3]), (other, at[3:])):
                report = group.report(since, progressed_from=start)
                assert report["sessions_ok"] == report["sessions"], report
                assert report["bytes_lost"] == report["bytes_duplicated"] == 0, report
