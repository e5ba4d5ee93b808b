"""Integrity and responsiveness: authentication, replay, quorum, audit, deadlines."""

import socket
import threading
import time

import msgspec
import pytest
from test_agent_support import agent_lab, prefix, wait_for
from test_nodes_support import alive

from backdoors.agent import AgentClient, new_identity
from backdoors.agent.errors import (
    AuthError, BusyError, DeadlineError, QuorumError, RequestError, TransportError,
)
from backdoors.agent.ops import NodeArgs, Op
from backdoors.agent.protocol import REPLY_DOMAIN, Envelope, Response, frame

__all__ = ["agent_lab", "prefix"]
pytestmark = pytest.mark.root


def _decode_reply(payload: bytes) -> tuple[Envelope, Response]:
    env = msgspec.msgpack.decode(payload, type=Envelope)
    return env, msgspec.msgpack.decode(env.body, type=Response)


def _victim(lab):
    proc, _ = lab.start_app("n0", mailbox=True)
    return proc


def test_a_wrong_key_is_rejected_and_kills_nothing(agent_lab):
    lab = agent_lab()
    victim = _victim(lab)
    impostor = lab.client(new_identity("m1"))
    with pytest.raises(TransportError, match="unsigned reply.*bad signature for monitor 'm1'"
                       ) as err:
        impostor.kill("n0", victim.pid)
    assert err.value.code == "protocol"  # the agent's refusal is unsigned: not its word
    stranger = lab.client(new_identity("nobody"))
    with pytest.raises(TransportError, match="unknown monitor"):
        stranger.kill_node("n0")
    time.sleep(0.1)
    assert alive(victim.pid)
    impostor.close()
    stranger.close()


def test_a_missing_or_tampered_signature_is_rejected(agent_lab):
    lab = agent_lab()
    victim = _victim(lab)
    c = lab.client()
    payload, _ = c.signed_request("kill", {"node": "n0", "pid": victim.pid})
    env = msgspec.msgpack.decode(payload, type=Envelope)
    unsigned = msgspec.msgpack.encode(Envelope(env.body, b""))
    tampered_body = env.body.replace(b"kill", b"kilL")
    tampered = msgspec.msgpack.encode(Envelope(tampered_body, env.sig))
    for bad in (unsigned, tampered):
        reply_env, reply = _decode_reply(c.exchange(bad))
        assert not reply.ok and reply.error.code == "auth" and reply_env.sig == b""
    assert alive(victim.pid)
    assert c.ping()  # the connection goes on


def test_a_replayed_request_is_rejected(agent_lab):
    lab = agent_lab()
    _victim(lab)
    c = lab.client()
    first, nonce = c.signed_request("write", {"node": "n0", "region": "mailbox", "offset": 0,
                                              "data": b"AAAA"})
    _, reply = _decode_reply(c.exchange(first))
    assert reply.ok and reply.nonce == nonce
    c.write("n0", "mailbox", 0, b"BBBB")
    reply_env, reply = _decode_reply(c.exchange(first))
    assert not reply.ok and reply.error.code == "replay" and reply_env.sig == b""
    other = lab.client()  # a replay on another connection is caught as well
    _, reply = _decode_reply(other.exchange(first))
    assert reply.error.code == "replay"
    assert c.read("n0", "mailbox", 0, 4) == b"BBBB"


@pytest.mark.parametrize("skew", [-31.0, -30.0, 31.0, float("nan")])
def test_a_stale_or_future_timestamp_is_rejected(agent_lab, skew):
    lab = agent_lab()
    victim = _victim(lab)
    c = lab.client()
    payload, _ = c.signed_request("kill", {"node": "n0", "pid": victim.pid},
                                  ts=time.time() + skew)
    _, reply = _decode_reply(c.exchange(payload))
    assert not reply.ok and reply.error.code == "replay"
    assert "from the agent's clock" in reply.error.message
    assert alive(victim.pid)


def test_bad_requests_are_signed_errors(agent_lab):
    lab = agent_lab()
    c = lab.client()
    with pytest.raises(RequestError, match="unknown op 'frobnicate'") as err:
        c.call("frobnicate")
    assert err.value.code == "unknown_op"
    with pytest.raises(RequestError, match="bad args") as err:
        c.call("read", node="n0", region="kernel", offset="0", length=4)
    assert err.value.code == "bad_request"
    with pytest.raises(RequestError, match="unknown field"):
        c.call("kill_node", node="n0", everything=True)


