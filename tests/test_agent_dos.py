"""Availability against keyless clients and hostile nodes (issue 10, findings 5 and 9).

A client without a key may open connections to the agent, but cannot hold the slots a
monitor needs: a connection must authenticate within `auth_timeout_s`, a failed
authentication closes it, unauthenticated connections are capped overall and per source
address (the oldest gives way to a new one), and a peer that does not read its replies is
dropped. A node's hostile Sensor Boxes (a generation stuck odd) cost only that node: the
`sensors` op runs on the node's own memory lane, and a box that keeps failing is skipped
for a while and reported, so the other nodes' reads stay fast and never `busy`.
"""

import json
import socket
import threading
import time

import msgspec
import pytest
from test_agent_support import agent_lab, prefix, read_line, wait_for  # noqa: F401

from backdoors.agent.errors import AgentError
from backdoors.agent.protocol import MAX_EACH, Envelope, Response, SensorsManyReply, frame
from backdoors.agent.server import _pending
from backdoors.scenarios.flood import KeylessFlood, loopback_addresses

pytestmark = pytest.mark.root


def _connect(lab, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(lab.agent.address, timeout=10, source_address=(source, 0))
    return s


def _closed_by_agent(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the agent sent until it closed `s` (AssertionError if it did not)."""
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the agent kept the connection open for {timeout} s") from None
    return data


def _replies(data: bytes) -> list[Response]:
    out = []
    while len(data) >= 4:
        size = int.from_bytes(data[:4], "big")
        env = msgspec.msgpack.decode(data[4:4 + size], type=Envelope)
        out.append(msgspec.msgpack.decode(env.body, type=Response))
        data = data[4 + size:]
    return out


def Flood(lab, count: int, addresses: list[str]) -> KeylessFlood:
    """The agent's keyless flood (scenarios.flood), `count` connections from `addresses`."""
    return KeylessFlood(lab.agent.address, count, addresses, connect_timeout=10)


# -- finding 5: keyless connections -----------------------------------------------------


def test_keyless_idle_connections_cannot_lock_a_monitor_out(agent_lab):
    lab = agent_lab()
    cap = lab.config.max_connections
    held = lab.client("m2")
    assert held.ping()
    sock = held._sock
    with Flood(lab, cap, loopback_addresses(cap)) as flood:
        wait_for(lambda: flood.opened >= cap, what="the flood's connections")
        assert held.ping() and held._sock is sock  # an authenticated connection stays
        c = lab.client(timeout=5)
        for _ in range(20):
            assert c.ping()
            c.close()  # a new connection each time: each must get in
        # the silent connections are closed (pre-authentication timeout or room made for
        # the monitor), and the agent never holds more of them than its reserve allows
        wait_for(lambda: flood.closed_by_agent >= cap, timeout=15,
                 what="silent connections closed")
    assert lab.agent.agent.rpc.unauthenticated <= lab.config.max_unauthenticated


def test_a_request_whose_connection_gave_way_to_a_flood_is_sent_again(agent_lab):
    """Seen in CI (run 99, beside stress-ng): a monitor's new connection became the oldest
    unauthenticated one before the agent read its request, gave way to a keyless flood's
    newer connection, and the request failed ("busy: ... gave way"). It was not served:
    the client now sends it again on a new connection. (And the agent counts a request
    still in the kernel's queue as on its way: silent connections give way first.)"""
    lab = agent_lab()
    c = lab.client(timeout=10)
    connect, flood = c._connect, []

    def connect_then_flood(timeout):  # connected, the request not sent yet
        connect(timeout)
        if flood:
            return
        for source in loopback_addresses(lab.config.max_unauthenticated):
            flood.append(socket.create_connection(lab.agent.address, timeout=10,
                                                  source_address=(source, 0)))
        wait_for(lambda: _has_bytes(c._sock), what="the agent's word that it gave way")
    c._connect = connect_then_flood
    try:
        assert c.ping()
    finally:
        c.close()
        for s in flood:
            s.close()
    assert len(flood) == lab.config.max_unauthenticated


def _has_bytes(s: socket.socket) -> bool:
    try:
        return bool(s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def _still_open(s: socket.socket) -> bool:
    """Whether the agent neither closed `s` nor told it anything."""
    s.settimeout(0)
    try:
        s.recv(1, socket.MSG_PEEK)  # bytes, or b"" at the end
    except BlockingIOError:
        return True
    return False


def test_one_address_holds_at_most_its_share(agent_lab):
    lab = agent_lab()
    per_address = lab.config.max_unauthenticated_per_address
    with Flood(lab, 3 * per_address, ["127.0.0.9"]) as flood:
        wait_for(lambda: flood.opened >= 3 * per_address, what="the flood's connections")
        wait_for(lambda: lab.agent.agent.rpc.unauthenticated_from("127.0.0.9") <= per_address,
                 what="the address held to its share")
        other = _connect(lab, "127.0.0.10")
        # a different address still gets a slot: its request is answered
        c = lab.client()
        payload, _ = c.signed_request("ping", {})
        other.sendall(frame(payload))
        size = int.from_bytes(other.recv(4), "big")
        assert size > 0
        other.close()
        assert lab.agent.agent.rpc.unauthenticated_from("127.0.0.9") <= per_address


def test_a_silent_connection_is_closed_after_the_auth_timeout(agent_lab):
    lab = agent_lab(auth_timeout_s=0.3)
    s = _connect(lab)
    s.sendall(b"\0\0")  # half a header, then nothing
    assert _closed_by_agent(s) == b""
    s.close()


def test_a_failed_authentication_closes_the_connection(agent_lab):
    lab = agent_lab()
    c = lab.client()
    payload, _ = c.signed_request("ping", {})
    env = msgspec.msgpack.decode(payload, type=Envelope)
    forged = msgspec.msgpack.encode(Envelope(env.body, bytes(32)))
    s = _connect(lab)
    s.sendall(frame(forged) + frame(forged))  # the second is never read
    [reply] = _replies(_closed_by_agent(s))
    assert reply.error.code == "auth"
    s.close()
    assert c.ping()


def test_an_authenticated_connection_stays_past_the_auth_timeout(agent_lab):
    lab = agent_lab(auth_timeout_s=0.3)
    c = lab.client()
    assert c.ping()
    time.sleep(0.6)  # longer than the auth timeout: an authenticated connection stays
    sock = c.take_socket()
    payload, _ = c.signed_request("ping", {})
    sock.sendall(frame(payload))
    sock.settimeout(5)
    assert int.from_bytes(sock.recv(4), "big") > 0
    sock.close()


def test_a_peer_that_reads_no_replies_is_dropped(agent_lab):
    lab = agent_lab(send_timeout_s=0.5)
    lab.start_app("n0", mailbox=True)
    c = lab.client()
    s = _connect(lab)
    s.settimeout(30)
    rpc = lab.agent.agent.rpc
    wait_for(lambda: rpc.connections == 1, what="the connection")
    sent = 0
    try:  # 4 KiB replies, never read, until the agent stops taking requests
        while True:
            payload, _ = c.signed_request("read", {"node": "n0", "region": "mailbox",
                                                   "offset": 0, "length": 4096})
            s.sendall(frame(payload))
            sent += 1
    except (TimeoutError, ConnectionResetError, BrokenPipeError):
        pass
    assert sent > 10
    wait_for(lambda: rpc.connections == 0, timeout=15, what="the non-reader dropped")
    assert lab.client("m2").ping()
    s.close()


def test_a_subscriber_that_does_not_read_is_dropped(agent_lab):
    lab = agent_lab()
    bus = lab.agent.agent.events
    c = lab.client()
    c.call("subscribe")
    stuck = c.take_socket()  # never read
    wait_for(lambda: bus.subscribers == 1, what="the subscriber")
    pad = "x" * 16384
    for i in range(2048):  # 32 MiB: more than the socket buffers hold
        bus.publish("test", "n0", pad=pad, i=i)
        if i % 256 == 0:
            assert lab.client("m2").ping()  # the agent answers meanwhile
    wait_for(lambda: bus.subscribers == 0, timeout=20, what="the stuck subscriber dropped")
    stuck.close()


# -- finding 9: hostile Sensor Boxes ----------------------------------------------------

# Registers argv[1] Sensor Boxes, then leaves each one's generation odd: a writer that
# never finishes adding a sensor, so no copy of it ever settles.
STUCK = """
import json, sys, time
from backdoors.sensors import SensorBox, abi
from backdoors.common.runtime import register_box
boxes = []
for i in range(int(sys.argv[1])):
    box = SensorBox.create(f"stuck{i}")
    box.progress("tick", deadline=1.0)
    register_box(box)
    box._words[abi.OFF_GENERATION // 8] |= 1
    boxes.append(box)
print(json.dumps({"stuck": len(boxes)}), flush=True)
time.sleep(600)
"""


def test_a_node_of_stuck_boxes_does_not_make_other_nodes_busy(agent_lab):
    lab = agent_lab(nodes={"n0": {}, "n1": {}})
    stuck = lab.config.max_regions_per_node
    lab.start_app("n1")
    proc = lab.run("n0", STUCK, str(stuck))
    assert json.loads(read_line(proc, 30)) == {"stuck": stuck}
    stop, hostile_errors = threading.Event(), []

    def poll_hostile():  # the monitors poll the hostile node too, as they poll every node
        c = lab.client("m2", timeout=10)
        while not stop.is_set():
            try:
                c.sensors("n0")
            except AgentError as e:
                hostile_errors.append(e.code)

    pollers = [threading.Thread(target=poll_hostile, daemon=True) for _ in range(3)]
    for t in pollers:
        t.start()
    try:
        c = lab.client(timeout=10)
        for _ in range(60):
            reply = c.sensors("n1")  # raises on busy or deadline
            assert "app" in reply.boxes and not reply.errors
    finally:
        stop.set()
        for t in pollers:
            t.join(15)
    # the hostile node's own reads: its stuck boxes reported, the kernel box still read
    reply = lab.client().sensors("n0")
    assert "kernel" in reply.boxes
    assert {f"stuck{i}" for i in range(stuck)} <= set(reply.errors)
    assert any("skipped" in m for m in reply.errors.values())
    assert reply.skipped and set(reply.skipped) <= set(reply.errors)


# Registers argv[1] boxes of the largest capacity, every slot a progress counter with a
# name of the longest length: each box and its tracking near the most one box can be.
BIG = """
import json, sys, time
from backdoors.sensors import SensorBox, abi
from backdoors.common.runtime import register_box
boxes = []
for i in range(int(sys.argv[1])):
    box = SensorBox.create(f"big{i}", capacity=abi.MAX_CAPACITY)
    for k in range(abi.MAX_CAPACITY):
        box.progress(f"{i:04d}-{k:04d}".ljust(abi.MAX_NAME_BYTES, "x"), deadline=60.0)
    register_box(box, timeout=60)  # the agent rests a node whose registrations cost much
    boxes.append(box)
print(json.dumps({"big": len(boxes)}), flush=True)
time.sleep(600)
"""


def _boxes_in_n0(lab, script: str, what: str, count: int, **client):
    """Run `script` in node n0 to register `count` boxes; a client, once the agent holds
    them (beside the node's kernel box)."""
    proc = lab.run("n0", script, str(count))
    assert json.loads(read_line(proc, 60)) == {what: count}
    c = lab.client(**client)
    wait_for(lambda: len(c.call("regions", node="n0")) == count + 1, timeout=10,
             what=f"the {what} boxes registered")
    return c


def test_a_node_whose_boxes_overflow_a_reply_gets_a_reply_that_fits(agent_lab):
    """Boxes that would make a `sensors` reply larger than a frame are left out of it
    (named in its errors): the monitor still reads the node, and the agent stays
    reachable, rather than every reply of that node being refused as too large."""
    # a long deadline: the time budget of a read (test above) does not cut it short here
    lab = agent_lab(nodes={"n0": {}, "n1": {}}, op_deadline_s=30.0)
    lab.start_app("n1")
    c = _boxes_in_n0(lab, BIG, "big", 6, timeout=40)
    reply = c.sensors("n0")
    assert "kernel" in reply.boxes
    read = {f"big{i}" for i in range(6)} & set(reply.boxes)
    left = {f"big{i}" for i in range(6)} - read
    assert read and left, (sorted(read), sorted(left))
    assert all("full" in reply.errors[b] for b in left), {b: reply.errors[b] for b in left}
    many = c.sensors_many()
    assert set(many.replies) | set(many.errors) == {"n0", "n1"}
    assert "app" in many.replies["n1"].boxes
    assert many.errors.get("n0", None) is None or many.errors["n0"].code == "too_large"


def test_one_request_reads_many_nodes_each_as_alone(agent_lab):
    """`sensors_many` gives each node what its own `sensors` call would: a hostile
    node's stuck boxes stay its own errors, an unknown node is an error of its own, and
    a request naming no node reads every node."""
    lab = agent_lab(nodes={"n0": {}, "n1": {}})
    lab.start_app("n1")
    c = _boxes_in_n0(lab, STUCK, "stuck", 4, timeout=10)
    many = c.sensors_many(["n1", "n0", "gone"])
    assert set(many.replies) == {"n0", "n1"}
    assert "app" in many.replies["n1"].boxes and not many.replies["n1"].errors
    assert "kernel" in many.replies["n0"].boxes
    assert {f"stuck{i}" for i in range(4)} <= set(many.replies["n0"].errors)
    assert many.errors["gone"].code == "no_such_node"
    assert set(c.sensors_many().replies) == {"n0", "n1"}
    for bad in (["n0", "n0"], ["n0", "x" * 200], ["../n0"]):
        with pytest.raises(AgentError) as e:
            c.sensors_many(bad)
        assert e.value.code == "bad_request"
    # more names than one request takes: the client sends them in turns, each answered
    unknown = [f"u{i}" for i in range(2 * MAX_EACH)]
    many = c.sensors_many(unknown[:MAX_EACH] + ["n0"] + unknown[MAX_EACH:] + ["n1"])
    assert set(many.replies) == {"n0", "n1"} and "kernel" in many.replies["n1"].boxes
    assert set(many.errors) >= set(unknown) and many.errors["u0"].code == "no_such_node"
    with pytest.raises(AgentError) as e:  # the agent's own limit stands
        c._typed("sensors_many", SensorsManyReply, nodes=unknown[:MAX_EACH + 1])
    assert e.value.code == "bad_request" and f"at most {MAX_EACH}" in str(e.value)


# Forks argv[1] children that sleep: each has the parent's command line, made long by
# argv[2:] (1 KiB of arguments).
LONG_ARGV = """
import os, sys, time
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
print("forked", flush=True)
time.sleep(600)
"""


def test_a_process_table_of_long_command_lines_fits_a_reply(agent_lab, monkeypatch):
    """The rows of `processes` stop where the reply would exceed a frame (here a frame
    of 16 KiB, so that 40 processes with 1 KiB command lines overflow it); the table
    says it is truncated."""
    import backdoors.agent.ops as ops
    monkeypatch.setattr(ops, "REPLY_BYTES", 16 * 1024)
    lab = agent_lab(nodes={"n0": {"pids_limit": 128}})
    proc = lab.run("n0", LONG_ARGV, "40", *["a" * 120] * 8)
    assert read_line(proc, 30).strip() == "forked"
    c = lab.client(timeout=10)
    table = c.processes("n0", cmdline=True)
    assert table.truncated and 41 <= table.total
    assert 0 < len(table.rows) < 41
    assert len(msgspec.msgpack.encode(table)) <= 16 * 1024
    assert len(c.processes("n0").rows) == table.total  # without command lines all fit


def test_one_signer_cannot_hold_every_connection(agent_lab):
    """Outside review: a stolen key (a peer's would do: ping is a peer op) opened the
    agent's every slot with one authenticated ping each and kept them idle; an
    authenticated connection was never evicted, so every monitor's new connection got
    `busy` for as long as the idle timeout. Now a signer holding more than its share
    of the authenticated slots gives way, oldest idle first; one within it does not."""
    lab = agent_lab(max_connections=8, max_unauthenticated=2)  # 3 monitors: a share of 2
    hog = [lab.client("m1") for _ in range(8)]
    for c in hog:
        assert c.ping()
    other = lab.client("m2")
    assert other.ping()  # got in: m1's oldest idle connection gave way
    sock = other._sock
    for c in [lab.client("m1") for _ in range(3)]:
        assert c.ping()  # m1's new ones push out m1's own
    assert other.ping() and other._sock is sock  # m2, within its share, stays
    assert lab.client("m3").ping()


def _first_request_on_a_new_connection(lab, monitor: str, op: str, args: dict) -> Response:
    """The reply to `op`, signed by `monitor`, sent as the first request of a new
    connection."""
    return _sent_alone(lab, lab.client(monitor).signed_request(op, args)[0])


def _sent_alone(lab, payload: bytes) -> Response:
    """The reply to request `payload`, sent on a new connection of its own (as a machine
    in the middle would)."""
    with _connect(lab) as s:
        s.sendall(frame(payload))
        s.settimeout(10)
        size = int.from_bytes(s.recv(4, socket.MSG_WAITALL), "big")
        [reply] = _replies(size.to_bytes(4, "big") + s.recv(size, socket.MSG_WAITALL))
    return reply


def test_a_signers_slow_first_requests_do_not_fill_the_keyless_room(agent_lab):
    """Outside review: a connection counted as unauthenticated until its first request
    was answered, and was never evicted while in it; at quorum 2 one monitor key's
    `kill`s, each the first request of a new connection and waiting out the vote,
    filled the keyless connections' room and every monitor's new connection was refused
    `busy`. A request counts as authenticated once its signature is verified, and a
    signer has at most its share of requests in flight; the next is refused `busy`,
    signed, to that signer only."""
    lab = agent_lab(quorum=2, vote_window_s=60.0, max_connections=16, max_unauthenticated=2,
                    signer_in_flight=4)
    rpc = lab.agent.agent.rpc
    share = rpc.in_flight_share()
    replies: list[Response] = []
    voters, pids = [], range(900000, 900000 + share + 2)
    try:
        for i, pid in enumerate(pids):
            voters.append(threading.Thread(target=lambda pid=pid: replies.append(
                _first_request_on_a_new_connection(lab, "m1", "kill", {"node": "n0", "pid": pid}))))
            voters[-1].start()
            if i < share:  # waiting for the vote, and counted as authenticated
                wait_for(lambda: rpc.connections == i + 1 and rpc.unauthenticated == 0,
                         timeout=30, what=f"m1's kill {i + 1} in flight, authenticated")
        wait_for(lambda: len(replies) == 2, timeout=30, what="m1's requests past its share")
        assert [r.error.code for r in replies] == ["busy", "busy"], replies
        assert "in flight" in replies[0].error.message, replies[0]
        m2 = lab.client("m2")
        assert m2.ping()  # another monitor's new connection is served
    finally:
        for pid in pids[:share]:  # m2's votes end m1's (there is no such process)
            assert lab.client("m2").kill("n0", pid) is False
        for t in voters:
            t.join(30)
    assert len(replies) == share + 2
    assert [r.ok for r in replies] == [False, False] + [True] * share, replies  # busy, then m2 voted



def test_a_new_connection_makes_room_once(agent_lab):
    """Outside review: every cap's list was made before any eviction, so a connection
    evicted for its address's cap still counted for the overall cap, which evicted a
    second one (another address's) for one new connection."""
    lab = agent_lab(max_unauthenticated=4, max_unauthenticated_per_address=2,
                    auth_timeout_s=30)
    rpc = lab.agent.agent.rpc
    others = [_connect(lab, "127.0.0.2") for _ in range(2)]
    mine = [_connect(lab, "127.0.0.3") for _ in range(2)]
    wait_for(lambda: rpc.unauthenticated == 4, what="four silent connections")
    newest = _connect(lab, "127.0.0.3")
    assert b"gave way" in _closed_by_agent(mine[0])  # the oldest of its address
    wait_for(lambda: rpc.unauthenticated_from("127.0.0.3") == 2, what="the new one counted")
    assert rpc.unauthenticated_from("127.0.0.2") == 2 and rpc.unauthenticated == 4
    assert all(map(_still_open, [*others, mine[1], newest]))
    for s in [*others, *mine, newest]:
        s.close()


@pytest.mark.parametrize("held_op, held_args", [
    ("unlock", {"node": "n0"}), ("lock", {"node": "n0", "lease_s": 0.5})])
@pytest.mark.parametrize("fence_op", ["lock", "fence"])
def test_an_unlock_held_back_and_sent_after_a_later_fence_is_refused(agent_lab, held_op,
                                                                       held_args, fence_op):
    """Outside review: a machine in the middle withheld m1's signed `unlock`, let m1 fence
    the node (`lock` without a lease, or `fence`), then sent the unlock: it was applied,
    and the node ran unfenced while m1 held it fenced (a held `lock` with a lease did the
    same when its lease ran out). Of one signer's lock, unlock, fence and unfence for a
    node, one signed before the latest taken is refused."""
    lab = agent_lab()
    c = lab.client("m1")
    held, _ = c.signed_request(held_op, held_args)
    time.sleep(0.01)  # signed later
    if fence_op == "fence":
        c.call("fence", node="n0")
    else:
        c.lock("n0", lease_s=None)
    assert lab.nodes["n0"].is_locked()
    reply = _sent_alone(lab, held)
    assert not reply.ok and reply.error.code == "stale_request", reply
    time.sleep(0.6)  # (past the held lock's lease, had it been applied)
    assert lab.nodes["n0"].is_locked()
    c.call("unfence", node="n0") if fence_op == "fence" else c.unlock("n0")  # later: applied
    assert not lab.nodes["n0"].is_locked()


def test_a_flood_whose_connections_each_send_a_byte_gives_way_before_a_monitor(agent_lab):
    """Outside review: any byte on the way made a connection look like a monitor's
    request, so a keyless flood whose connections each sent one evicted a monitor's new
    connection once it was the oldest. Of those with bytes on the way, the address
    holding the most gives way first."""
    lab = agent_lab(max_unauthenticated=4, max_unauthenticated_per_address=4,
                    auth_timeout_s=30)
    rpc = lab.agent.agent.rpc
    request = frame(lab.client("m1").signed_request("ping", {})[0])
    monitor = _connect(lab, "127.0.0.20")
    monitor.sendall(request[:2])  # on its way, and the oldest
    flood = []
    for _ in range(6):
        flood.append(_connect(lab, "127.0.0.9"))
        flood[-1].sendall(b"\0")
        port = flood[-1].getsockname()[1]
        wait_for(lambda: any(x.sock.getpeername()[1] == port and _pending(x)
                             for x in list(rpc._conns.values())),
                 what="the flood's newest connection taken, its byte come")
    assert rpc.unauthenticated == 4
    assert _still_open(monitor)
    monitor.settimeout(10)
    monitor.sendall(request[2:])
    size = int.from_bytes(monitor.recv(4, socket.MSG_WAITALL), "big")
    [reply] = _replies(size.to_bytes(4, "big") + monitor.recv(size, socket.MSG_WAITALL))
    assert reply.ok, reply
    for s in [monitor, *flood]:
        s.close()
