"""The recover action's same-node path (a server died, its node did not): the orphans of
two servers that died together, one restarted within same_node_wait_ms, the other later.

The agent here is a scripted stand-in for its `readopt` replies (the agent side of readopt
is tested for real in test_scenarios_server_crash.py); the clock is the action's own
(Context.clock), so the order of events is fixed, not raced.
"""

from __future__ import annotations

from types import SimpleNamespace

from backdoors.agent.protocol import EvacuateReply
from backdoors.monitor.actions import Recover
from backdoors.monitor.context import Context
from backdoors.monitor.diagnosis import Finding


class ScriptedAgent:
    """Answers readopt from `script`: (time at which the reply changes, reply); each
    call advances the clock by `step` s."""

    def __init__(self, script, step: float = 0.5, processes=()):
        self.script, self.step, self.now, self.calls = script, step, 0.0, 0
        self.processes = list(processes)  # the node's process table (`processes` op)

    def clock(self) -> float:
        return self.now

    def call(self, op, **args):
        if op == "processes":
            assert args["node"] == "n0"
            return {"rows": self.processes, "total": len(self.processes), "truncated": False}
        assert op == "readopt" and args["node"] == "n0" and args["pid"] == 0
        reply = [r for at, r in self.script if at <= self.now][-1]
        self.now += self.step
        self.calls += 1
        return reply


def _reply(sessions, handed, left, server_pid=0, failed=None):
    return {"server": bool(server_pid), "server_pid": server_pid, "sessions": sessions,
            "handed": handed, "failed": failed or {}, "ms": 1.0, "left": left}


def _run(agent: ScriptedAgent, died: float = 0.0, **rule):
    event = {"kind": "owner_died", "pid": 41, "sessions": ["cb-a"], "died": died,
             "orphan_timeout_s": 10.0}
    view = SimpleNamespace(node="n0", host="h0", event=event)
    ctx = Context(rule="server-died", incident="i1", view=view, hits=[], onset=0.0,
                  detected=0.0, client=agent, clock=agent.clock,
                  placement={"n0": ("h0", "a0"), "n1": ("h1", "a1")})
    return Recover(**rule).run(ctx, Finding("server-died", "a server died"))


def test_orphans_of_a_server_restarting_after_the_wait_are_still_handed_to_it():
    # 24 stream sessions go to the restarted stream server at once; the HTTP server's 2
    # come up only at 4.5 s (start-up under load), past same_node_wait_ms (3 s) but well
    # before the agent would close them as orphans (10 s)
    agent = ScriptedAgent([(0.0, _reply(26, 24, 2, server_pid=7)),
                           (0.5, _reply(2, 0, 2)),
                           (4.5, _reply(2, 2, 0, server_pid=8)),
                           (5.0, _reply(0, 0, 0))])
    out = _run(agent, same_node_wait_ms=3000)
    assert out.status == "done", out.detail
    assert out.detail["moved"] == 26 and out.detail["left"] == 0
    assert out.detail["server_pids"] == [7, 8] and out.detail["same_node"]


def test_orphans_nobody_takes_are_reported_left_once_the_agent_would_close_them():
    agent = ScriptedAgent([(0.0, _reply(26, 24, 2, server_pid=7)),
                           (0.5, _reply(2, 0, 2, failed={}))])
    out = _run(agent, same_node_wait_ms=3000)
    assert out.status == "failed"
    assert out.detail["moved"] == 24 and out.detail["left"] == 2
    assert agent.now >= 10.0  # offered until the orphan timeout, not given up at 3 s


def test_no_server_within_the_wait_moves_the_node_without_waiting_for_the_orphan_timeout():
    agent = ScriptedAgent([(0.0, _reply(24, 0, 24))])
    moves = []
    agent.fence = lambda node: {"node": node}
    agent.evacuate = lambda node, *to, timeout: moves.append((node, *to)) or EvacuateReply(
        sessions=24, moved=24, failed={}, dump_ms=1.0, transfer_ms=2.0, adopt=[], phases={})
    out = _run(agent, same_node_wait_ms=3000)
    assert moves == [("n0", "a1", "h1", "n1")] and out.status == "done", out.detail
    assert 3.0 <= agent.now < 4.0
    # the move's record says how long the action waited for a restarted server first
    assert 3000 <= out.detail["same_node_waited_ms"] < 4000, out.detail


def test_a_replacement_still_starting_when_the_wait_ends_keeps_the_node():
    # nobody answers within same_node_wait_ms (3 s), but a process that started after the
    # death runs in the node (its replacement, slow to start under load): not fenced, and
    # it takes the sessions at 6 s; an old process alone would not have kept the node
    import time
    agent = ScriptedAgent([(0.0, _reply(24, 0, 24)), (6.0, _reply(24, 24, 0, server_pid=9))],
                          processes=[{"pid": 5, "comm": "init", "age_s": 3600.0, "state": "S"},
                                     {"pid": 9, "comm": "python", "age_s": 0.4, "state": "R"}])
    out = _run(agent, died=time.time(), same_node_wait_ms=3000)
    assert out.status == "done" and out.detail["same_node"], out.detail
    assert out.detail["moved"] == 24 and out.detail["waited_for"]["pid"] == 9
