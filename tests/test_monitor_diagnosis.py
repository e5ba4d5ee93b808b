"""Diagnosis units over synthetic process tables; the incident log and its rendering."""

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backdoors.agent.protocol import ProcessRow
from backdoors.errors import ConfigError
from backdoors.monitor import diagnosis
from backdoors.monitor.detectors import Hit, NodeView, Violation
from backdoors.monitor.incidents import (
    ActionRecord, Incident, IncidentLog, load_incidents, show_incidents,
)
from backdoors.sensors import Snapshot

MiB = 1 << 20


def row(pid, ppid=1, comm="p", *, rss_mb=10, rate_mb=0.0, age=100.0, state="S",
        registered=False, cpu=1.0, threads=1, exe=None, pgid=None, young_threads=0, unreaped=0,
        reaped_s=None):
    """`exe`: the installed executable the agent vouches for; by default named as `comm`.
    `pgid`: its process group, by default its own."""
    return ProcessRow(pid, ppid, comm, state, int(rss_mb * MiB), 1000.0 - age, cpu, threads,
                      pid if pgid is None else pgid, age_s=age, rss_rate=rate_mb * MiB,
                      registered=registered, exe=comm if exe is None else exe,
                      young_threads=young_threads, unreaped=unreaped, reaped_s=reaped_s)


# ---- memory hog ---------------------------------------------------------------------------


def test_memory_hog_blames_growth_not_size():
    table = [row(10, comm="python", rss_mb=40, registered=True),
             row(11, comm="bd-cache", rss_mb=300, rate_mb=0.0),
             row(12, comm="bd-memhog", rss_mb=120, rate_mb=38.0),
             row(13, comm="worker", rss_mb=20, rate_mb=0.5)]
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(), table)
    assert [c.pid for c in f.culprits] == [12]
    assert f.culprits[0].start_time == pytest.approx(1000.0 - 100.0)
    assert "bd-memhog (pid 12) grows 38.0 MB/s" in f.summary and "largest process is bd-cache" in f.summary
    assert [c["pid"] for c in f.evidence["by_growth"]][:2] == [12, 13]
    assert f.evidence["largest"]["pid"] == 11


def test_memory_hog_finds_a_family_that_grows_by_forking():
    """Children born with their memory (none grows for long): the family is the culprit,
    from the forker down (not its shell), when it outgrows any single process; a pool
    that replaced one worker is no family, nor a service's helpers, nor the node's first
    process."""
    table = [row(10, 1, "svc", rss_mb=40, registered=True),
             row(20, 1, "bash", rss_mb=4), row(30, 20, "forker", rss_mb=50),
             row(40, 1, "leak", rss_mb=80, rate_mb=20)]
    table += [row(p, 30, "forker", rss_mb=49, age=0.2 * (p - 30)) for p in range(31, 35)]
    table += [row(p, 30, "forker", rss_mb=49, age=5 + p) for p in range(35, 38)]  # held before
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(), table)
    assert f.culprits[0].pid == 30 and {c.pid for c in f.culprits} == {30, *range(31, 38)}
    assert f.evidence["family"]["members"] == 8 and "and its 7 descendants" in f.summary
    pool = [row(10, 1, "svc", rss_mb=40, registered=True), row(40, 1, "leak", rss_mb=80, rate_mb=20),
            row(50, 1, "master", rss_mb=200), row(51, 50, "master", rss_mb=200, age=0.3),
            row(52, 50, "master", rss_mb=200, age=60)]
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(), pool)
    assert [c.pid for c in f.culprits] == [40] and "family" not in f.evidence
    helpers = [row(10, 1, "svc", rss_mb=40, registered=True), row(40, 1, "leak", rss_mb=80, rate_mb=20)]
    helpers += [row(p, 10, "helper", rss_mb=30, age=0.5) for p in range(11, 15)]
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(), helpers)
    assert [c.pid for c in f.culprits] == [40]
    # children of the node's first process (orphans): it is never a family's head
    orphans = [row(2, 1, "init", rss_mb=1, age=500), row(40, 2, "leak", rss_mb=80, rate_mb=20)]
    orphans += [row(p, 2, "forker", rss_mb=49, age=0.5) for p in range(50, 55)]
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(), orphans)
    assert [c.pid for c in f.culprits] == [40]


def test_memory_hog_spread_over_slow_orphans_of_one_kind_is_their_kind():
    """Found from outside: a hog of 60 double-forked, setsid orphans, each growing
    0.7 MB/s (none a culprit alone, no family), had no culprit; the node filled and the
    kernel's OOM killer took the service. Now the growing processes of one kind are the
    culprit together, with their spawner (born with them), never an older innocent of
    their kind, the service or its keepers."""
    svc = [row(1, 0, "init", rss_mb=1, age=500), row(9, 1, "sh", rss_mb=1, age=400),
           row(10, 9, "svc", rss_mb=50, registered=True, age=400)]
    old_kin = row(20, 1, "spreader", rss_mb=5, age=300)  # of the hog's kind, long before
    spawner = row(30, 1, "spreader", rss_mb=5, age=12.2)
    orphans = [row(p, 1, "spreader", rss_mb=6, rate_mb=0.7, age=12.0 - 0.2 * (p - 100))
               for p in range(100, 160)]
    table = svc + [old_kin, spawner, row(40, 1, "leak", rss_mb=80, rate_mb=5)] + orphans
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(), table)
    assert {c.pid for c in f.culprits} == {30, *range(100, 160)}
    assert f.evidence["kin"]["growing"] == 60 and f.evidence["kin"]["members"] == 61
    assert "60 processes of spreader" in f.summary and "42.0 MB/s together" in f.summary
    # a single process that outgrows them is the culprit; too few growers are no kind
    fast = svc + orphans[:10] + [row(40, 1, "leak", rss_mb=80, rate_mb=9)]
    assert [c.pid for c in diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(), fast).culprits] == [40]
    few = svc + orphans[:3]
    assert diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(), few).culprits == []


