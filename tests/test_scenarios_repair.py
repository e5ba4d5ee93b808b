"""The three repair scenarios end to end (lab, real agents, the monitor in-process).

Each asserts the JSON facts the scenario reports, never timings: what was detected, who
was killed, who survived, what is left. Each lab has a unique name t<6 hex> and is torn
down by the scenario itself, also on failure; a final check looks for leftovers.
"""

import json
from pathlib import Path

import pytest

from backdoors.lab import topology
from backdoors.monitor import load_incidents
from backdoors.net import netns
from backdoors.scenarios import repair

pytestmark = [pytest.mark.root, pytest.mark.slow]


def no_leftovers(name: str) -> None:
    assert netns.names(topology.prefix(name)) == []
    assert not (topology.RUN_ROOT / name).exists()
    for ctrl in ("memory", "pids", "freezer"):
        base = Path("/sys/fs/cgroup") / ctrl
        if base.is_dir():
            assert not [p for p in base.iterdir() if p.name.startswith(topology.prefix(name))]


def test_memory_hog_kills_the_grower_not_the_large_cache(root, unique, tmp_path):
    name = f"t{unique}"
    r = repair.memory_hog(name=name, incidents_dir=str(tmp_path))
    json.dumps(r)
    assert r["detected"] is True
    assert r["culprit_killed"] is True
    assert r["innocent_killed"] == 0
    assert r["service_survived"] is True and r["cache_survived"] is True
    assert r["victim"] == "hog"
    assert r["oom_kills"] == 0  # the kernel never had to step in
    assert {"detect_ms", "repair_ms", "max_progress_gap_ms"} <= r.keys()
    [inc] = [i for i in load_incidents(tmp_path) if i.rule == "memory-hog"]
    largest = inc.diagnosis.evidence["largest"]
    assert largest["comm"] == "bd-cache" and inc.diagnosis.culprits[0].comm == "bd-memhog"
    assert r["hog_processes_left"] == 0
    no_leftovers(name)


def test_a_memory_hog_that_grows_by_forking_is_killed_with_its_children(root, unique, tmp_path):
    """Found from outside: a hog whose children each allocate and hold (none grows for
    long) had no culprit; the node filled and the kernel's OOM killer took the service.
    Now the family that grows is found, head first: the forker and every child."""
    family = _whole_hog_killed(unique, tmp_path, "family", forks=True)
    assert family["members"] >= 3, family


def test_a_memory_hog_spread_over_slow_orphans_is_killed_all_of_it(root, unique, tmp_path):
    """Found from outside: ~60 double-forked, setsid orphans each growing 0.7 MB/s (none a
    hog alone, no family) had no culprit; the node filled and the kernel's OOM killer took
    the service. Now the growing processes of one kind are the culprit, with their spawner."""
    kin = _whole_hog_killed(unique, tmp_path, "kin", spread=True, timeout_s=60)
    assert kin["growing"] >= 4, kin


def test_a_memory_hog_spread_by_a_spawner_slow_to_start_is_killed_with_it(root, unique, tmp_path):
    """Found in a stressed run: a spawner that started its first orphan more than
    `kin_gap_s` after its own start (there, slow imports) was not their kin, and lived.
    It reaps the middle child of each double fork, which the agent's table shows."""
    kin = _whole_hog_killed(unique, tmp_path, "kin", spread=True, after_s=3.0, timeout_s=60)
    assert kin["growing"] >= 4, kin


def test_a_memory_hog_that_registers_a_box_beside_the_service_is_killed(root, unique, tmp_path):
    """Found from outside: a hog that registered a Sensor Box counted as the node's
    service, so it was spared and its incident ended unresolved. The service is the
    first registrant; a process registering beside it is not, and its hog is killed."""
    name = f"t{unique}"
    r = repair.memory_hog(name=name, incidents_dir=str(tmp_path), register=True)
    assert r["hog_registered"] is True, r
    assert r["detected"] is True and r["culprit_killed"] is True, r
    assert r["hog_survived"] is False and r["service_survived"] is True, r
    assert r["cache_survived"] is True and r["innocent_killed"] == 0 and r["oom_kills"] == 0, r
    [inc] = [i for i in load_incidents(tmp_path) if i.rule == "memory-hog"]
    assert [c.comm for c in inc.diagnosis.culprits] == ["bd-memhog"], inc.diagnosis
    no_leftovers(name)


def _whole_hog_killed(unique: str, tmp_path, found: str, **kw) -> dict:
    """Run the memory-hog scenario (`kw`); check that every hog process was killed and
    nothing else, the kernel never stepping in; the diagnosis's `found` evidence."""
    name = f"t{unique}"
    r = repair.memory_hog(name=name, incidents_dir=str(tmp_path), **kw)
    assert r["detected"] is True and r["culprit_killed"] is True, r
    assert r["hog_survived"] is False and r["hog_processes_left"] == 0, r
    assert r["service_survived"] is True and r["cache_survived"] is True, r
    assert r["innocent_killed"] == 0 and r["oom_kills"] == 0, r
    [inc] = [i for i in load_incidents(tmp_path) if i.rule == "memory-hog"]
    assert inc.diagnosis.evidence[found]["comm"] == "bd-memhog", inc.diagnosis.evidence
    assert {c.comm for c in inc.diagnosis.culprits} == {"bd-memhog"}
    no_leftovers(name)
    return inc.diagnosis.evidence[found]


