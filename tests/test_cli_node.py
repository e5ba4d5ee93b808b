"""`backdoors node ...`: create|run|delete hand-made nodes on this machine's cgroup layout
(real cgroups, netns, veth, bridge), and unfence|kill a node of a running lab through its
agent. Also the agent's error for a process outside its node, and the fork-bomb repair's
"repaired" only once the node can fork again (zombies are counted until reaped).

The host side of a node's veth lives in a test namespace standing for the host (the
command runs there under nsenter), so the machine's own network is never touched. Every
name starts with bdt-<unique>, and whatever a test leaves is reaped by that prefix.
"""

import os
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from types import SimpleNamespace

import msgspec
import pytest

from backdoors import net, provision
from backdoors.agent.config import NodeSpec
from backdoors.agent.isolation import check_node, self_cgroup_relpaths
from backdoors.errors import NetError
from backdoors.agent.membership import misplaced, outside_message, read_cgroups
from backdoors.lab import Lab
from backdoors.monitor.actions import fork_room
from backdoors.nodes import Node, detect, reap

pytestmark = pytest.mark.root


def cli(*args, host_ns=None):
    pre = ["nsenter", f"--net=/run/netns/{host_ns}"] if host_ns else []
    return subprocess.run([*pre, sys.executable, "-m", "backdoors", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def names(root, unique):
    """Names for one node, and a namespace with a bridge standing for the host's network;
    everything under the bdt-<unique> prefix is reaped afterwards."""
    p = f"bdt-{unique}"
    n = SimpleNamespace(node=f"bdt{unique}", cgroup=f"{p}/web0", netns=f"{p}-w",
                        host=f"{p}-h", bridge="br-svc", prefix=p)
    net.netns.create(n.host)
    net.add_bridge(n.host, n.bridge)
    try:
        yield n
    finally:
        provision.record_path(n.node).unlink(missing_ok=True)
        reap(p)
        net.netns.reap(p)


def in_every_hierarchy(pid: int, relpath: str) -> bool:
    return misplaced(detect(), read_cgroups(pid), relpath) is None


def wait_for(check, what: str, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_create_run_delete_on_this_hosts_layout(names):
    layout = detect()
    r = cli("node", "create", names.node, "--cgroup", names.cgroup, "--memory", "256M",
            "--pids", "64", "--netns", names.netns, "--address", "10.20.0.10/24",
            "--address", "10.20.0.100/24", "--bridge", names.bridge, "--gateway", "10.20.0.1",
            host_ns=names.host)
    assert r.returncode == 0, r.stderr
    assert "not a container" in r.stderr and "--user" in r.stderr
    # a directory in every hierarchy of this machine's layout, with the limits
    for mount in layout.hierarchies().values():
        assert (mount / names.cgroup).is_dir(), mount
    node = Node.open(names.node, names.cgroup, netns=names.netns)
    assert node.cgroup.memory_limit() == 256 << 20 and node.cgroup.pids_limit() == 64
    assert net.link_info(names.host, f"{names.node}-h").master == names.bridge
    assert set(net.addresses(names.netns, "eth0")) >= {"10.20.0.10/24", "10.20.0.100/24"}
    # stdout is the agent's entry for it, and the agent's checks accept the node
    spec = msgspec.convert(tomllib.loads(r.stdout)["agent"]["nodes"][0], NodeSpec)
    assert (spec.name, spec.cgroup, spec.netns, spec.isolation) == \
        (names.node, names.cgroup, names.netns, "checked")

    # run: every hierarchy, the netns, the user; the exit status is the command's
    r = cli("node", "run", names.node, "--user", "nobody", "--", "sh", "-c",
            "id -u; readlink /proc/self/ns/net; exit 7")
    assert r.returncode == 7, r.stderr
    uid, ns = r.stdout.split()
    assert uid == "65534" and ns == f"net:[{os.stat(f'/run/netns/{names.netns}').st_ino}]"
    service = subprocess.Popen([sys.executable, "-m", "backdoors", "node", "run", names.node,
                                "--user", "nobody", "--init", "--", "sleep", "600"])
    try:
        pids = wait_for(lambda: [p.pid for p in node.processes() if p.comm == "sleep"],
                        "the service in the node")
        assert in_every_hierarchy(pids[0], names.cgroup)
        opened = Node.open(spec.name, spec.cgroup, netns=spec.netns)
        assert check_node(opened, agent_cgroups=self_cgroup_relpaths(), agent_netns=None) == []

        # delete: kills what is left; no cgroup, netns, veth or record stays
        r = cli("node", "delete", names.node, host_ns=names.host)
        assert r.returncode == 0, r.stderr
        assert "processes killed" in r.stderr
        assert service.wait(10) == 128 + signal.SIGKILL  # its command was killed
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    for mount in layout.hierarchies().values():
        assert not (mount / names.prefix).exists(), mount
    assert not net.netns.exists(names.netns)
    with pytest.raises(NetError):
        net.link_info(names.host, f"{names.node}-h")
    assert not provision.record_path(names.node).exists()


def test_delete_and_create_refuse_what_they_did_not_make(names):
    Node.create("other", names.cgroup)  # someone else's cgroup
    r = cli("node", "delete", names.node)
    assert r.returncode == 1 and "was not made by `backdoors node create`" in r.stderr
    r = cli("node", "create", names.node, "--cgroup", names.cgroup)
    assert r.returncode == 1 and "exists already" in r.stderr, r.stderr
    assert Node.open("other", names.cgroup).cgroup.exists()  # untouched
    assert not provision.record_path(names.node).exists()


@pytest.mark.parametrize("args, message", [
    (["--address", "10.0.0.1/24"], "need --netns"),
    (["--memory", "lots"], "invalid memory size"),
    (["--netns", "NS", "--bridge", "br-none"], "--bridge br-none"),
    (["--netns", "NS", "--address", "10.0.0.300/24"], "invalid address"),
])
def test_create_refuses_bad_input_and_leaves_nothing(names, args, message):
    args = [a.replace("NS", names.netns) for a in args]
    r = cli("node", "create", names.node, "--cgroup", names.cgroup, *args, host_ns=names.host)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert not provision.record_path(names.node).exists()
    assert not any((m / names.prefix).exists() for m in detect().hierarchies().values())
    assert not net.netns.exists(names.netns)


def test_a_process_outside_its_node_is_told_which_hierarchy_and_the_fix(names):
    layout = detect()
    node = Node.create(names.node, names.cgroup, layout=layout)
    proc = node.run(["sleep", "600"])
    try:
        wrong_hierarchy, mount = next(iter(layout.hierarchies().items()))
        (mount / "cgroup.procs").write_text(str(proc.pid))  # out of the node there only
        wrong = misplaced(layout, read_cgroups(proc.pid), names.cgroup)
        assert wrong == (wrong_hierarchy, "/")
        message = outside_message(proc.pid, names.node, node.cgroup.paths, wrong, names.cgroup)
        assert f"process {proc.pid} is not inside node {names.node}" in message
        assert f"of the {wrong_hierarchy} " in message and f"not '/{names.cgroup}'" in message
        assert f"`backdoors node run {names.node} -- CMD`" in message
        assert f"{mount / names.cgroup}/cgroup.procs" in message
    finally:
        proc.kill()
        proc.wait()


ZOMBIE_MAKER = """
import os, sys, time
for _ in range(int(sys.argv[1])):
    if os.fork() == 0:
        os._exit(0)
print("forked", flush=True)
time.sleep(600)   # never waits: its children stay zombies, charged to pids.current
"""


class NodeReader:
    """What the monitor asks the agent (status, processes), read from the node itself."""

    def __init__(self, node: Node):
        self.node = node

    def status(self, _name):
        return SimpleNamespace(stats=self.node.stats())

    def processes(self, _name):
        return SimpleNamespace(rows=self.node.processes())


@pytest.mark.parametrize("init", [False, True])
def test_repaired_only_once_the_node_can_fork_again(names, init):
    """The zombies of killed processes fill the pids limit until their parent reaps them:
    the repair says so, naming the parent; a reaping init (catatonit) takes them over."""
    limit = 11 + init  # (catatonit +) the zombies' parent + its 10 zombies: full
    r = cli("node", "create", names.node, "--cgroup", names.cgroup, "--pids", str(limit))
    assert r.returncode == 0, r.stderr
    node = Node.open(names.node, names.cgroup)
    reader = NodeReader(node)
    runner = subprocess.Popen(
        [sys.executable, "-m", "backdoors", "node", "run", names.node,
         *(["--init"] if init else []), "--", sys.executable, "-c", ZOMBIE_MAKER, "10"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert runner.stdout.readline().strip() == "forked"
        maker = next(p for p in node.processes() if p.comm.startswith("python"))
        wait_for(lambda: node.cgroup.pids_current() >= limit, "the zombies")
        seen, why = fork_room(reader, names.node, killed=10, timeout=0.2)
        assert seen["pids_after"] == limit and seen["pids_limit"] == limit
        assert why is not None and "10 zombies not reaped" in why, why
        assert "--init" in why and seen["unreaped"] == 10
        if init:  # the repair kills their parent: catatonit inherits the zombies, reaps them
            os.kill(maker.pid, signal.SIGKILL)
            seen, why = fork_room(reader, names.node, killed=1, timeout=5.0)
            assert why is None and seen["pids_after"] < limit, (seen, why)
    finally:
        node.kill_all()
        runner.wait(10)


def test_unfence_and_kill(root):
    name = "t" + uuid.uuid4().hex[:6]
    with Lab(name, hosts=1, nodes=1, agents=True) as lab:
        with lab.agent_client("h0") as c:
            c.call("fence", node="n0")
            info = {i.name: i for i in c.nodes()}["n0"]
            assert info.fenced and not net.link_info(lab.plan.node("n0").netns, "eth0").up
            r = cli("node", "unfence", "n0", "--lab", name)
            assert r.returncode == 0, r.stderr
            info = {i.name: i for i in c.nodes()}["n0"]
            assert not info.fenced and not info.locked_by
            assert net.link_info(lab.plan.node("n0").netns, "eth0").up
            r = cli("node", "kill", "n0", "--lab", name)
            assert r.returncode == 0 and "processes killed" in r.stderr, r.stderr
            assert lab.node("n0").processes() == []
            r = cli("node", "unfence", "n9", "--lab", name)
            assert r.returncode == 1, r.stderr
            assert "no agent serves node 'n9': h0 (" in r.stderr and "serves n0" in r.stderr


def test_kill_names_what_each_agent_said_when_none_serves_the_node(tmp_path):
    """Outside review: every agent's error became "no reachable agent serves node", which
    reads as a typo in the node's name."""
    from backdoors.agent.keys import generate, new_identity

    generate(str(tmp_path / "m1.key"), "m1")
    conf = tmp_path / "monitor.toml"
    conf.write_text('monitor_id = "m1"\nkey_file = "m1.key"\n' + "".join(
        f'[[agents]]\nhost = "h{i}"\naddress = "127.0.0.1:{i + 1}"\n'
        f'public_key = "{new_identity(f"h{i}").public_text()}"\n' for i in range(2)))
    for cmd in ("kill", "unfence"):
        r = cli("node", cmd, "n0", "--config", str(conf))
        assert r.returncode == 1, r.stderr
        assert "no agent serves node 'n0': h0 (127.0.0.1:1): " in r.stderr
        assert "h1 (127.0.0.1:2): " in r.stderr and r.stderr.count("refused") == 2, r.stderr
    r = cli("node", "kill", "n0", "--config", str(conf), "--lab", "x")
    assert r.returncode == 1 and "status:" not in r.stderr
    assert "give a lab (--lab) or a monitor config (--config), not both" in r.stderr


def test_the_printed_config_entry_is_toml_whatever_the_names_hold():
    rec = provision.Record("web0", 'svc/we"b[/]0', netns='ns"1', interface="eth0",
                           addresses=["10.0.0.2"])
    entry = tomllib.loads(provision.stanza(rec).replace("[[agent.nodes]]", "[[nodes]]"))
    assert entry["nodes"][0]["cgroup"] == 'svc/we"b[/]0' and entry["nodes"][0]["netns"] == 'ns"1'


def test_size_parsing():
    assert provision.parse_size("2G") == 2 << 30 and provision.parse_size("512M") == 512 << 20
    assert provision.parse_size("4096") == 4096 and provision.parse_size("1GiB") == 1 << 30
    with pytest.raises(Exception, match="invalid memory size"):
        provision.parse_size("0")