def test_a_spawner_slow_to_start_joins_its_orphans_by_what_it_reaped():
    """Found in a stressed run: the spawner took more than `kin_gap_s` to start its first
    orphan and escaped. It reaps the middle child of each double fork: a process of the
    kind that reaped a child since the oldest grower was born joins, however old; one
    that reaped before, or never since the agent saw it, does not."""
    svc = [row(1, 0, "init", rss_mb=1, age=500), row(10, 1, "svc", registered=True, age=400)]
    orphans = [row(p, 1, "spreader", rss_mb=6, rate_mb=0.7, age=3.0 - 0.2 * (p - 100))
               for p in range(100, 110)]
    spawner = row(30, 1, "spreader", rss_mb=5, age=9.0, reaped_s=0.1)
    reaped_before = row(20, 1, "spreader", rss_mb=5, age=60, reaped_s=3.5)
    never = row(21, 1, "spreader", rss_mb=5, age=60)
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(),
                             svc + [spawner, reaped_before, never] + orphans)
    assert {c.pid for c in f.culprits} == {30, *range(100, 110)}


def test_the_init_that_inherited_a_hogs_orphans_heads_no_family():
    """Found with the spread hog: a lab node's first process is `unshare`, its pid
    namespace's init the `catatonit` it forked; the orphans, born with their memory, went
    to that init, whose family then grew fastest, and killing it ended the whole node,
    service included. An init of other programs, outside their groups, heads no family."""
    table = [row(2, 1, "unshare", rss_mb=1, age=500), row(3, 2, "catatonit", rss_mb=1, age=500),
             row(5, 1, "catatonit", rss_mb=1, age=400),
             row(6, 5, "svc", rss_mb=50, registered=True, age=400)]
    table += [row(p, 3, "hog", rss_mb=40, age=0.1 * (p - 100), pgid=p) for p in range(100, 106)]
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(), table)
    assert 3 not in {c.pid for c in f.culprits} and "family" not in f.evidence


def test_memory_hog_without_a_culprit_says_how_much_memory_no_process_maps():
    """A memfd written without mapping it grows the node, not any process's RSS (found
    from outside: the kernel's OOM killer then took the whole node): the summary says so."""
    table = [row(10, comm="svc", rss_mb=50, registered=True), row(11, comm="writer", rss_mb=10)]
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(), table, node_memory_mb=450)
    assert f.culprits == [] and f.evidence["node_memory_mb"] == 450
    assert "RSS is 60 MB of the node's 450 MB" in f.summary and "memfd" in f.summary
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(), table, node_memory_mb=100)
    assert f.summary.endswith("no culprit")


def test_memory_hog_never_picks_a_registered_service_or_a_protected_comm():
    table = [row(10, comm="svc", rss_mb=40, rate_mb=50, registered=True),
             row(11, comm="sshd", rss_mb=20, rate_mb=30),
             row(12, comm="leak", rss_mb=30, rate_mb=5)]
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(protect_comms=["ssh*"]), table)
    assert [c.pid for c in f.culprits] == [12]


def test_a_process_calling_itself_sshd_is_not_protected():
    """protect_comms matches the executable the agent vouches for, not the comm a
    process sets itself (issue 10, finding 12)."""
    table = [row(11, comm="sshd", rss_mb=20, rate_mb=30, exe="python3"),
             row(12, comm="sshd", rss_mb=30, rate_mb=50, exe=""),  # a file the node wrote
             row(13, comm="x", rss_mb=30, rate_mb=90, exe="sshd")]  # the real one, renamed
    cfg = diagnosis.MemoryHogDiagnosis(protect_comms=["sshd"])
    assert [c.pid for c in diagnosis.memory_hog(cfg, table).culprits] == [12]
    lineage, _ = diagnosis.bomb_lineage([row(20, comm="sshd", age=0.1, state="R", exe="sh")],
                                        1.0, ["sshd"])
    assert [p.pid for p in lineage] == [20]


def test_memory_hog_without_growth_names_no_culprit():
    table = [row(10, rss_mb=300), row(11, rss_mb=200, rate_mb=0.4), row(12, state="Z", rate_mb=90)]
    f = diagnosis.memory_hog(diagnosis.MemoryHogDiagnosis(min_rate_mb_s=1.0), table)
    assert f.culprits == [] and "no culprit" in f.summary


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 2000), st.floats(0, 100), st.booleans()), min_size=1,
                max_size=30))
def test_memory_hog_culprit_is_always_the_fastest_eligible_grower(procs):
    """The fastest eligible process, or the growing ones of a kind (here all are of one)
    when at least kin_min grow and together outgrow it; nothing when nothing grows enough."""
    table = [row(i + 2, rss_mb=rss, rate_mb=rate, registered=reg)
             for i, (rss, rate, reg) in enumerate(procs)]
    cfg = diagnosis.MemoryHogDiagnosis(min_rate_mb_s=1.0)
    f = diagnosis.memory_hog(cfg, table)
    eligible = [p for p in table if not p.registered]
    first = diagnosis.first_process(table)  # never one of a kind's (nor of a family)
    growing = [p for p in eligible if p.rss_rate > 0 and p is not first]
    fastest = max((p.rss_rate for p in eligible), default=0.0)
    kin = len(growing) >= cfg.kin_min and sum(p.rss_rate for p in growing) > max(fastest, 0.0)
    if kin and sum(p.rss_rate for p in growing) >= 1.0 * MiB:
        assert "kin" in f.evidence
        assert {c.pid for c in f.culprits} >= {p.pid for p in growing}
        assert not any(p.registered for p in table if p.pid in {c.pid for c in f.culprits})
    elif f.culprits:
        c = next(p for p in table if p.pid == f.culprits[0].pid)
        assert not c.registered and c.rss_rate >= 1.0 * MiB
        assert c.rss_rate == fastest
    else:
        assert all(p.rss_rate < 1.0 * MiB for p in eligible)


