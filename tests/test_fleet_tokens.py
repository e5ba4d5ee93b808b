"""Fencing tokens at the agent: a real agent, real signed RPC (no etcd needed here)."""

import pytest
from test_agent_support import agent_lab, prefix
from prometheus_client import generate_latest

from backdoors.agent.errors import RequestError, StaleTokenError
from backdoors.agent.tokens import StaleToken, TokenTable

__all__ = ["agent_lab", "prefix"]


@pytest.mark.root
def test_an_older_token_is_refused_audited_and_counted(agent_lab):
    lab = agent_lab(nodes={"n0": {"pids_limit": 100}, "n1": {}})
    m1, m2 = lab.client("m1"), lab.client("m2")
    first = m1.claim("n0", token=5)
    assert (first.token, first.last_act_s, first.last_act_by) == (5, None, None)
    infos = {i.name: i for i in m1.nodes()}
    assert (infos["n0"].token, infos["n0"].owner) == (5, "m1")
    assert infos["n1"].token is None

    # m2's ownership is older: refused, and the limit is left as it was
    m2.tokens = lambda node: 4
    with pytest.raises(StaleTokenError, match="older than token 5 of m1") as err:
        m2.set_limits("n0", pids=50)
    assert err.value.code == "stale_token"
    assert m1.status("n0").stats.pids_limit == 100

    # a newer owner takes the node: the former owner's late request is refused
    m2.tokens = lambda node: 9
    assert m2.set_limits("n0", pids=60).pids_limit == 60
    m1.tokens = lambda node: 5
    with pytest.raises(StaleTokenError, match="m2 owns the node now"):
        m1.kill_node("n0")
    with pytest.raises(StaleTokenError):
        m1.claim("n0")
    assert {i.name: i.token for i in m1.nodes()}["n0"] == 9

    # tokens are per node; a request without one is not checked (operators, one monitor)
    assert m1.claim("n1").token == 5
    plain = lab.client("m3")
    assert plain.set_limits("n0", pids=70).pids_limit == 70

    audit = [r for r in lab.audit() if r.get("error") == "stale_token"]
    assert [(r["monitor"], r["op"], r["token"]["token"]) for r in audit] == \
        [("m2", "set_limits", 4), ("m1", "kill_node", 5), ("m1", "claim", 5)]
    text = generate_latest(lab.agent.agent.metrics.registry).decode()
    assert 'backdoors_agent_stale_tokens_total{node="n0"} 3.0' in text


@pytest.mark.root
def test_the_audit_names_the_incident_each_request_acted_for(agent_lab):
    lab = agent_lab(nodes={"n0": {"pids_limit": 100}})
    c = lab.client("m1")
    c.incident = "20261202-071520-n0-1"
    c.set_limits("n0", pids=90)
    c.incident = None
    c.set_limits("n0", pids=80)
    lines = [r for r in lab.audit() if r.get("op") == "set_limits"]
    assert [r.get("incident") for r in lines] == ["20261202-071520-n0-1", None]


@pytest.mark.root
def test_a_token_must_name_the_node_and_a_tokened_op(agent_lab):
    lab = agent_lab(nodes={"n0": {}, "n1": {}})
    c = lab.client()
    with pytest.raises(RequestError, match="the token is for node 'n1'"):
        _send(c, "kill_node", {"node": "n0"}, {"node": "n1", "token": 3})
    with pytest.raises(RequestError, match="sensors takes no token"):
        _send(c, "sensors", {"node": "n0"}, {"node": "n0", "token": 3})
    with pytest.raises(RequestError, match="claim needs a token"):
        c.claim("n0")
    assert {i.name: i.token for i in c.nodes()} == {"n0": None, "n1": None}


def _send(client, op, args, token):
    """A request whose token is set as given (the client would name the args' node)."""
    import secrets
    import time

    import msgspec

    from backdoors.agent.protocol import REQUEST_DOMAIN, VERSION, Envelope
    nonce = secrets.token_bytes(16)
    body = msgspec.msgpack.encode({"v": VERSION, "monitor": client.monitor,
                                   "agent": client.agent, "nonce": nonce, "ts": time.time(),
                                   "op": op, "args": args, "token": token})
    payload = msgspec.msgpack.encode(Envelope(body, client._identity.sign(REQUEST_DOMAIN,
                                                                          body)))
    return client._open_reply(op, client.exchange(payload, 5.0), nonce)


def test_the_table_is_kept_and_taken_back():
    kept = []
    t = TokenTable()
    t.observer = kept.append
    assert t.check("n0", 7, "m1") is None and t.check("n0", 7, "m1") == 7
    assert len(kept) == 1  # the same token again changes nothing
    t.check("n0", 8, "m2")
    with pytest.raises(StaleToken):
        t.check("n0", 7, "m1")
    again = TokenTable()
    assert again.take_back(t.encode(), {"n0"}) == []
    assert again.get("n0") == (8, "m2")
    assert again.take_back(t.encode(), {"n1"}) == ["fencing token of n0: no such node"]
    assert again.take_back(b"{not json", {"n0"})[0].startswith("fencing tokens:")


