"""Fuzz: malformed frames at a running agent. No crash, no action, every reply an error.

Hypothesis generates 10,000 frames in CI (CI=true), 2,000 locally: random bytes, bad and
truncated lengths, msgpack of the wrong shape, unsigned and badly signed envelopes, and
correctly signed requests with wrong types or garbage arguments. A canary node runs a
service with a writable mailbox; afterwards it must still run, unfrozen, with its mailbox
untouched, and the agent must still answer on a connection opened before the storm.
"""

import secrets
import select
import socket
import time

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_agent_support import agent_lab, prefix
from test_nodes_support import alive

from backdoors.agent.keys import new_identity, verify
from backdoors.agent.protocol import (
    CODES, MAX_FRAME, REPLAY_WINDOW_S, REPLY_DOMAIN, REQUEST_DOMAIN, VERSION, Envelope, Request, Response, frame,
)

_STRANGER = new_identity("m1")  # a key the agent does not know, under a known id

__all__ = ["agent_lab", "prefix"]
pytestmark = pytest.mark.root

IN_CI = __import__("os").environ.get("CI", "").lower() in ("1", "true", "yes")
EXAMPLES = 10_000 if IN_CI else 2_000

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=40))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10)
field_names = st.sampled_from(["node", "region", "offset", "length", "data", "pid", "lease_s",
                               "force", "start_time", "memory", "pids", "x"])


@st.composite
def frames(draw, key, canary: str, ops: dict):
    """(bytes to send, whether the server should keep the connection open). `ops`: the
    running agent's table (ops.OPS and those of its recovery, peer and owner parts)."""
    kind = draw(st.integers(0, 9))
    if kind == 0:  # arbitrary bytes with a consistent length prefix
        return frame(draw(st.binary(min_size=1, max_size=200))), True
    if kind == 1:  # a length of 0 or above the maximum
        size = draw(st.sampled_from([0, MAX_FRAME + 1, 2**32 - 1]))
        return size.to_bytes(4, "big") + draw(st.binary(max_size=20)), False
    if kind == 2:  # a truncated frame (the sender then shuts its side)
        body = draw(st.binary(min_size=1, max_size=50))
        cut = draw(st.integers(0, len(body) - 1))
        return len(body).to_bytes(4, "big") + body[:cut], False
    if kind == 3:  # valid msgpack of the wrong shape
        return frame(msgspec.msgpack.encode(draw(values))), True
    if kind == 4:  # an envelope with a random or missing signature
        body = msgspec.msgpack.encode(draw(values))
        return frame(msgspec.msgpack.encode(Envelope(body, draw(st.binary(max_size=64))))), True
    nonce = secrets.token_bytes(16)
    request = {"v": VERSION, "monitor": "m1", "agent": "h0", "nonce": nonce, "ts": time.time(),
               "op": draw(st.one_of(st.sampled_from(sorted(ops)), st.text(max_size=12))),
               "args": {}}
    if kind == 5:  # well signed, a field of the wrong type or value
        name = draw(st.sampled_from(sorted(request)))
        request[name] = draw(values)
        if name == "monitor":
            request[name] = "m1"  # keep it signed under m1's key
    elif kind == 6:  # well signed, garbage arguments
        request["args"] = draw(st.dictionaries(field_names, values, max_size=5))
    elif kind == 7:  # well signed, extra fields
        request[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in request))] = 1
    elif kind == 8:  # well signed, a stale or future timestamp
        # far enough ahead that no stall of this process brings it into the window
        ahead = REPLAY_WINDOW_S + 90
        request["ts"] = time.time() + draw(st.sampled_from([-1e9, -31.0, ahead, 1e12]))
        request["op"] = "kill_node"
        request["args"] = {"node": canary}
    else:  # a valid body signed with the wrong key
        request["op"] = "kill_node"
        request["args"] = {"node": canary}
        body = msgspec.msgpack.encode(request)
        return frame(msgspec.msgpack.encode(
            Envelope(body, _STRANGER.sign(REQUEST_DOMAIN, body)))), True
    assume(not _valid(request, ops))  # never send something that could act
    body = msgspec.msgpack.encode(request)
    return frame(msgspec.msgpack.encode(Envelope(body, key.sign(REQUEST_DOMAIN, body)))), True