def test_largest_rss_baseline():
    table = [row(10, rss_mb=40, registered=True), row(11, rss_mb=300), row(12, rss_mb=120, rate_mb=40)]
    assert diagnosis.largest_rss(diagnosis.LargestRssDiagnosis(), table).culprits[0].pid == 11
    big_service = [row(10, rss_mb=400, registered=True), row(11, rss_mb=300)]
    assert diagnosis.largest_rss(diagnosis.LargestRssDiagnosis(), big_service).culprits[0].pid == 10
    assert diagnosis.largest_rss(diagnosis.LargestRssDiagnosis(protect_registered=True),
                         big_service).culprits[0].pid == 11


# ---- fork bomb ----------------------------------------------------------------------------


def bomb_table():
    """outside(1) -> service 10 (registered, old); outside -> init 20 (old) -> bomb 30
    (young) -> 31..39 (young) -> 40..44; init -> helper 21 (old) -> child 22 (young);
    outside -> cache 50 (old); a young zombie 60."""
    t = [row(10, 1, "svc", age=50, registered=True), row(20, 1, "init", age=60),
         row(30, 20, "bomb", age=0.4), row(21, 20, "helper", age=40),
         row(22, 21, "helper-child", age=0.1), row(50, 1, "cache", age=30),
         row(60, 21, "zombie", age=0.2, state="Z")]
    t += [row(p, 30, "bomb", age=0.3) for p in range(31, 40)]
    t += [row(p, 31, "bomb", age=0.2) for p in range(40, 45)]
    return t


def test_bomb_lineage_is_young_processes_and_their_bomb_ancestors():
    lineage, ev = diagnosis.bomb_lineage(bomb_table(), young_age_s=1.0)
    pids = {p.pid for p in lineage}
    assert pids == {30, *range(31, 45), 22}
    # init is the node's first process; helper (old, one young child) is held back
    assert ev["first_process"] == 20 and ev["old_parents_spared"] == [21]
    assert 10 not in pids and 50 not in pids and 60 not in pids
    assert ev["comms"]["bomb"] == 15


def test_an_old_spawner_of_another_program_joins_but_a_subreaper_of_orphans_does_not():
    """A process older than onset that starts another program without end (its young
    children run `sleep`, in its process group) is the bomb's source; a subreaper that
    inherited as many young orphans of another kind, each in its own group, is not."""
    t = [row(10, 1, "svc", age=100, registered=True), row(20, 1, "init", age=100),
         row(30, 20, "python3", age=5)]
    t += [row(p, 30, "sleep", age=0.3, pgid=30) for p in range(40, 50)]
    lineage, ev = diagnosis.bomb_lineage(t, young_age_s=1.0)
    assert {p.pid for p in lineage} == {30, *range(40, 50)} and ev["old_parents_spared"] == [20]
    t = [row(10, 1, "svc", age=100, registered=True), row(20, 1, "init", age=100),
         row(30, 20, "reaper", age=5)]
    t += [row(p, 30, "sleep", age=0.3) for p in range(40, 50)]  # orphans: groups of their own
    lineage, ev = diagnosis.bomb_lineage(t, young_age_s=1.0)
    assert 30 not in {p.pid for p in lineage} and ev["old_parents_spared"] == [30]
    # a retry: spared before and with as many young children again, a spawner of sessions
    lineage, ev = diagnosis.bomb_lineage(t, young_age_s=1.0, spared_before={30, 20})
    assert {p.pid for p in lineage} == {30, *range(40, 50)} and ev["old_parents_spared"] == [20]


def test_an_old_process_holding_the_nodes_tasks_as_threads_or_zombies_is_part_of_it():
    """No process is young; one older process started most of the node's tasks as
    threads since onset (a thread bomb), or holds them as children it does not reap
    (zombies: not rows of the table). A server that started a few threads is spared, and
    so is a registered service holding as many as a bomb (the evidence names it)."""
    t = [row(10, 1, "svc", age=100, registered=True, threads=4, young_threads=2),
         row(20, 1, "init", age=100), row(30, 20, "worker", age=9, threads=230, young_threads=229),
         row(40, 20, "server", age=50, threads=21, young_threads=20)]
    lineage, ev = diagnosis.bomb_lineage(t, young_age_s=1.0)
    assert {p.pid for p in lineage} == {30}
    assert ev["holding"] == 1 and ev["young"] == 0 and ev["holding_min"] == 64.0
    assert [e["pid"] for e in ev["holders"]] == [30, 40, 10]
    zombies = [row(10, 1, "svc", age=100, registered=True), row(20, 1, "init", age=100),
               row(30, 20, "spawner", age=9, unreaped=240), row(40, 20, "server", age=50, unreaped=2)]
    lineage, ev = diagnosis.bomb_lineage(zombies, young_age_s=1.0)
    assert {p.pid for p in lineage} == {30} and ev["holding_min"] == 61.5  # of 246 tasks
    leak = [row(10, 1, "svc", age=100, registered=True, threads=230, young_threads=229),
            row(20, 1, "init", age=100), row(40, 20, "server", age=50, threads=21, young_threads=20)]
    lineage, ev = diagnosis.bomb_lineage(leak, young_age_s=1.0)
    assert lineage == [] and ev["holders"][0] == {**ev["holders"][0], "pid": 10,
                                                  "protected": True, "young_threads": 229}
    lineage, _ = diagnosis.bomb_lineage(t, young_age_s=1.0, task_share=0.05)
    assert {p.pid for p in lineage} == {30, 40}