@pytest.mark.root
def test_the_tokens_outlive_an_agent_restart(agent_lab, tmp_path):
    """A real agent under the lab's keeper, SIGKILLed: the new agent takes the tokens back
    from the fd store and still refuses the older one."""
    from test_agent_support import supervised

    with supervised(agent_lab, tmp_path) as (lab, agent):
        c = lab.client("m2")
        assert c.claim("n0", token=57).token == 57
        agent.kill()
        c = lab.client("m1")
        assert {i.name: (i.token, i.owner) for i in c.nodes()} == {"n0": (57, "m2")}
        with pytest.raises(StaleTokenError, match="older than token 57 of m2"):
            c.claim("n0", token=41)


@pytest.mark.root
def test_a_new_owner_is_answered_after_the_former_owners_running_op(agent_lab):
    """m1's kill_node is still running when m2 claims the node with a newer token: m2's
    claim is answered only once m1's op has ended, and the agent's audit log has them in
    that order (two owners never act on the node at once)."""
    import threading
    import time

    from backdoors.agent.ops import NodeArgs, Op

    lab = agent_lab(nodes={"n0": {}})
    began, ended = threading.Event(), []

    def slow_kill_node(call):  # holds the op running for a while
        began.set()
        time.sleep(0.5)
        ended.append(time.monotonic())
        return {"pids": []}

    lab.agent.agent.add_op(Op("kill_node", NodeArgs, slow_kill_node))
    m1, m2 = lab.client("m1"), lab.client("m2")
    assert m1.claim("n0", token=5).token == 5
    m1.tokens = lambda node: 5
    done: list = []
    first = threading.Thread(target=lambda: done.append(m1.call("kill_node", node="n0")))
    first.start()
    assert began.wait(5)
    claimed = m2.claim("n0", token=9)
    answered = time.monotonic()
    assert claimed.token == 9
    # the new owner learns that m1 has just acted on the node (it holds off a while)
    assert claimed.last_act_by == "m1" and 0 <= claimed.last_act_s < 5, claimed
    first.join(5)
    assert done == [{"pids": []}] and ended and answered >= ended[0]
    order = [(r["monitor"], r["op"]) for r in lab.audit() if r.get("op") in ("claim", "kill_node")]
    assert order == [("m1", "claim"), ("m1", "kill_node"), ("m2", "claim")], order
    # and m1, late, is refused now
    with pytest.raises(StaleTokenError):
        m1.call("kill_node", node="n0")


@pytest.mark.root
def test_at_quorum_one_key_alone_records_no_token(agent_lab):
    """Outside review: at quorum 2 a single stolen monitor key claimed a node with token
    2**62 (a claim records its token) and even a tokened set_limits that failed its vote
    recorded its token: every later token of the fleet (etcd revisions) was refused as
    stale, for good (the table outlives the agent). Now, at a quorum, a claim records
    nothing (it is answered: a fleet's node has one owner, a claim cannot be voted) and a
    destructive op's token is recorded once its vote applies it."""
    import threading

    from backdoors.agent.errors import QuorumError

    lab = agent_lab(nodes={"n0": {"pids_limit": 100}}, quorum=2, vote_window_s=0.3)
    m1, m2, m3 = (lab.client(m, vote_window=0.3) for m in ("m1", "m2", "m3"))
    assert m1.claim("n0", token=2**62).token is None  # answered, not recorded
    m1.tokens = lambda node: 2**63 - 1
    with pytest.raises(QuorumError, match="1 of 2 votes for set_limits"):
        m1.set_limits("n0", pids=50)
    assert m1.nodes()[0].token is None  # nothing recorded
    assert m1.status("n0").stats.pids_limit == 100

    def both(call):
        out = []
        threads = [threading.Thread(target=lambda c=c: out.append(call(c))) for c in (m2, m3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out
    for c in (m2, m3):
        c.tokens = lambda node: 500
    assert [r.pids_limit for r in both(lambda c: c.set_limits("n0", pids=60))] == [60, 60]
    assert m1.nodes()[0].token == 500  # the applied vote's token is the node's
    m1.tokens = lambda node: 499
    with pytest.raises(StaleTokenError):  # an older one is still refused before its vote
        m1.set_limits("n0", pids=50)


def test_the_same_token_from_another_monitor_is_refused():
    """Review: one etcd history gives a revision to one owner, so the same token from a
    second monitor is another history's (an etcd restored or made anew): refused as
    stale, as an older one is, so the fleet's heal (FleetMember._past) moves past it;
    the same monitor may send its token again, and a higher one is taken."""
    from backdoors.agent.tokens import StaleToken, TokenTable

    table = TokenTable()
    assert table.check("n0", 5, "m1") is None
    assert table.check("n0", 5, "m1") == 5
    with pytest.raises(StaleToken, match="m1's token"):
        table.check("n0", 5, "m2")
    with pytest.raises(StaleToken, match="older"):
        table.check("n0", 4, "m2")
    assert table.check("n0", 6, "m2") == 5 and table.get("n0") == (6, "m2")