def _valid(request: dict, ops: dict) -> bool:
    """True if the agent would accept this request body (then the fuzzer must not send it)."""
    try:
        req = msgspec.msgpack.decode(msgspec.msgpack.encode(request), type=Request)
        op = ops[req.op]
        op.decoder.decode(req.args)
    except (msgspec.MsgspecError, KeyError, TypeError):
        return False
    return (req.v == VERSION and req.agent == "h0" and len(req.nonce) == 16
            and abs(req.ts - time.time()) < 30)


class _Conn:
    def __init__(self, address):
        self.address, self.sock = address, None

    def send(self, data: bytes, keep_open: bool) -> bytes | None:
        reused = self.sock is not None
        if reused:  # the agent closes a connection without an authenticated request
            ready, _, _ = select.select([self.sock], [], [], 0)  # within auth_timeout_s
            if ready:
                self.close()
        if self.sock is None:
            # the agent runs in this busy process: a loaded host may stall it for seconds
            self.sock = socket.create_connection(self.address, timeout=60)
        self.sock.sendall(data)
        if not keep_open:
            self.sock.shutdown(socket.SHUT_WR)
        try:
            reply = self._frame()
        except ConnectionResetError:
            reply = None
        if reply is None and reused:  # closed at auth_timeout_s just before: once more
            self.close()
            return self.send(data, keep_open)
        if not keep_open:
            self.close()
        return reply

    def _frame(self) -> bytes | None:
        header = self._exactly(4)
        if header is None:
            return None
        return self._exactly(int.from_bytes(header, "big"))

    def _exactly(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


# EXAMPLES round trips to a real agent take minutes on a loaded machine: the suite's
# 300 s timeout is for hangs, not for this
@pytest.mark.timeout(1200)
def test_malformed_frames_change_nothing(agent_lab):
    lab = agent_lab(nodes={"canary": {}})
    app, _ = lab.start_app("canary", mailbox=True)
    key = lab.keys["m1"]
    bystander = lab.client("m2")
    assert bystander.ping()
    conn = _Conn(lab.agent.address)
    sent = {"frames": 0, "replies": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(item=frames(key, "canary", lab.agent.agent.ops))
    def storm(item):
        data, keep_open = item
        try:
            reply = conn.send(data, keep_open)
        except (ConnectionError, OSError):
            conn.close()
            reply = None
        sent["frames"] += 1
        if data[:4] == b"\0\0\0\0" or (len(data) > 4 and not keep_open) or keep_open:
            # The agent answers every frame it can delimit, and refuses the others.
            assert reply is not None, data[:40]
        if reply is None:
            conn.close()
            return
        sent["replies"] += 1
        env = msgspec.msgpack.decode(reply, type=Envelope)
        resp = msgspec.msgpack.decode(env.body, type=Response)
        assert not resp.ok and resp.error.code in CODES and resp.error.message
        assert resp.result is None
        if env.sig:  # a signed reply is signed with the agent's key
            assert verify([lab.agent_key.public], REPLY_DOMAIN, env.body, env.sig)
        if resp.error.code in ("bad_frame", "auth"):  # the agent closes the connection
            conn.close()

    storm()
    conn.close()
    assert sent["frames"] >= EXAMPLES and sent["replies"] > EXAMPLES * 0.8
    # Nothing happened to the canary, and the agent serves as before.
    assert bystander.ping().host == "h0"
    assert alive(app.pid) and not lab.nodes["canary"].is_locked()
    assert bystander.status("canary").lock.locked_by == []
    assert bystander.read("canary", "mailbox", 0, 4096) == bytes(4096)
    assert {r.name for r in bystander.regions("canary")} == {"kernel", "app", "mailbox"}
    assert not [a for a in lab.audit() if a.get("kind") == "rpc" and a.get("ok")
                and a.get("monitor") == "m1"]