def test_old_shell_that_forks_the_bomb_is_part_of_it():
    t = [row(10, 1, "svc", age=100, registered=True), row(20, 1, "bash", age=60)]
    t += [row(p, 20, "bash", age=0.3) for p in range(30, 40)]
    lineage, _ = diagnosis.bomb_lineage(t, young_age_s=1.0)
    assert {p.pid for p in lineage} == {20, *range(30, 40)}
    lineage, _ = diagnosis.bomb_lineage(t, young_age_s=1.0, old_ancestor_min_children=20)
    assert 20 not in {p.pid for p in lineage}


def test_registered_and_protected_processes_are_never_in_the_lineage():
    t = [row(10, 1, "svc", age=0.5, registered=True),  # a young registered service
         row(11, 10, "svc-worker", age=0.2), row(12, 1, "sshd", age=0.1)]
    lineage, _ = diagnosis.bomb_lineage(t, young_age_s=1.0, protect_comms=["sshd"])
    assert {p.pid for p in lineage} == {11}


def test_first_process_is_protected_only_when_older_than_onset():
    t = [row(5, 1, "init", age=100), row(6, 5, "x", age=0.1), row(7, 5, "x", age=0.1),
         row(8, 5, "x", age=0.1)]
    assert {p.pid for p in diagnosis.bomb_lineage(t, 1.0)[0]} == {6, 7, 8}
    young_first = [row(5, 1, "bomb", age=0.5)] + [row(p, 5, "bomb", age=0.1) for p in (6, 7)]
    assert {p.pid for p in diagnosis.bomb_lineage(young_first, 1.0)[0]} == {5, 6, 7}


def test_a_late_onset_still_finds_the_bomb_s_older_generations():
    """Under load the onset came late: the bomb's root and its first generations look old
    (as in a demo run under stress-ng). Its kind joins them; old innocents stay."""
    t = [row(10, 1, "svc", age=60, registered=True, exe="python3"),
         row(20, 1, "bd-init", age=50, exe="python3"),
         row(21, 20, "bd-forkprobe", age=40, exe="python3"),  # forks one child now and then
         row(22, 21, "bd-forkprobe", age=0.1, exe="python3"),
         row(30, 20, "bd-forkbomb", age=12.0, exe="python3")]  # the root, 3.5 s before onset
    t += [row(p, 30, "bd-forkbomb", age=11.5 - 0.5 * (p - 31), exe="python3")
          for p in range(31, 37)]  # old generations, each with fewer than 3 young children
    t += [row(p, 31 + p % 6, "bd-forkbomb", age=0.3, exe="python3") for p in range(40, 50)]
    lineage, ev = diagnosis.bomb_lineage(t, young_age_s=8.5)
    pids = {p.pid for p in lineage}
    assert pids == {30, *range(31, 37), *range(40, 50), 22}
    assert ev["kin"] == 7 and ev["kinds"] == ["python3:bd-forkbomb"]
    assert ev["old_parents_spared"] == [21]  # the probe: one young child, of another kind


def test_orphans_of_a_double_forking_bomb_join_by_kind_and_burst():
    """Every child double-forks, so each is orphaned to the node's init at once: no tree
    joins the generations born before onset. The burst does; an older process of the same
    kind started long before, and registered services, do not."""
    t = [row(1, 0, "catatonit", age=90, exe="catatonit"),
         row(10, 1, "python3", age=60, registered=True, exe="python3"),
         row(11, 1, "sleep", age=30, exe="sleep")]  # an innocent of the bomb's kind, long before
    t += [row(p, 1, "sleep", age=1.5 + 0.25 * (p - 20), exe="sleep") for p in range(20, 30)]
    t += [row(p, 1, "sleep", age=0.2, exe="sleep") for p in range(40, 45)]
    lineage, ev = diagnosis.bomb_lineage(t, young_age_s=1.0)
    assert {p.pid for p in lineage} == {*range(20, 30), *range(40, 45)}
    lineage, _ = diagnosis.bomb_lineage(t, young_age_s=1.0, kin_gap_s=0.5)
    assert {p.pid for p in lineage} == set(range(40, 45))  # 1.3 s before the burst: too far


def test_the_forker_of_a_double_forking_bomb_joins_by_its_process_group():
    """A bomb that ran 3 s before it began to double-fork (a slow start): its orphans are
    the init's children and it is older than the burst by more than kin_gap_s, but they
    are in its process group. An innocent of its kind in a group of its own is spared,
    and so is one in the group of a protected process (a service's old worker)."""
    t = [row(1, 0, "catatonit", age=90, exe="catatonit"),
         row(5, 1, "bd-init", age=10, exe="python3"),  # leads the group; another kind
         row(6, 5, "bd-forkbomb", age=4.0, exe="python3", pgid=5),  # the forker
         row(7, 1, "bd-forkbomb", age=4.5, exe="python3"),  # an innocent of its kind
         row(10, 1, "bd-forkbomb", age=60, registered=True, exe="python3"),
         row(11, 10, "bd-forkbomb", age=30, exe="python3", pgid=10)]  # the service's
    t += [row(p, 1, "bd-forkbomb", age=0.3, exe="python3", pgid=5) for p in range(20, 30)]
    t += [row(p, 10, "bd-forkbomb", age=0.3, exe="python3", pgid=10) for p in (31, 32, 33)]
    lineage, ev = diagnosis.bomb_lineage(t, young_age_s=1.0)
    assert {p.pid for p in lineage} == {6, *range(20, 30), 31, 32, 33}
    assert ev["kin"] == 1
    # without the group (a bomb that calls setsid, say) the forker is too old to join
    t[2] = row(6, 5, "bd-forkbomb", age=4.0, exe="python3")
    assert 6 not in {p.pid for p in diagnosis.bomb_lineage(t, young_age_s=1.0)[0]}


