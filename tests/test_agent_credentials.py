"""Credentials (issue 10): no single stolen secret, hostile peer or keyless client commands
the fleet. Each test reproduces one finding of the review against the HMAC design."""

import os
import stat
import subprocess
import threading
import time

import msgspec
import pytest
from test_agent_support import PY, agent_lab, prefix, write_agent_key
from test_nodes_support import alive

from backdoors.agent import BackgroundAgent, new_identity
from backdoors.agent.auth import Authenticator, ReplayGuard
from backdoors.agent.errors import AuthError, BusyError, QuorumError, TransportError
from backdoors.agent.keys import load_identity, read_key_file
from backdoors.agent.protocol import REQUEST_DOMAIN, VERSION, Envelope, MovedSession, Response
from backdoors.agent.warrant import WarrantError, Warrants
from backdoors.errors import ConfigError

__all__ = ["agent_lab", "prefix"]


def _reply(payload: bytes) -> Response:
    return msgspec.msgpack.decode(msgspec.msgpack.decode(payload, type=Envelope).body,
                                  type=Response)


def _victim(lab, node="n0"):
    proc, _ = lab.start_app(node, mailbox=True)
    return proc


# -- 1. an agent host's files give no power over the fleet ---------------------------------


@pytest.mark.root
def test_an_agent_hosts_secrets_cannot_sign_as_a_monitor(agent_lab):
    """Finding 1: every agent host held every monitor's HMAC key. Now what an agent host
    holds (its config: public keys; its own private key) signs as no monitor."""
    lab = agent_lab()
    victim = _victim(lab)
    config_text = open(lab.config.key_file).read() + repr(lab.config.monitors)
    for m, ident in lab.keys.items():  # no monitor secret anywhere in the agent's files
        seed = ident.private.private_bytes_raw().hex()
        assert seed not in config_text
    stolen = load_identity(lab.config.key_file)  # the agent host's one secret
    as_monitor = type(stolen)("m1", stolen.private)
    with pytest.raises(TransportError, match="bad signature for monitor 'm1'"):
        lab.client(as_monitor).kill_node("n0")
    with pytest.raises(AuthError, match="h0 is a peer agent: it may call adopt, ping, present, stage only"):
        lab.client(stolen).kill_node("n0")  # an agent is its own peer (local recoveries)
    assert alive(victim.pid)


# -- 2. peers: their own credential, scoped, never voting ----------------------------------


