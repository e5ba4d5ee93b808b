"""The lock_kill_lineage action when the agent fails part of it (seen under load): a lock
that does not take, a tree slow to exit. The agent here is a scripted stand-in holding a
synthetic process table (the agent side is tested for real in test_scenarios_repair.py);
the clock is the action's own (Context.clock), so the order of events is fixed.
"""

from __future__ import annotations

from types import SimpleNamespace

import msgspec

from backdoors.agent.protocol import ProcessRow
from backdoors.errors import AgentError
from backdoors.monitor.actions import LockKillLineage
from backdoors.monitor.context import Context
from backdoors.monitor.diagnosis import Finding, ForkBombDiagnosis


def _row(pid, ppid, comm, age, registered=False, threads=1):
    return ProcessRow(pid, ppid, comm, "S", 1 << 20, 1000.0 - age, 0.1, threads, pid, age_s=age,
                      rss_rate=0.0, registered=registered, exe="python3",
                      young_threads=threads - 1)


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


class ZombieAgent(ScriptedAgent):
    """A spawner (old, in a session of its own: spared) whose 20 young sleeps, once
    killed, stay its zombies: they hold the node's pids until it is killed too. With
    `reaper_holds`, the node's init holds them instead (it reaps late)."""

    def __init__(self, reaper_holds: bool = False):
        super().__init__()
        self.reaper_holds = reaper_holds
        self.table = [_row(1, 0, "init", 90), _row(10, 1, "svc", 60, registered=True),
                      _row(30, 1, "spawner", 9)]
        self.table += [_row(p, 30, "sleep", 0.3) for p in range(40, 60)]
        self.zombies, self.first_kill = 0, False

    def lock(self, node, lease_s):
        return SimpleNamespace(freeze_ms=1.0)

    def unlock(self, node):
        gone = [p for p in self.table if p.pid in self.killed]
        self.zombies += sum(1 for p in gone if p.comm == "sleep")
        if any(p.pid == 30 for p in gone):
            self.zombies = 0  # their parent is gone: init reaps them
        self.table = [p for p in self.table if p.pid not in self.killed]
        holder = 1 if self.reaper_holds else 30
        self.table = [msgspec.structs.replace(p, unreaped=self.zombies) if p.pid == holder else p
                      for p in self.table]
        return SimpleNamespace(thaw_ms=0.5)

    def status(self, node):
        return SimpleNamespace(stats=SimpleNamespace(pids=len(self.table) + self.zombies,
                                                     pids_limit=23))  # full at the start


def _zombie_run(agent):
    ctx = Context(rule="fork-bomb", incident="i1", view=SimpleNamespace(node="n0", host="h0"),
                  hits=[], onset=99.0, detected=100.0, client=agent, clock=agent.clock,
                  lineage=ForkBombDiagnosis())
    return LockKillLineage(verify_ms=10, fork_wait_ms=1).run(ctx, Finding("fork_bomb", "x"))


def test_zombies_held_by_a_parent_that_does_not_reap_send_another_round_for_it():
    agent = ZombieAgent()
    out = _zombie_run(agent)
    assert [r["lineage"] for r in out.detail["rounds"]] == [20, 1]  # the sleeps, the spawner
    assert out.status == "done" and 30 in agent.killed and 10 not in agent.killed
    assert out.finding.culprits[0].pid == 30
    assert "then 1 that held their zombies (spawner)" in out.finding.summary


def test_zombies_a_protected_reaper_holds_end_the_rounds_failed_saying_so():
    agent = ZombieAgent(reaper_holds=True)
    out = _zombie_run(agent)
    assert [r["lineage"] for r in out.detail["rounds"]] == [20, 0]  # nothing holds them to kill
    assert out.status == "failed" and "20 zombies not reaped" in out.detail["error"]
    assert not ({1, 10, 30} & agent.killed)