def test_the_node_s_init_that_inherited_the_orphans_is_spared():
    """The node's PID 1 (catatonit, a child of the node's first process) inherits every
    orphan of a double-forking bomb: many young children, but of another kind. Killing it
    would end the node, service included (seen before this rule)."""
    t = [row(5, 0, "unshare", age=90, exe="unshare"),
         row(6, 5, "catatonit", age=90, exe="catatonit"),
         row(10, 0, "python", age=60, registered=True, exe="python3")]
    t += [row(p, 6, "bd-forkbomb", age=0.3, exe="") for p in range(20, 40)]
    lineage, ev = diagnosis.bomb_lineage(t, young_age_s=1.0)
    assert {p.pid for p in lineage} == set(range(20, 40))
    assert ev["old_parents_spared"] == [6]


def test_what_the_bomb_exec_d_joins_it_even_when_born_before_onset():
    """A Python bomb whose children exec `sleep`: the forkers are young or kin, most of the
    sleeps are older than a late onset and too few are young to make `sleep` a kind; they
    are the bomb's all the same (its descendants, born since it started). An older sleep
    of the service is not."""
    t = [row(10, 1, "python", age=60, registered=True, exe="python3"),
         row(11, 10, "sleep", age=30, exe="sleep")]
    t += [row(p, 1, "python", age=2.1, exe="python3") for p in range(24, 28)]  # orphans
    t += [row(p, p + 4, "python", age=0.2, exe="python3") for p in range(20, 24)]
    t += [row(p, 24 + p % 4, "sleep", age=2.0, exe="sleep") for p in range(30, 50)]
    t += [row(50, 21, "sleep", age=0.1, exe="sleep")]
    lineage, ev = diagnosis.bomb_lineage(t, young_age_s=1.0)
    assert {p.pid for p in lineage} == {*range(20, 28), *range(30, 51)}
    assert ev["kin"] == 4 and ev["spawn"] == 20


def test_kin_never_takes_a_protected_process_nor_a_kind_of_few_young():
    t = [row(10, 1, "svc", age=20, registered=True, exe="python3"),
         row(11, 10, "svc", age=15, exe="python3"),  # the service's old worker, same kind
         row(12, 1, "sshd", age=0.5, exe="sshd")]
    t += [row(p, 10, "svc", age=0.2, exe="python3") for p in range(20, 25)]
    t += [row(p, 12, "sshd", age=0.1, exe="sshd") for p in range(30, 35)]
    t += [row(p, 1, "x", age=0.1, exe="x") for p in (40, 41)]  # two young: not a kind
    t += [row(42, 1, "x", age=0.5 + 1.0, exe="x")]
    lineage, ev = diagnosis.bomb_lineage(t, young_age_s=1.0, protect_comms=["sshd"])
    assert {p.pid for p in lineage} == {*range(20, 25), 40, 41}
    assert 10 not in {p.pid for p in lineage} and ev["kin"] == 0


def test_subtree_roots_split_whole_trees_from_singles():
    table = bomb_table()
    lineage, _ = diagnosis.bomb_lineage(table, 1.0)
    roots, singles = diagnosis.subtree_roots(lineage, table)
    assert [r.pid for r in roots] == [22, 30]
    assert singles == []
    # a bomb process with a spared (old) child cannot be killed as a tree
    table.append(row(70, 33, "old-child", age=5))
    lineage, _ = diagnosis.bomb_lineage(table, 1.0)
    roots, singles = diagnosis.subtree_roots(lineage, table)
    assert 30 not in [r.pid for r in roots] and 33 in [s.pid for s in singles]
    assert 70 not in {p.pid for p in lineage}


def _fork_history(forks: list[int], pids: list[int]):
    """A node's history of kernel-box samples every 50 ms: fork counter and pids level."""
    from backdoors.monitor.history import History
    from backdoors.sensors import SensorState
    h = History()
    for i, (f, p) in enumerate(zip(forks, pids)):
        snap = Snapshot("kernel", 1, 2, i * 0.05, [
            SensorState(1, "forks", "pressure", f, False, rate=0, max_events=200, window=1),
            SensorState(2, "pids", "level", p, p > 115, min=0, max=115)])
        h.add(NodeView("n0", "h0", i * 0.05, {"kernel": snap}))
    return h


def test_bomb_onset_from_the_fork_counters():
    h = _fork_history([0, 0, 40, 90, 90, 90], [3, 3, 45, 100, 128, 128])
    v = NodeView("n0", "h0", 0.25, {})
    # detected on pids at 0.20: the forks counter began rising after the sample at 0.05
    assert diagnosis.bomb_onset(h, v, 0.20) == pytest.approx(0.05)