@pytest.mark.root
def test_a_hostile_peer_neither_votes_nor_calls_monitor_ops(agent_lab):
    """Finding 2: a peer agent listed in monitors voted; peer + one monitor killed a node
    at quorum 2. Now a peer is in `peers`, calls stage/adopt/ping only, never votes."""
    peer = new_identity("h1")
    lab = agent_lab(quorum=2, vote_window_s=0.5, peers={"h1": peer.public_text()})
    victim = _victim(lab)
    hostile, m1 = lab.client(peer, vote_window=0.5), lab.client("m1", vote_window=0.5)
    assert hostile.ping().host == "h0"  # the peer watch's ping stays allowed
    results = []
    threads = [threading.Thread(target=lambda c=c: results.append(_try(c.kill_node, "n0")))
               for c in (hostile, m1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert any(isinstance(r, AuthError) and "peer agent" in r.message for r in results), results
    assert any(isinstance(r, QuorumError) and "1 of 2 votes" in r.message for r in results)
    assert alive(victim.pid)
    for op, args in (("nodes", {}), ("read", {"node": "n0", "region": "app", "offset": 0,
                                              "length": 4}), ("subscribe", {})):
        with pytest.raises(AuthError, match="may call adopt, ping, present, stage only"):
            hostile.call(op, **args)


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - compared by the test
        return e


@pytest.mark.root
def test_adopt_needs_the_monitors_evacuate_an_unfenced_node_and_its_own_addresses(agent_lab):
    """Finding 2: adopt took any addresses into any node for any peer. Now it needs the
    monitors' signed evacuate naming this agent and node (the warrant), refuses a fenced
    node and addresses the node is not configured to take."""
    peer = new_identity("h1")
    lab = agent_lab(nodes={"n0": {}, "n1": {}}, peers={"h1": peer.public_text()},
                    node_n0={"addresses": ["10.9.0.1/24"], "adopt_addresses": ["10.9.0.2/24"]})
    hostile = lab.client(peer)
    m1, m2 = lab.client("m1"), lab.client("m2")
    sessions: list[MovedSession] = []

    def evacuate(monitor, to_agent="h0", to_node="n0", agent="h1"):
        return monitor.signed_request("evacuate", {"node": "x", "to": "10.0.0.2:7700",
                                                   "to_agent": to_agent, "to_node": to_node},
                                      agent=agent)[0]

    cases = [
        ([], "no warrant"),
        ([evacuate(m1, to_node="n1")], "not to 'h0' node 'n0'"),
        ([evacuate(m1, to_agent="h2")], "not to 'h0' node 'n0'"),
        ([evacuate(m1, agent="h3")], "not evacuate for 'h1'"),
        ([m1.signed_request("kill_node", {"node": "n0"}, agent="h1")[0]], "not evacuate"),
        ([evacuate(lab.client(new_identity("m1")))], "not signed by a monitor"),
    ]
    for warrant, match in cases:
        with pytest.raises(AuthError, match=match):
            hostile.adopt("n0", ["10.9.0.2/24"], sessions, warrant)
    with pytest.raises(AuthError, match="adopt is for peer agents"):
        m1.adopt("n0", [], sessions, [evacuate(m1)])
    good = [evacuate(m1)]
    with pytest.raises(Exception, match="may not take address.*10.66.0.1/24"):
        hostile.adopt("n0", ["10.66.0.1/24"], sessions, good)
    m1.lock("n1", None)  # a fence
    with pytest.raises(Exception, match="n1 is fenced"):
        hostile.adopt("n1", [], sessions, [evacuate(m1, to_node="n1")])
    # past the checks: n0 has no netns here, so the restore itself is refused
    with pytest.raises(Exception, match="no network namespace"):
        hostile.adopt("n0", ["10.9.0.2/24", "10.9.0.1/24"], sessions, good + [evacuate(m2)])


def test_a_warrant_meets_the_targets_quorum_and_is_spent_once():
    m = {f"m{i}": new_identity(f"m{i}") for i in (1, 2, 3)}
    now = [1000.0]
    w = Warrants("h0", {k: (v.public,) for k, v in m.items()}, 2, clock=lambda: now[0])

    def order(who, ts=1000.0, nonce=None, to_node="n0", args=None):
        args = msgspec.msgpack.encode(
            args or {"node": "x", "to": "a:1", "to_agent": "h0", "to_node": to_node})
        body = msgspec.msgpack.encode({
            "v": VERSION, "monitor": who, "agent": "h1", "nonce": nonce or os.urandom(16),
            "ts": ts, "op": "evacuate", "args": msgspec.Raw(args)})
        return msgspec.msgpack.encode(Envelope(body, m[who].sign(REQUEST_DOMAIN, body)))

    with pytest.raises(WarrantError, match="holds 1 monitors' evacuate, .* quorum is 2"):
        w.check([order("m1"), order("m1")], "h1", "n0")  # one monitor twice counts once
    with pytest.raises(WarrantError, match="out of date"):
        w.check([order("m1", ts=900.0), order("m2", ts=900.0)], "h1", "n0")
    pairs = w.check([order("m1"), order("m2")], "h1", "n0")
    warrant = [order("m1", nonce=b"a" * 16), order("m3", nonce=b"b" * 16)]
    w.spend(w.check(warrant, "h1", "n0"))
    with pytest.raises(WarrantError, match="already used"):
        w.check(warrant, "h1", "n0")
    assert len(pairs) == 2
    # votes the source counted as one (the same args after decoding) agree here too: keys
    # in another order, the default if_unsure sent or left out
    args = {"node": "x", "to": "a:1", "to_agent": "h0", "to_node": "n0"}
    w.check([order("m1", args=args), order("m2", args=dict(reversed(args.items())))],
            "h1", "n0")
    w.check([order("m1", args=args), order("m2", args={**args, "if_unsure": "ask"})],
            "h1", "n0")
    with pytest.raises(WarrantError, match="holds 1 monitors' evacuate"):
        w.check([order("m1", args=args), order("m2", args={**args, "if_unsure": "move"})],
                "h1", "n0")
    # a restarted agent refuses what was signed before it started...
    now[0] = 1001.0
    kept = w.encode()
    w = Warrants("h0", {k: (v.public,) for k, v in m.items()}, 2, clock=lambda: now[0])
    with pytest.raises(WarrantError, match="before this agent started"):
        w.check(warrant, "h1", "n0")
    # ...and takes back what its predecessor spent: signed after its start by monitors
    # whose clocks are ahead of its own, a spent warrant is still spent (outside review)
    w = Warrants("h0", {k: (v.public,) for k, v in m.items()}, 2, clock=lambda: now[0],
                 started=999.0)
    w.take_back(kept)
    with pytest.raises(WarrantError, match="already used"):
        w.check(warrant, "h1", "n0")
    with pytest.raises(ValueError, match="not the spent warrants"):
        w.take_back(b"[[1]]")


# -- 3. a request names its agent, and does not outlive the agent's run ---------------------


@pytest.mark.root
def test_a_request_for_another_agent_is_refused(agent_lab):
    """Finding 3: a kill_node captured on one agent worked on another with a node of the
    same name. Now the signed body names its agent."""
    lab = agent_lab()
    victim = _victim(lab)
    c = lab.client()
    payload, _ = c.signed_request("kill_node", {"node": "n0"}, agent="h1")
    reply = _reply(c.exchange(payload))
    assert not reply.ok and reply.error.code == "auth"
    assert "for agent 'h1', this is 'h0'" in reply.error.message
    assert alive(victim.pid)


@pytest.mark.root
def test_a_request_does_not_replay_after_an_agent_restart(agent_lab):
    """Finding 3: the replay cache died with the agent: a captured request worked again
    after a restart. Now requests signed before the agent started are refused."""
    lab = agent_lab()
    victim = _victim(lab)
    c = lab.client()
    payload, _ = c.signed_request("kill_node", {"node": "n0"})
    assert _reply(c.exchange(payload)).ok  # the genuine use
    victim.wait(5)
    lab.agent.stop()
    time.sleep(0.01)
    lab.agent = BackgroundAgent(lab.config).start()
    victim = _victim(lab)
    reply = _reply(lab.client().exchange(payload))  # replayed to the new run
    assert not reply.ok and reply.error.code == "replay"
    assert "before this agent started" in reply.error.message
    assert alive(victim.pid)


@pytest.mark.root
def test_a_request_does_not_replay_after_a_crash_when_its_signers_clock_is_ahead(
        agent_lab, tmp_path):
    """Outside review: the refusal of requests signed before the agent started compared
    the signer's clock with the agent's; a monitor 5 s ahead (within the 30 s window)
    signed a lock the agent served, the agent was SIGKILLed and restarted by its keeper,
    and the same request froze the node again. Now each signer's latest request time
    outlives the agent in its fd store: the replay is refused; what comes after is not."""
    from test_agent_support import supervised

    with supervised(agent_lab, tmp_path) as (lab, agent):
        c = lab.client()
        ahead = time.time() + 5
        payload, _ = c.signed_request("lock", {"node": "n0", "lease_s": 0.3}, ts=ahead)
        assert _reply(c.exchange(payload)).ok
        later, _ = c.signed_request("nodes", {}, ts=ahead + 0.5)  # signed, never sent
        end = time.monotonic() + 10
        while lab.client().nodes()[0].locked_by and time.monotonic() < end:
            time.sleep(0.05)  # the lease ran out
        agent.kill()
        c = lab.client()
        reply = _reply(c.exchange(payload))
        assert not reply.ok and reply.error.code == "replay", reply
        assert "previous run of this agent took from 'm1'" in reply.error.message
        assert not lab.client().nodes()[0].locked_by
        assert _reply(c.exchange(later)).ok  # after the mark: a request the crash cut off
        assert lab.client("m2").nodes()  # another signer's marks are its own


def test_request_marks_kept_by_a_previous_run_are_read_back_or_dropped_saying_why():
    keys = {m: (new_identity(m).public,) for m in ("m1", "m2")}
    shared = {}

    def share(data):
        shared["memory"] = bytearray(data)
        return shared["memory"]

    first = Authenticator("h0", keys, cache_entries=64, clock=lambda: 1000.0, started=990.0)
    assert first.resume(None, share) == []
    first._marks[first._slots["m2"]] = 1004.5  # what open() writes for a request of m2
    second = Authenticator("h0", keys, cache_entries=64, clock=lambda: 1001.0, started=1001.0)
    assert second.resume(bytes(shared["memory"]), share) == []
    assert second.previous == {"m2": 1004.5}
    third = Authenticator("h0", keys, cache_entries=64, clock=lambda: 1002.0, started=1002.0)
    assert third.resume(bytes(shared["memory"]), lambda data: None) == []
    assert third.previous == {"m2": 1004.5}  # carried over by the second run
    for garbage in (b"\xff" * 40, b"BDM1" + b"\x10\0\0\0" + b"[1,2]", b"BDM1\x05\0\0\0[\"m1\"]"):
        fresh = Authenticator("h0", keys, cache_entries=64)
        assert fresh.resume(garbage, lambda data: None)[0].startswith("request marks: ")
        assert fresh.previous == {}


def test_the_time_bound_is_strict_and_the_cache_keeps_each_signer_to_its_share():
    """Finding 3: ts + 30 s exactly was accepted, and one key could fill the replay cache
    for everyone (busy). Now |ts - now| < 30 s, and each signer has its own quota."""
    m1, m2 = new_identity("m1"), new_identity("m2")
    now = [1000.0]
    auth = Authenticator("h0", {"m1": (m1.public,), "m2": (m2.public,)}, cache_entries=4,
                         clock=lambda: now[0], started=0.0)

    def request(who, ts):
        body = msgspec.msgpack.encode({"v": VERSION, "monitor": who.id, "agent": "h0",
                                       "nonce": os.urandom(16), "ts": ts, "op": "ping",
                                       "args": {}})
        return msgspec.msgpack.encode(Envelope(body, who.sign(REQUEST_DOMAIN, body)))

    from backdoors.agent.auth import Rejected
    for ts in (970.0, 1030.0):
        with pytest.raises(Rejected, match="30 s or more") as err:
            auth.open(request(m1, ts))
        assert err.value.code == "replay" and err.value.verified  # (m1's own, for the audit)
    forged = Envelope(msgspec.msgpack.decode(request(m1, 1000.0), type=Envelope).body, b"x" * 64)
    with pytest.raises(Rejected, match="bad signature") as err:
        auth.open(msgspec.msgpack.encode(forged))
    assert not err.value.verified
    auth.open(request(m1, 970.001))
    auth.open(request(m1, 1000.0))
    with pytest.raises(Rejected, match="m1 has 2 recent requests") as err:
        auth.open(request(m1, 1000.0))  # m1's share (4 entries / 2 signers) is used up
    assert err.value.code == "busy"
    auth.open(request(m2, 1000.0))  # others are still served
    auth.open(request(m2, 1000.0))
    now[0] = 1000.002  # the first expires first (its ts is the oldest), whatever the order
    auth.open(request(m1, 1000.0))


def test_the_replay_cache_expires_in_time_order_not_arrival_order():
    guard = ReplayGuard(quota=10, window=30.0)
    assert guard.admit("m1", b"late", 1020.0, 1000.0) is None  # expires at 1050
    assert guard.admit("m1", b"early", 980.0, 1000.0) is None  # expires at 1010
    assert guard.admit("m1", b"x", 1000.0, 1011.0) is None
    assert len(guard) == 2 and guard.admit("m1", b"late", 1020.0, 1011.0) == "replay"


# -- 4. keys and files --------------------------------------------------------------------


def test_key_files_readable_by_others_are_refused(tmp_path):
    path = str(tmp_path / "m1.key")
    from backdoors.agent.keys import generate
    generate(path, "m1")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match=rf"{path} is readable by group or others .*"
                                          rf"chmod 600 {path}"):
        load_identity(path)
    # outside review: a directory was "readable by group or others: run chmod 600"
    with pytest.raises(ConfigError, match=rf"private key file {tmp_path} is not a file"):
        load_identity(str(tmp_path))
    with pytest.raises(ConfigError, match=r"^a key: id 'm 1' must be 1-64"):
        new_identity("m 1")


def _bd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "backdoors", "keys", *args], capture_output=True,
                          text=True, timeout=60)