def test_the_client_rejects_a_reply_that_is_not_from_its_agent():
    """Mutual authentication: a fake agent without the agent's key cannot answer for the
    real one, not even with an error (a forged busy, quorum or no_such_node)."""
    key, agent, forger = new_identity("m1"), new_identity("h0"), new_identity("h0")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    busy = Response(b"", False, None, {"code": "busy", "message": "forged"})

    def fake_agent(mac: bytes, nonce_from_request: bool, reply: Response | None = None):
        conn, _ = listener.accept()
        with conn:
            size = int.from_bytes(conn.recv(4), "big")
            data = b""
            while len(data) < size:
                data += conn.recv(size - len(data))
            env = msgspec.msgpack.decode(data, type=Envelope)
            nonce = msgspec.msgpack.decode(env.body)["nonce"] if nonce_from_request else b"x" * 16
            if reply is not None:
                reply.nonce = nonce
            body = msgspec.msgpack.encode(reply or Response(
                nonce, True, {"host": "fake", "pid": 1, "time": 0.0}))
            tag = {b"sign": agent, b"forge": forger}.get(mac)
            tag = tag.sign(REPLY_DOMAIN, body) if tag else mac
            conn.sendall(frame(msgspec.msgpack.encode(Envelope(body, tag))))

    try:
        for tag, echo, reply, match in (
                (b"\x00" * 64, True, None, "signature is invalid"),
                (b"forge", True, None, "signature is invalid"),
                (b"", True, None, "unsigned reply"),
                (b"", True, busy, r"unsigned reply \(busy: forged\)"),
                (b"", False, busy, r"unsigned reply \(busy: forged\)"),
                (b"forge", True, busy, "signature is invalid"),
                (b"sign", False, None, "does not echo our nonce"),
                (b"sign", False, busy, "does not echo our nonce")):
            t = threading.Thread(target=fake_agent, args=(tag, echo, reply))
            t.start()
            client = AgentClient(("127.0.0.1", port), key, "h0", agent.public, timeout=5)
            with pytest.raises(TransportError, match=match) as err:
                client.ping()
            assert err.value.code == "protocol"
            client.close()
            t.join()
    finally:
        listener.close()


def test_quorum_one_vote_is_not_enough(agent_lab):
    lab = agent_lab(quorum=2, vote_window_s=0.3)
    victim = _victim(lab)
    c = lab.client("m1", vote_window=0.3)
    start = time.monotonic()
    with pytest.raises(QuorumError, match=r"1 of 2 votes for kill within 0.3 s \(from m1\)"):
        c.kill("n0", victim.pid)
    assert 0.25 < time.monotonic() - start < 2
    assert alive(victim.pid)
    assert c.ping().host == "h0"  # reads need no votes


def _concurrently(*calls):
    results = [None] * len(calls)

    def run(i, fn):
        try:
            results[i] = fn()
        except Exception as e:  # noqa: BLE001 - compared by the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_quorum_two_distinct_monitors_apply_the_kill_once(agent_lab):
    lab = agent_lab(quorum=2, vote_window_s=1.0)
    victim = _victim(lab)
    m1, m2 = lab.client("m1", vote_window=1.0), lab.client("m2", vote_window=1.0)
    r1, r2 = _concurrently(lambda: m1.kill("n0", victim.pid), lambda: m2.kill("n0", victim.pid))
    assert r1 is True and r2 is True  # one execution, its result handed to both
    victim.wait(5)
    kills = [a for a in lab.audit() if a.get("op") == "kill"]
    assert len(kills) == 2 and all(a["ok"] and a["votes"] == ["m1", "m2"] for a in kills)


def test_quorum_the_same_monitor_twice_counts_once(agent_lab):
    lab = agent_lab(quorum=2, vote_window_s=0.3)
    victim = _victim(lab)
    a, b = lab.client("m1", vote_window=0.3), lab.client("m1", vote_window=0.3)
    results = _concurrently(lambda: a.kill("n0", victim.pid), lambda: b.kill("n0", victim.pid))
    assert all(isinstance(r, QuorumError) for r in results), results
    assert alive(victim.pid)


def test_quorum_different_arguments_do_not_add_up(agent_lab):
    lab = agent_lab(quorum=2, vote_window_s=0.3)
    _victim(lab)
    m1, m2 = lab.client("m1", vote_window=0.3), lab.client("m2", vote_window=0.3)
    results = _concurrently(lambda: m1.write("n0", "mailbox", 0, b"A"),
                            lambda: m2.write("n0", "mailbox", 0, b"B"))
    assert all(isinstance(r, QuorumError) for r in results)
    assert m1.read("n0", "mailbox", 0, 1) == b"\0"
    results = _concurrently(lambda: m1.write("n0", "mailbox", 0, b"C"),
                            lambda: m2.write("n0", "mailbox", 0, b"C"))
    assert results == [1, 1] and m1.read("n0", "mailbox", 0, 1) == b"C"


def test_the_audit_log_records_requests_rejections_and_registrations(agent_lab):
    lab = agent_lab()
    victim = _victim(lab)
    c = lab.client()
    c.ping()
    c.read("n0", "app", 0, 8)
    c.write("n0", "mailbox", 0, b"x" * 100)
    with pytest.raises(TransportError, match="bad signature"):
        lab.client(new_identity("m2")).kill("n0", victim.pid)
    c.kill("n0", victim.pid)
    lines = lab.audit()
    assert lines[0]["kind"] == "start"
    regs = [a for a in lines if a["kind"] == "local"]
    assert {(a["name"], a["ok"]) for a in regs} == {("app", True), ("mailbox", True)}
    rpc = {a["op"]: a for a in lines if a["kind"] == "rpc"}
    assert "ping" not in rpc and "read" not in rpc  # reads: counted in metrics only
    assert rpc["write"]["ok"] and rpc["write"]["monitor"] == "m1"
    assert rpc["write"]["peer"].startswith("127.0.0.1:")
    assert rpc["write"]["args"]["data"] == "<100 bytes>"  # no bulk data in the log
    assert rpc["kill"]["args"] == {"node": "n0", "pid": victim.pid, "start_time": None}
    assert all("elapsed_ms" in a for a in rpc.values())
    [rejected] = [a for a in lines if a["kind"] == "rejected"]
    assert rejected["error"] == "auth" and rejected["monitor"] == "m2"
    assert "bad signature" in rejected["message"]