def test_bomb_onset_is_not_dated_back_by_a_service_forking_one_child_at_a_time():
    """A process forking now and then (the scenario's probe, every 20 ms) keeps the fork
    counter rising by one per sample since it started; the bomb's burst starts later."""
    h = _fork_history([0, 1, 2, 3, 4, 5, 6, 40, 90, 140], [8, 9, 8, 9, 8, 9, 9, 45, 100, 128])
    v = NodeView("n0", "h0", 0.45, {})
    assert diagnosis.bomb_onset(h, v, 0.45) == pytest.approx(0.30)
    assert diagnosis.bomb_onset(h, v, 0.45, min_rise=1) == pytest.approx(0.0)  # as before


# ---- hang ---------------------------------------------------------------------------------


def hang_view(frozen=False):
    snap = Snapshot("svc", 10, 2, 5.0, [])
    return NodeView("n0", "h0", 5.0, {"svc": snap}, frozen=frozen)


STALL = Hit(0, "progress_stalled", "svc/progress stalled",
            [Violation("svc", "progress", "progress", 12, 0.2, 0.25)])


def test_hang_names_the_stuck_process_and_its_state():
    table = [row(10, comm="svc", state="S", registered=True, threads=4, cpu=2.0), row(11, comm="x")]
    later = [row(10, comm="svc", state="S", registered=True, threads=4, cpu=2.0)]
    f = diagnosis.hang(hang_view(), [STALL], table, later, 0.1)
    assert f.evidence["scope"] == "process" and [c.pid for c in f.culprits] == [10]
    assert "svc (pid 10) stopped progressing; state S" in f.summary and "not using CPU" in f.summary
    assert f.evidence["stuck"][0]["threads"] == 4 and f.evidence["stuck"][0]["cpu_share"] == 0
    spinning = [row(10, comm="svc", state="R", registered=True, cpu=2.09)]
    f = diagnosis.hang(hang_view(), [STALL], [row(10, comm="svc", state="R", registered=True, cpu=2.0)],
               spinning, 0.1)
    assert "state R" in f.summary and "spinning" in f.summary


def test_hang_whole_node_frozen_or_stopped():
    stopped = [row(10, comm="svc", state="T", registered=True), row(11, state="T")]
    f = diagnosis.hang(hang_view(), [STALL], stopped)
    assert f.evidence["scope"] == "node" and "every process of the node (2) is stopped" in f.summary
    frozen = Hit(1, "node_frozen", "frozen")
    f = diagnosis.hang(hang_view(frozen=True), [frozen], [row(10, comm="svc", registered=True)])
    assert f.evidence["scope"] == "node" and "cgroup is frozen" in f.summary
    assert [c.pid for c in f.culprits] == [10]  # the registered service, as no sensor named one


def test_hang_of_a_crashed_service():
    f = diagnosis.hang(hang_view(), [STALL], [row(11, comm="other")])
    assert "is gone: the service crashed" in f.summary and f.culprits == []


# ---- incidents ----------------------------------------------------------------------------


def incident(i=1, **kw):
    return Incident(id=f"inc-{i}", monitor="m1", rule="hang", node="n0", host="h0",
                    onset=1000.0 + i, detected=1000.25 + i, onset_to_detect_ms=250.0,
                    detectors=[STALL], **kw)


def test_log_folds_events_into_incidents(tmp_path):
    log = IncidentLog(tmp_path / "inc")
    a, b = incident(1), incident(2)
    log.write("opened", a, record=a)
    log.write("opened", b, record=b)
    f = diagnosis.Finding("hang", "svc stuck", [diagnosis.Target(10, 900.0, "svc")], {"scope": "process"})
    log.write("diagnosis", a, diagnosis=f)
    log.write("action", a, action=ActionRecord("record", "done", 100.0, 0.1))
    a.closed, a.outcome = 1002.0, "cleared"
    log.write("closed", a, record=a)
    log.close()
    text = (tmp_path / "inc" / "incidents.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in text] == ["opened", "opened", "diagnosis",
                                                            "action", "closed"]
    got = load_incidents(tmp_path / "inc")
    assert [i.id for i in got] == ["inc-1", "inc-2"]
    assert got[0].outcome == "cleared"
    assert got[1].outcome is None  # still open when the log ended
    # events after "opened" alone are folded in
    (tmp_path / "part.jsonl").write_text("\n".join(text[:4]) + "\n")
    part = load_incidents(tmp_path / "part.jsonl")[0]
    assert part.diagnosis.summary == "svc stuck" and part.actions[0].kind == "record"


def test_log_tolerates_a_torn_tail_and_skips_garbage_saying_where(tmp_path, caplog):
    log = IncidentLog(tmp_path)
    log.write("opened", incident(), record=incident())
    log.close()
    path = tmp_path / "incidents.jsonl"
    with open(path, "a") as f:
        f.write('{"v": 1, "event": "clo')
    assert len(load_incidents(path)) == 1
    assert "not an incident event" not in caplog.text  # a torn tail is no news
    path.write_text("garbage\n" + path.read_text())
    assert len(load_incidents(path)) == 1  # the rest of the log is still read
    assert f"{path}:1: not an incident event, skipped" in caplog.text
    with pytest.raises(ConfigError, match="no incident log"):
        load_incidents(tmp_path / "nope")