def test_the_keys_command_generates_shows_and_rotates(tmp_path):
    path = str(tmp_path / "m1.key")
    out = _bd("generate", "--id", "m1", path)
    assert out.returncode == 0, out.stderr
    first = out.stdout.strip()
    assert first.startswith('m1 = "ed25519:') and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert _bd("show", path).stdout.strip() == first
    assert _bd("generate", "--id", "m1", path).returncode != 0  # never overwritten
    os.chown(path, 65534, 65534)  # a monitor running as its own user (review: rotate made it root's)
    rolling = _bd("rotate", path).stdout.strip()
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (65534, 65534)
    old_pub = first.split('"')[1]
    assert rolling.startswith(f'm1 = ["{old_pub}", "ed25519:')
    current, nxt = read_key_file(path)
    assert current.public_text() == old_pub and nxt is not None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    done = _bd("rotate", "--finish", path).stdout.strip()
    assert done == f'm1 = "{nxt.public_text()}"'
    assert load_identity(path).public_text() == nxt.public_text()
    assert "rotate" in _bd("--help").stdout and "0600" in _bd("generate", "--help").stdout


@pytest.mark.root
def test_a_key_roll_keeps_both_keys_valid(agent_lab):
    old, new = new_identity("m1"), new_identity("m1")
    lab = agent_lab(monitors={"m1": [old.public_text(), new.public_text()],
                              "m2": new_identity("m2").public_text()})
    assert lab.client(old).ping() and lab.client(new).ping()
    agent_next = new_identity("h0")
    from backdoors.agent.client import AgentClient
    c = AgentClient(lab.agent.address, old, "h0", (agent_next.public, lab.agent_key.public))
    assert c.ping()  # a monitor that knows the agent's old and next key accepts either
    c.close()
