"""The kill_culprit action against culprits that start more while they are killed (seen
from a spread memory hog: the middle child of a double fork, chosen from a table taken
before it forked, started one more orphan as it was killed). The agent is a scripted
stand-in with a synthetic table; the real case runs in test_scenarios_repair.py."""

from __future__ import annotations

from types import SimpleNamespace

from backdoors.agent.protocol import ProcessRow
from backdoors.monitor.actions import KillCulprit
from backdoors.monitor.context import Context
from backdoors.monitor.diagnosis import Finding, Target

BOOT = 1000.0  # the start time (s since boot) of a process of age 0


def _row(pid, comm, age, exe="python3", registered=False, ppid=1, pgid=None):
    return ProcessRow(pid, ppid, comm, "S", 1 << 20, BOOT - age, 0.1, 1, pgid or pid,
                      age_s=age, rss_rate=0.0, registered=registered, exe=exe)


class Spawning:
    """A node whose newest culprit, as it is killed, starts one more of its kind, an
    orphan in its process group (the middle child of a double fork), which does the same
    (`generations` times in all); beside them, processes none of which is one of the
    hog's: an older one of its kind, a newborn of another kind, a registered service of
    its program, a pool worker of its kind that the pool's master (pid 40) just started,
    one a supervisor (42) just restarted, both in a group led from outside the node, and
    a child of a culprit (pid 10) born before the newest culprit."""

    def __init__(self, generations: int):
        self.table = [_row(10, "hog", 5.0), _row(11, "hog", 2.0), _row(12, "hog", 1.0),
                      _row(20, "hog", 30.0),  # ran before the hog
                      _row(30, "other", 0.0, exe="sh", ppid=10),  # another kind
                      _row(31, "hog", 0.0, registered=True, ppid=12),  # a service
                      _row(40, "hog", 60.0, pgid=7), _row(41, "hog", 0.0, ppid=40, pgid=7),
                      _row(42, "sup", 60.0, exe="sup", pgid=7),  # (7: not of the node)
                      _row(43, "hog", 0.0, ppid=42, pgid=7),
                      _row(50, "hog", 4.0, ppid=10, pgid=10)]  # (10's first child)
        self.generations, self.next_pid, self.killed = generations, 100, []

    def processes(self, node, **kw):
        return SimpleNamespace(rows=list(self.table), total=len(self.table), truncated=False)

    def kill(self, node, pid, start_time):
        row = next(p for p in self.table if p.pid == pid and p.start_time == start_time)
        self.table.remove(row)
        self.killed.append(pid)
        if self.generations and row.start_time >= BOOT - 1.0:  # the newest starts one more
            self.generations -= 1
            # orphaned, in its group (which the killed one led), or in the group of a
            # middle child that exited unseen
            self.table.append(_row(self.next_pid, "hog", 0.0,
                                   pgid=pid if self.next_pid % 2 else 99))
            self.next_pid += 1
        return True


def _run(agent: Spawning, **kw):
    ctx = Context(rule="memory-hog", incident="i1", view=SimpleNamespace(node="n0", host="h0"),
                  hits=[], onset=0.0, detected=0.0, client=agent)
    culprits = [Target(p.pid, p.start_time, p.comm, p.exe) for p in agent.table
                if p.pid in (10, 11, 12)]
    return KillCulprit(**kw).run(ctx, Finding("memory_hog", "spread", culprits))


def test_what_the_culprits_start_while_killed_is_killed_and_nothing_else():
    agent = Spawning(generations=2)
    out = _run(agent)
    assert out.status == "done", out.detail
    assert agent.killed == [10, 11, 12, 100, 101]
    assert out.detail["stragglers"] == [100, 101] and out.detail["survivors"] == []
    assert {p.pid for p in agent.table} == {20, 30, 31, 40, 41, 42, 43, 50}


def test_culprits_that_keep_starting_more_fail_the_action_after_its_rounds():
    agent = Spawning(generations=10)
    out = _run(agent, rounds=2)
    assert out.status == "failed"
    assert agent.killed == [10, 11, 12, 100, 101]
    assert out.detail["stragglers"] == [100, 101] and out.detail["survivors"] == [102]
    agent = Spawning(generations=10)
    out = _run(agent, rounds=0)  # none looked for
    assert out.status == "done" and agent.killed == [10, 11, 12] and "stragglers" not in out.detail


def test_no_straggler_is_older_than_stragglers_s():
    for within, killed in ((0.2, False), (1.0, True)):
        agent = Spawning(generations=0)
        agent.table.append(_row(60, "hog", 0.5, ppid=12))  # born after the culprits, 0.5 s ago
        out = _run(agent, stragglers_s=within)
        assert out.status == "done"
        assert out.detail.get("stragglers") == ([60] if killed else None)
        assert (60 in agent.killed) is killed