def test_show_incidents_table_and_json(tmp_path, capsys):
    from rich.console import Console
    log = IncidentLog(tmp_path)
    inc = incident(diagnosis=diagnosis.Finding("hang", "svc (pid 10) stuck in S"), repaired_ms=101.0,
                   actions=[ActionRecord("record", "done", 100.0, 0.1)], state="recorded")
    log.write("opened", inc, record=inc)
    log.close()
    console = Console(width=200, record=True, file=io.StringIO())
    shown = show_incidents(tmp_path, console=console)
    text = console.export_text()
    assert len(shown) == 1 and "inc-1" in text and "OPEN, recorded" in text
    assert "svc (pid 10) stuck in S" in text
    console = Console(width=200, record=True, file=io.StringIO())
    show_incidents(tmp_path, console=console, wide=True)
    assert "record:done" in console.export_text()
    show_incidents(tmp_path, as_json=True)
    data = json.loads(capsys.readouterr().out)
    assert data[0]["id"] == "inc-1" and data[0]["diagnosis"]["summary"].startswith("svc")
    empty = tmp_path / "empty"
    empty.mkdir()
    console = Console(width=200, record=True, file=io.StringIO())
    assert show_incidents(empty, console=console) == []
    assert "no incidents" in console.export_text()


def test_the_ancestors_of_a_service_are_never_part_of_a_bomb():
    # A container node: launcher 2 -> PID 1 (catatonit) 3 -> exec shim 4 -> service 5; the
    # bomb's orphans were reparented to PID 1, which now has young children of its own.
    table = [row(2, ppid=1, comm="unshare", age=60), row(3, ppid=2, comm="catatonit", age=60),
             row(4, ppid=3, comm="catatonit", age=59), row(5, ppid=4, comm="python", age=59,
                                                           registered=True),
             row(20, ppid=3, comm="bd-forkbomb", age=0.2), row(21, ppid=3, comm="bd-forkbomb",
                                                               age=0.2),
             row(22, ppid=3, comm="bd-forkbomb", age=0.1), row(23, ppid=22, comm="bd-forkbomb",
                                                               age=0.1)]
    lineage, _ = diagnosis.bomb_lineage(table, 1.0)
    assert {p.pid for p in lineage} == {20, 21, 22, 23}


def _guest_rows(*rows):
    """(pid, ppid, comm, rss[, exe]) as the agent's rows: started in pid order, a kernel
    thread (rss 0, kthreadd's) of no exec, every other one forked from an exec of its comm's
    name unless `exe` says."""
    from backdoors.agent.protocol import GuestProcess
    return [GuestProcess(pid, ppid, comm, "R", rss, start_ns=pid,
                         exe=0 if ppid == 2 else more[0] if more else sum(comm.encode()))
            for pid, ppid, comm, rss, *more in rows]


