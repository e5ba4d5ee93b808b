"""The lock_kill_lineage action when the agent fails part of it (seen under load): a lock
that does not take, a tree slow to exit. The agent here is a scripted stand-in holding a
synthetic process table (the agent side is tested for real in test_scenarios_repair.py);
the clock is the action's own (Context.clock), so the order of events is fixed.
"""

from __future__ import annotations

from types import SimpleNamespace

from backdoors.agent.protocol import ProcessRow
from backdoors.errors import AgentError
from backdoors.monitor.actions import LockKillLineage
from backdoors.monitor.context import Context
from backdoors.monitor.diagnosis import Finding, ForkBombDiagnosis


def _row(pid, ppid, comm, age, registered=False, threads=1):
    return ProcessRow(pid, ppid, comm, "S", 1 << 20, 1000.0 - age, 0.1, threads, pid, age, 0.0,
                      registered, "python3", young_threads=threads - 1)


class ScriptedAgent:
    """A node with a service and a bomb of three trees. The first lock fails; the first
    kill_tree fails (its tree is not killed). Killed processes are gone once
    the node is unlocked, as with the v1 freezer."""

    def __init__(self):
        self.now = 100.0
        self.table = [_row(1, 0, "init", 90), _row(10, 1, "svc", 60, registered=True)]
        for root in (20, 30, 40):
            self.table += [_row(root, 1, "bomb", 0.5)]
            self.table += [_row(root + i, root, "bomb", 0.3) for i in range(1, 5)]
        self.locks, self.first_kill = 0, True
        self.killed: set[int] = set()
        self.tree_calls: list[int] = []
        self.asked: list[float | None] = []  # each table's threads_within_s

    def clock(self) -> float:
        self.now += 0.001
        return self.now

    def lock(self, node, lease_s):
        self.locks += 1
        if self.locks == 1:
            raise AgentError("node n0 would not lock: not frozen within 0.8 s")
        return SimpleNamespace(freeze_ms=1.0)

    def unlock(self, node):
        self.table = [p for p in self.table if p.pid not in self.killed]
        return SimpleNamespace(thaw_ms=0.5)

    def processes(self, node, cmdline=False, threads_within_s=None):
        self.asked.append(threads_within_s)
        return SimpleNamespace(rows=list(self.table), total=len(self.table), truncated=False)

    def kill_tree(self, node, pid):
        self.tree_calls.append(pid)
        if self.first_kill:
            self.first_kill = False
            raise AgentError(f"node n0: the tree of {pid} did not exit within 0.8 s")
        self.killed |= {p.pid for p in self.table if pid in (p.pid, p.ppid)}
        return [pid]

    def kill(self, node, pid, start_time):
        self.killed.add(pid)
        return True

    def status(self, node):
        return SimpleNamespace(stats=SimpleNamespace(pids=len(self.table), pids_limit=128))


def test_a_failed_lock_or_kill_costs_a_round_not_the_rest_of_the_lineage():
    agent = ScriptedAgent()
    view = SimpleNamespace(node="n0", host="h0")
    ctx = Context(rule="fork-bomb", incident="i1", view=view, hits=[], onset=99.0,
                  detected=100.0, client=agent, clock=agent.clock,
                  lineage=ForkBombDiagnosis())
    out = LockKillLineage(verify_ms=10).run(ctx, Finding("fork_bomb", "fork pressure"))
    rounds = out.detail["rounds"]
    assert rounds[0]["error"].startswith("lock failed: node n0 would not lock")
    # the second round: its first tree would not exit, the two others were still killed
    assert "kill_tree 20" in rounds[1]["error"] and rounds[1]["killed_trees"] == [20, 30, 40]
    assert agent.tree_calls[:3] == [20, 30, 40]
    # the third kills the tree left over: done, the node can fork again
    assert len(rounds) == 3 and rounds[2]["killed_trees"] == [20] and rounds[2]["error"] is None
    assert out.status == "done" and out.detail["survivors"] == [] and out.detail["killed"] == 15
    assert {p.pid for p in agent.table} >= {1, 10}  # the service and init never touched
    assert not ({1, 10} & agent.killed)
    assert out.finding is not None and "fork bomb of 15 processes" in out.finding.summary
    # the two locked rounds' tables count the threads started since onset + slack
    locked_tables = [a for a in agent.asked if a is not None]
    assert len(locked_tables) == 2 and all(a > 1.25 for a in locked_tables), agent.asked


def test_a_service_leaking_threads_is_named_and_spared():
    """A registered service that started a thread bomb's share of the node's tasks since
    onset is protected: nothing is killed, and the summary says what it did."""
    agent = ScriptedAgent()
    agent.table = [_row(1, 0, "init", 90), _row(10, 1, "svc", 60, registered=True, threads=200)]
    ctx = Context(rule="fork-bomb", incident="i1", view=SimpleNamespace(node="n0", host="h0"),
                  hits=[], onset=99.0, detected=100.0, client=agent, clock=agent.clock,
                  lineage=ForkBombDiagnosis())
    out = LockKillLineage(verify_ms=10).run(ctx, Finding("fork_bomb", "fork pressure"))
    assert out.detail["killed"] == 0 and not agent.killed
    assert "svc (pid 10) holds 199 threads started since onset and 0 unreaped children, and " \
        "is protected" in out.finding.summary