def test_a_stuck_op_is_answered_deadline_while_others_are_served(agent_lab):
    lab = agent_lab(op_deadline_s=0.3)
    lab.start_app("n0")
    release = threading.Event()
    lab.agent.agent.add_op(Op("stall", NodeArgs, lambda call: release.wait(30), "node"))
    c, other = lab.client(), lab.client("m2")
    try:
        pings = []
        pinger = threading.Thread(target=lambda: pings.extend(
            _timed_pings(other, 0.5)))
        pinger.start()
        start = time.monotonic()
        with pytest.raises(DeadlineError, match="stall on n0 did not finish within 0.3 s"):
            c.call("stall", node="n0")
        assert 0.25 < time.monotonic() - start < 1.0
        pinger.join()
        assert pings and max(pings) < 100, pings  # ms: the loop kept serving
        assert c.status("n0").stuck_ops == 1
        with pytest.raises(DeadlineError):
            c.call("stall", node="n0")
        status_error = None
        try:
            c.status("n0")
        except BusyError as e:
            status_error = e
        assert status_error is not None and "stuck" in status_error.message
        assert c.read("n0", "app", 0, 4) == b"BDSB"  # region reads do not need the workers
        assert "app" in c.sensors("n0").boxes
    finally:
        release.set()
    def none_stuck():  # until both stuck ops return, status itself may be refused as busy
        try:
            return c.status("n0").stuck_ops == 0
        except BusyError:
            return False
    wait_for(none_stuck, what="the stuck ops to return")
    assert c.status("n0").deadline_misses == 2
    wait_for(lambda: sum(a["kind"] == "late" for a in lab.audit()) == 2, what="late lines")


def _timed_pings(client, seconds):
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        client.ping()
        out.append((time.perf_counter() - start) * 1000)
        time.sleep(0.01)
    return out


def test_connections_beyond_the_cap_are_refused_busy(agent_lab):
    lab = agent_lab(max_connections=2, max_unauthenticated=1)
    first, second = lab.client(), lab.client("m2")
    assert first.ping() and second.ping()
    with socket.create_connection(lab.agent.address, timeout=5) as third:
        size = int.from_bytes(third.recv(4), "big")
        data = b""
        while len(data) < size:
            data += third.recv(size - len(data))
        _, reply = _decode_reply(data)
        assert reply.error.code == "busy" and "2 connections" in reply.error.message
        assert third.recv(1) == b""  # then closed
    first.close()
    third = lab.client("m3")

    def ping_ok():
        try:
            return third.ping()
        except (BusyError, TransportError):
            return None

    wait_for(ping_ok, what="a free connection slot")


def test_rejections_past_the_audit_rate_are_counted_in_one_line(tmp_path):
    """A peer that sends garbage at will cannot fill the audit log: rejections past
    `max_rejects_per_s` are counted, and the count is written with the next line logged
    (or at close)."""
    import json

    from backdoors.agent.audit import AuditLog

    path = str(tmp_path / "audit.jsonl")
    audit = AuditLog(path, max_rejects_per_s=5)
    for i in range(20):
        audit.rejected(peer="10.0.0.9", code="auth", message=f"bad signature {i}")
    audit.close()
    lines = [json.loads(x) for x in open(path)]
    logged = [x for x in lines if x["kind"] == "rejected"]
    counted = sum(x["count"] for x in lines if x["kind"] == "rejected_suppressed")
    # (5 at once, and one more per 0.2 s the loop took: none, but on a very busy machine)
    assert 5 <= len(logged) < 20 and len(logged) + counted == 20, lines


def test_keyless_noise_does_not_hide_a_signers_rejection(tmp_path):
    """Outside review: one bucket for every rejection let a keyless sender's garbage
    (2,000 frames/s) leave a stolen key's request for another agent unlogged. A signer's
    own rejections (its signature verified) have a bucket of their own."""
    import json

    from backdoors.agent.audit import AuditLog

    path = str(tmp_path / "audit.jsonl")
    audit = AuditLog(path, max_rejects_per_s=5)
    for i in range(50):
        audit.rejected(peer="10.0.0.9", code="bad_frame", message=f"garbage {i}")
    audit.rejected(peer="10.0.0.7", code="auth", message="the request is for agent h2",
                   monitor="m1", verified=True)
    audit.close()
    lines = [json.loads(x) for x in open(path)]
    assert [x["monitor"] for x in lines if x["kind"] == "rejected" and x["error"] == "auth"] \
        == ["m1"], lines