def test_the_guest_culprit_is_the_largest_process_or_tree_outside_protect():
    from backdoors.monitor.actions import guest_culprit
    MiB = 1 << 20
    rows = _guest_rows(
        (1, 0, "init", 1 * MiB), (2, 0, "kthreadd", 0), (9, 2, "kworker/0:1", 0),
        (40, 1, "httpd", 900 * MiB),  # the service: protected, however large
        (41, 40, "sh", 2 * MiB),  # a CGI of the service's (its parent is protected: a root)
        (50, 1, "tail", 120 * MiB),  # a hog adopted by init
        # a bomb whose root exited: two trees adopted by init, of 3 and 4 processes
        (60, 1, "sh", MiB), (61, 60, "sh", MiB), (62, 60, "sh", MiB),
        (70, 1, "sh", MiB), (71, 70, "sh", MiB), (72, 71, "sh", MiB), (73, 71, "sh", MiB))
    top, heads, how = guest_culprit(rows, "rss", {"httpd"})
    assert (top.pid, heads, how) == (50, 1, "rss")
    top, heads, how = guest_culprit(rows, "lineage", {"httpd"})
    assert (top.pid, heads, how) == (70, 4, "lineage")
    # nothing protected: the service is the largest; pid 1, 2 and kernel threads never count
    assert guest_culprit(rows, "rss", set())[0].pid == 40
    assert guest_culprit(rows, "lineage", set())[0].pid == 70  # the service heads 2
    assert guest_culprit(rows[:3], "rss", set()) is None  # only init and kernel threads
    # "memory": the hog holds more than any tree of at least 3 (4 MiB at most) ...
    top, heads, how = guest_culprit(rows, "memory", {"httpd"}, 3)
    assert (top.pid, heads, how) == (50, 1, "rss")
    # ... but not more than a bomb of 200 small processes (as forked shells, 1 MiB each)
    bomb = _guest_rows((100, 1, "sh", MiB), *((101 + i, 100 + i // 2, "sh", MiB) for i in range(199)))
    top, heads, how = guest_culprit(rows + bomb, "memory", {"httpd"}, 8)
    assert (top.pid, heads, how) == (100, 200, "lineage")
    # a process with no memory (in the middle of an exec) still heads its tree
    mid = _guest_rows((100, 1, "sh", 0)) + bomb[1:]
    assert guest_culprit(rows + mid, "lineage", {"httpd"})[:2] == (mid[0], 200)
    # a tree below min_lineage never counts, however much it holds
    assert guest_culprit(rows + bomb, "memory", {"httpd"}, 201)[2] == "rss"


def test_a_guest_process_that_takes_the_services_name_is_not_spared():
    """Outside review: `protect` spared by comm, a guest process's own choice: a runaway
    named httpd was spared and the next largest process killed in its stead. The service
    is now the oldest process of the name and the workers forked from it that keep its
    name and its exec (vm.service; `exe` here: a token of the exec)."""
    from backdoors.agent.protocol import GuestProcess
    from backdoors.monitor.actions import guest_culprit
    from backdoors.vm.service import service
    MiB, BUSYBOX, OTHER = 1 << 20, 7, 8
    rows = _guest_rows(
        (1, 0, "init", MiB, BUSYBOX), (2, 0, "kthreadd", 0),
        (40, 1, "httpd", 8 * MiB, BUSYBOX),  # the service, started at boot
        (41, 40, "httpd", 2 * MiB, BUSYBOX),  # its worker for a connection
        (42, 41, "hog.cgi", MiB, BUSYBOX),  # a CGI program the worker exec'd ...
        (43, 42, "httpd", 300 * MiB, BUSYBOX),  # ... whose child took the name
        (44, 41, "httpd", 200 * MiB, OTHER),  # the worker exec'd another file so named
        (50, 1, "httpd", 500 * MiB, OTHER),  # a runaway elsewhere, renamed
        (60, 1, "sh", 100 * MiB, BUSYBOX))
    assert service(rows, {"httpd"}) == {40, 41}
    assert service(rows, {"httpd", "sh"}) == {40, 41, 60}
    assert service(rows, set()) == set()
    assert guest_culprit(rows, "rss", {"httpd"})[0].pid == 50
    assert guest_culprit([r for r in rows if r.pid != 50], "rss", {"httpd"})[0].pid == 43
    # the workers of a service a runaway outlived are no longer the service's
    assert service([r for r in rows if r.pid != 40], {"httpd"}) == {41}
    # a CGI program that renamed itself under the worker: the service's file, exec'd anew
    renamed = _guest_rows((45, 41, "httpd", 600 * MiB, 9))
    assert service(rows + renamed, {"httpd"}) == {40, 41}
    assert guest_culprit(rows + renamed, "rss", {"httpd"})[0].pid == 45
    # the oldest is the service, not the lowest pid (pids wrap)
    wrapped = [GuestProcess(7, 1, "httpd", "S", MiB, start_ns=900, exe=3),
               GuestProcess(30000, 1, "httpd", "S", MiB, start_ns=100, exe=4),
               GuestProcess(31000, 30000, "httpd", "S", MiB, start_ns=200, exe=4)]
    assert service(wrapped, {"httpd"}) == {30000, 31000}
    assert guest_culprit(wrapped, "rss", {"httpd"})[0].pid == 7


def test_a_guest_hog_caught_forking_is_the_culprit_not_its_child():
    """Seen in a guest: a shell growing its memory forks a command every 50 ms; a table
    read between a fork and its exec shows the child as large as its parent (their pages
    shared), and the newer was killed: a child about to exec, the hog left. The parent
    holding as much is the culprit; a child that grew past its parent still is."""
    from backdoors.monitor.actions import guest_culprit
    MiB = 1 << 20
    rows = _guest_rows((1, 0, "init", MiB), (40, 1, "httpd", 8 * MiB),
                       (50, 1, "sh", 160 * MiB), (51, 50, "sh", 160 * MiB))
    assert guest_culprit(rows, "rss", {"httpd"})[0].pid == 50
    assert guest_culprit(rows, "memory", {"httpd"}, 8)[0].pid == 50
    grown = _guest_rows((1, 0, "init", MiB), (50, 1, "sh", 20 * MiB), (51, 50, "tail", 160 * MiB))
    assert guest_culprit(grown, "rss", set())[0].pid == 51
    # a table whose parents loop ends
    loop = _guest_rows((60, 61, "a", MiB), (61, 60, "b", MiB))
    assert guest_culprit(loop, "rss", set())[0].pid in (60, 61)


def test_a_runaway_tree_foreseen_while_still_small_is_killed_once_it_reaches_min_lineage():
    """kill_guest_culprit against a guest whose CPU-bound workers are still being started
    (a scripted agent: each table read shows one worker more): the tree below min_lineage
    is looked at again, and killed whole once it reaches it -- not skipped."""
    from types import SimpleNamespace

    from backdoors.monitor.actions import KillGuestCulprit
    from backdoors.monitor.context import Context
    from backdoors.sensors import SensorType

    class Guest:
        def __init__(self):
            self.workers, self.killed = 3, []

        def guest_processes(self, node):
            self.workers += 1
            rows = _guest_rows((1, 0, "init", 1 << 20), (40, 1, "httpd", 8 << 20),
                               (60, 1, "sh", 1 << 20),
                               *((61 + i, 60, "sh", 1 << 20) for i in range(self.workers)))
            return SimpleNamespace(rows=[r for r in rows if r.pid not in self.killed])

        def guest_kill(self, node, pid, comm, tree, spare):
            assert tree and spare == ["httpd"]  # its protect: spared in the tree too
            self.killed += [60, *range(61, 61 + self.workers)]
            return SimpleNamespace(signalled=self.workers + 1, survivors=[], took_ms=1.0)

    guest = Guest()
    hit = Hit(0, "level_out_of_bounds", "guest/predicted_starvation = 1 > 0.5",
              [Violation("guest", "predicted_starvation", SensorType.LEVEL, 1, 0.5, 1)])
    ctx = Context(rule="guest-unstable", incident="i1", view=SimpleNamespace(node="v0"),
                  hits=[hit], onset=0.0, detected=0.0, client=guest)
    out = KillGuestCulprit(protect=["httpd"], min_lineage=8, grow_s=5).run(ctx, None)
    assert out.status == "done", out
    assert out.detail["culprit"] == {"pid": 60, "comm": "sh", "rss_bytes": 1 << 20,
                                     "processes": 8, "by": "lineage"}
    # a tree that stays below min_lineage for grow_s is still skipped
    guest.guest_processes = lambda node: SimpleNamespace(rows=_guest_rows(
        (1, 0, "init", 1 << 20), (60, 1, "sh", 1 << 20), (61, 60, "sh", 1 << 20)))
    out = KillGuestCulprit(protect=["httpd"], min_lineage=8, grow_s=0.2).run(ctx, None)
    assert out.status == "skipped" and "below min_lineage" in out.detail["reason"], out
