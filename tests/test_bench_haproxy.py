"""The HAProxy baseline of the recovery benchmark: facts of one small run, not timings."""

import importlib.util
from pathlib import Path

import pytest

from backdoors.lab import topology
from backdoors.net import netns

pytestmark = pytest.mark.root

BENCH = Path(__file__).resolve().parent.parent / "bench" / "haproxy_baseline.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("haproxy_baseline", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def leftovers(lab: str) -> list[str]:
    prefix = topology.prefix(lab)
    found = [f"netns {n}" for n in netns.names(prefix)]
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob(f"*/{prefix}*")]
    if (topology.RUN_ROOT / lab).exists():
        found.append(f"dir {topology.RUN_ROOT / lab}")
    return found


def haproxy_processes(lab: str) -> list[int]:
    """Processes still running the lab's HAProxy configuration."""
    conf = str(topology.RUN_ROOT / lab / "haproxy.cfg").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if conf in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def test_freezing_a_server_breaks_its_pinned_sessions_and_spares_the_others(root):
    bench = load_bench()
    r = bench.run(sessions=4)

    assert r["sessions"] == 4
    pinned = r["haproxy_pinned"]
    assert pinned >= 1, r  # roundrobin over two servers: the frozen one held sessions
    # every session pinned to the frozen server broke; no other did
    assert r["haproxy_broken"] == pinned, r
    assert sum(r["haproxy_broken_by"].values()) == pinned, r
    assert "corrupt" not in r["haproxy_broken_by"], r
    # new connections got the stream again once HAProxy took the server out
    assert isinstance(r["haproxy_resume_ms"], (int, float)), r
    assert r["haproxy_resume_ms"] >= 0, r
    assert isinstance(r["haproxy_detect_ms"], (int, float)), r
    # sessions on the healthy server kept streaming, byte-exact
    assert r["haproxy_ok_sessions"] == r["haproxy_healthy_ok"] == 4 - pinned, r
    assert r["haproxy_false_downs"] == 0, r
    assert r["bytes_verified"] > 0

    assert leftovers(r["lab"]) == []
    assert haproxy_processes(r["lab"]) == []


def test_run_rejects_a_watch_window_shorter_than_the_stall_cutoff():
    bench = load_bench()
    with pytest.raises(ValueError, match="stall cutoff"):
        bench.run(sessions=1, seconds=5.0, stall_cutoff=10.0)