def test_a_fork_bomb_that_registers_a_box_beside_the_service_is_killed(root, unique, tmp_path):
    """A bomb whose first process registered a Sensor Box (as the service does) before it
    began to fork: that process is not the node's service, so it is not spared as the
    bomb's protected ancestor; the whole bomb goes."""
    name = f"t{unique}"
    r = repair.fork_bomb(name=name, incidents_dir=str(tmp_path), register=True)
    assert r["bomb_registered"] is True, r
    assert r["detected"] is True and r["bomb_processes_left"] == 0, r
    assert r["service_survived"] is True and r["probe_survived"] is True, r
    assert r["init_survived"] is True and r["node_thawed"] is True, r
    no_leftovers(name)


@pytest.mark.parametrize("shape", ["tree", "orphans"])
def test_fork_bomb_is_frozen_killed_and_the_node_forks_again(root, unique, tmp_path, shape):
    """"orphans": a bomb that double-forks, so each of its processes is orphaned to the
    node's init at once and none descends from another; its kind finds them."""
    name = f"t{unique}"
    r = repair.fork_bomb(name=name, incidents_dir=str(tmp_path), shape=shape)
    json.dumps(r)
    assert r["detected"] is True
    assert r["bomb_processes_left"] == 0
    assert r["service_survived"] is True
    assert r["probe_survived"] is True and r["init_survived"] is True, r  # old innocents spared
    assert r["node_thawed"] is True
    assert r["can_fork_after"] is True
    [inc] = [i for i in load_incidents(tmp_path) if i.rule == "fork-bomb"]
    [action] = inc.actions
    assert action.kind == "lock_kill_lineage" and action.status == "done"
    assert action.detail["survivors"] == [] and action.detail["killed"] > 50
    # born since onset: the bomb, and at most a child the probe forked that very moment
    # (it exits at once; the probe itself is spared, asserted above)
    comms = inc.diagnosis.evidence["lineage"]["comms"]
    assert set(comms) <= {"bd-forkbomb", "bd-forkprobe"} and comms.get("bd-forkprobe", 0) <= 1
    assert comms["bd-forkbomb"] > 50
    no_leftovers(name)


@pytest.mark.parametrize("shape", ["threads", "spawner", "sessions", "zombies"])
def test_a_process_turning_into_a_bomb_is_killed_and_the_node_forks_again(
        root, unique, tmp_path, shape):
    """Bombs of a process that ran 3 s before it began (older than the onset), found
    from outside: "threads" starts threads (no process is born, so no lineage by age:
    it is the process that started most of the node's tasks since); "spawner" starts
    `sleep` processes (its young children run another program, in its process group);
    "sessions" gives each a session of its own, as a reaper's orphans have: spared at
    first, the retry takes it, with as many young children again; "zombies" does not
    reap them either: once they are killed it holds the node's pids as zombies, and the
    next round takes it. Before, the repair killed nothing (threads), or the sleeps again
    and again while the spawner refilled the node: the node stayed wedged."""
    name = f"t{unique}"
    r = repair.fork_bomb(name=name, incidents_dir=str(tmp_path), shape=shape)
    assert r["detected"] is True
    assert r["bomb_processes_left"] == 0
    assert r["service_survived"] is True
    assert r["probe_survived"] is True and r["init_survived"] is True, r
    assert r["node_thawed"] is True and r["can_fork_after"] is True
    [inc] = [i for i in load_incidents(tmp_path) if i.rule == "fork-bomb"]
    assert len(inc.actions) == (2 if shape == "sessions" else 1), inc.actions
    action = inc.actions[-1]
    assert action.kind == "lock_kill_lineage" and action.status == "done", action
    lineage = inc.diagnosis.evidence["lineage"]
    comms = lineage["comms"]
    if shape == "zombies":  # the sleeps first; the spawner in the next round
        assert set(comms) <= {"bd-forkprobe", "sleep"} and comms["sleep"] > 50
        assert len(action.detail["rounds"]) == 2, action.detail
        assert "then 1 that held their zombies (bd-forkbomb)" in inc.diagnosis.summary
        assert inc.diagnosis.culprits[0].comm == "bd-forkbomb"
        return no_leftovers(name)
    assert comms["bd-forkbomb"] == 1 and comms.get("bd-forkprobe", 0) <= 1, comms
    if shape == "threads":
        assert set(comms) <= {"bd-forkbomb", "bd-forkprobe"} and lineage["holding"] == 1
        assert lineage["holders"][0]["comm"] == "bd-forkbomb"
        assert lineage["holders"][0]["young_threads"] > 50
    else:  # the sessions' retry: the spawner and the sleeps it started since
        assert set(comms) <= {"bd-forkbomb", "bd-forkprobe", "sleep"} and comms["sleep"] >= 3
    no_leftovers(name)


@pytest.mark.parametrize("mode, scope", [("stall", "process"), ("freeze", "node"),
                                         ("cgroup-freeze", "node")])
def test_hang_is_detected_and_diagnosed(root, unique, mode, scope):
    name = f"t{unique}"
    r = repair.hang(name=name, mode=mode)
    json.dumps(r)
    assert r["detected"] is True
    assert r["scope"] == scope
    assert r["diagnosis"]
    assert r["deadline_ms"] == 200 and r["poll_ms"] == 50
    assert r["actions"] == ["record:done"]
    if mode == "stall":
        assert r["stuck"][0]["state"] == "S" and "stopped progressing" in r["diagnosis"]
    if mode == "freeze":
        assert r["stuck"][0]["state"] == "T"
    no_leftovers(name)


def test_hang_refresh_restarts_the_service(root, unique):
    name = f"t{unique}"
    r = repair.hang(name=name, refresh=True)
    assert r["detected"] is True
    assert r["actions"] == ["refresh:done"]
    assert r["service_restarted"] is True
    no_leftovers(name)


def test_a_failing_scenario_still_tears_its_lab_down(root, unique, monkeypatch):
    name = f"t{unique}"

    def boom(*a, **kw):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(repair, "ProgressWatch", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        repair.memory_hog(name=name)
    no_leftovers(name)
