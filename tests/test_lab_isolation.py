"""Lab nodes are real containers: what a node's root cannot do, through `backdoors lab exec`.

One lab (one host with its agent, two nodes with their sample services). Every probe runs
inside node n0 as its root (`lab exec --root`) or as its services' uid, the way a user pokes
at a node; the agent must keep answering throughout.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from backdoors.lab import Lab
from backdoors.lab import topology
from backdoors.nodes import Cgroup, detect

pytestmark = pytest.mark.root

PY = sys.executable


@pytest.fixture(scope="module")
def lab():
    with Lab("i" + uuid.uuid4().hex[:6], hosts=1, nodes=2, agents=True) as lab:
        yield lab


def lab_exec(lab, *cmd, root=True, node="n0", input=None):
    argv = [PY, "-m", "backdoors", "lab", "exec", node, "--name", lab.name,
            *(["--root"] if root else []), "--", *cmd]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, input=input)


def probe(lab, code, *args, root=True):
    """Python `code` run in n0 (argv[1:] are `args` as JSON); its JSON output."""
    r = lab_exec(lab, PY, "-c", code, *(json.dumps(a) for a in args), root=root)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def agent_answers(lab) -> bool:
    with lab.agent_client("h0", timeout=5.0) as c:
        return c.ping().host == "h0"


def test_exec_runs_as_the_services_run_and_passes_the_exit_status(lab):
    r = lab_exec(lab, "id", "-u", root=False)
    assert r.returncode == 0 and r.stdout.strip() == "1000", r.stderr
    r = lab_exec(lab, "id", "-u")
    assert r.returncode == 0 and r.stdout.strip() == "0"
    assert lab_exec(lab, "cat", "/proc/1/comm").stdout.strip() == "catatonit"
    assert lab_exec(lab, "hostname").stdout.strip() == "n0"
    assert lab_exec(lab, "sh", "-c", "exit 7").returncode == 7
    assert lab_exec(lab, "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM
    assert lab_exec(lab, "cat", input="through stdin").stdout == "through stdin"
    # in the node's cgroup and netns: its own address, the service port
    r = lab_exec(lab, "cat", "/proc/self/cgroup")
    assert r.returncode == 0 and all(line.endswith(":/") for line in r.stdout.split())
    node_ns = os.readlink(f"/proc/{lab.service('n0').pid}/ns/net")
    r = probe(lab, "import os; print(__import__('json').dumps(os.readlink('/proc/self/ns/net')))")
    assert r == node_ns


def test_only_the_nodes_own_run_directory_is_there(lab):
    r = lab_exec(lab, "ls", "-A", "/run/backdoors")
    assert r.returncode == 0 and r.stdout.split() == [lab.name]
    r = lab_exec(lab, "ls", "-A", f"/run/backdoors/{lab.name}", f"/run/backdoors/{lab.name}/nodes")
    assert r.stdout.split() == [f"/run/backdoors/{lab.name}:", "nodes",
                                f"/run/backdoors/{lab.name}/nodes:", "n0"]
    assert "agent.sock" in lab_exec(lab, "ls", f"/run/backdoors/{lab.name}/nodes/n0").stdout
    keys = topology.RUN_ROOT / lab.name / "keys" / "m1.key"
    assert keys.exists()  # on the host; not in the node
    assert lab_exec(lab, "cat", str(keys)).returncode != 0
    assert lab_exec(lab, "ls", f"/run/backdoors/{lab.name}/nodes/n1").returncode != 0
    # the hidden paths cannot be uncovered
    assert lab_exec(lab, "umount", "/run/backdoors").returncode != 0
    assert lab_exec(lab, "ls", f"/run/backdoors/{lab.name}/nodes/n1").returncode != 0


SIGNAL_AGENT = """
import json, os, signal, sys
pid = json.loads(sys.argv[1])
out = {"visible": os.path.exists(f"/proc/{pid}")}
for name, sig in (("stop", signal.SIGSTOP), ("kill", signal.SIGKILL)):
    try:
        os.kill(pid, sig)
        out[name] = "sent"
    except OSError as e:
        out[name] = e.errno
try:
    open(f"/proc/{pid}/mem", "rb").read(1)
    out["mem"] = "read"
except OSError as e:
    out["mem"] = e.errno
print(json.dumps(out))
"""

WRITE_FILES = """
import json, sys
out = {}
for path, value in json.loads(sys.argv[1]):
    try:
        with open(path, "w") as f:
            f.write(value)
        out[path] = "written"
    except OSError as e:
        out[path] = e.strerror
print(json.dumps(out))
"""


def test_the_nodes_root_cannot_see_signal_or_read_the_agent(lab):
    agent = lab.agent_pid("h0")
    import errno
    out = probe(lab, SIGNAL_AGENT, agent)
    assert out == {"visible": False, "stop": errno.ESRCH, "kill": errno.ESRCH,
                   "mem": errno.ENOENT}
    # every process it can see: its own node only; the agent keeps answering
    assert lab_exec(lab, "kill", "-STOP", "-1").returncode in (0, 1)
    assert agent_answers(lab)
    assert lab_exec(lab, "kill", "-CONT", "-1").returncode in (0, 1)
    assert lab_exec(lab, "kill", "-KILL", "1").returncode in (0, 1)
    assert lab_exec(lab, "cat", "/proc/1/comm").stdout.strip() == "catatonit"
    assert agent_answers(lab)


def test_the_nodes_root_cannot_write_the_agents_or_another_nodes_cgroup(lab):
    layout = detect()
    agent_cg = Cgroup(lab.plan.host("h0").agent_cgroup, layout)
    other_cg = Cgroup(lab.plan.node("n1").cgroup, layout)
    assert lab.agent_pid("h0") in agent_cg.procs()
    writes = []
    for cg in (agent_cg, other_cg):
        for path in cg.paths.values():
            for name, value in (("cgroup.procs", "1"), ("freezer.state", "FROZEN"),
                                ("cgroup.freeze", "1"), ("pids.max", "1")):
                if (path / name).exists():
                    writes.append([str(path / name), value])
    assert len(writes) >= 4
    out = probe(lab, WRITE_FILES, writes)
    assert out and all(v != "written" for v in out.values()), out
    assert not agent_cg.freeze_requested() and agent_answers(lab)


ORPHAN = """
import json, os, time
r, w = os.pipe()
if os.fork() == 0:            # the parent that will be killed
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 1)          # the output pipe ends with the first process, not these
    os.dup2(null, 2)
    if os.fork() == 0:        # its child, orphaned then
        os.close(r)
        os.write(w, str(os.getpid()).encode())
        time.sleep(300)
    time.sleep(300)
os.close(w)
print(json.dumps({"orphan": int(os.read(r, 32))}), flush=True)
"""


def test_an_orphan_is_reaped_by_the_nodes_pid_1(lab):
    box = lab.container("n0")
    ns_orphan = probe(lab, ORPHAN, root=False)["orphan"]
    host = box.host_pid(ns_orphan)
    assert host is not None
    ppid_host = int(_status(host)["PPid"])
    os.kill(ppid_host, signal.SIGKILL)  # the parent dies: PID 1 adopts the child

    def adopted() -> bool:
        return int(_status(host)["PPid"]) == box.init_pid

    assert wait(adopted), _status(host)
    os.kill(host, signal.SIGKILL)
    assert wait(lambda: not os.path.exists(f"/proc/{host}")), "left as a zombie"
    assert agent_answers(lab)


def test_a_node_whose_cgroup_was_killed_gets_a_new_container(lab):
    old = lab.container("n1")
    lab.node("n1").kill_all()
    assert wait(lambda: not old.alive())
    r = lab_exec(lab, "cat", "/proc/1/comm", node="n1")
    assert r.returncode == 0 and r.stdout.strip() == "catatonit", r.stderr
    lab.start_service("n1")
    assert lab.container("n1").init_pid != old.init_pid


def _status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def wait(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_the_agent_serves_a_services_box_with_its_host_pid(lab):
    from backdoors.sensors import parse_box

    svc = lab.service("n0")
    assert svc.ns_pid is not None and svc.ns_pid != svc.pid
    assert lab.sensors("n0").owner_pid == svc.ns_pid  # what the service wrote, in its node
    with lab.agent_client("h0", timeout=5.0) as c:
        assert wait(lambda: "svc-n0" in c.sensors("n0").boxes)
        assert parse_box(c.sensors("n0").boxes["svc-n0"]).owner_pid == svc.pid


SQUAT = """
import json, os, socket, sys, time
path = json.loads(sys.argv[1])
os.unlink(path)
if json.loads(sys.argv[2]) == "listener":   # a live listener of the node's own, kept open
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    print(json.dumps("listening"), flush=True)
    time.sleep(300)
else:                                       # a directory with something in it
    os.mkdir(path)
    open(os.path.join(path, "x"), "w").close()
    print(json.dumps("planted"), flush=True)
"""


@pytest.mark.parametrize("trap", ["directory", "listener"])
def test_what_a_node_plants_at_its_socket_path_does_not_keep_the_agent_from_restarting(lab, trap):
    """The node owns its run directory: it may replace agent.sock by anything. The agent's
    next start (a crash, the watchdog, an upgrade) must still serve every node."""
    path = str(lab.node_run_dir("n0") / "agent.sock")
    squatter = lab.run_in_node("n0", [PY, "-c", SQUAT, json.dumps(path), json.dumps(trap)],
                               root=True, stdout=subprocess.PIPE)
    try:
        assert squatter.stdout.readline().strip() in (b'"planted"', b'"listening"')
        before = lab.agent_pid("h0")
        os.kill(before, signal.SIGKILL)  # its keeper starts it again
        assert wait(lambda: lab.agent_pid("h0") not in (None, before) and _answers(lab), 30), \
            (lab.plan.run_dir / "agent-h0.log").read_text()[-2000:]
        # and n0 can register again: the path is the agent's socket once more
        r = lab_exec(lab, PY, "-c", "import socket,sys; s = socket.socket(socket.AF_UNIX); "
                     "s.connect(sys.argv[1]); print(s.getpeername())", path, root=False)
        assert r.returncode == 0, r.stderr
    finally:
        squatter.kill()
        squatter.wait()


def _answers(lab) -> bool:
    try:
        return agent_answers(lab)
    except Exception:  # noqa: BLE001 - not serving yet
        return False


PTYS = """
import json, os
fds, why = [], None
for _ in range(400):
    try:
        fds.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
    except OSError as e:
        why = e.strerror
        break
print(json.dumps({"opened": len(fds), "then": why, "pts": sorted(os.listdir("/dev/pts"))}))
"""


def test_the_nodes_ptys_are_its_own_and_bounded(lab):
    """/dev/ptmx of the host's devpts would let a node take every pty of the machine
    (kernel.pty.max is global): a node has a devpts instance of its own, capped."""
    from backdoors.nodes.container import Isolation
    cap = Isolation(uid_base=1 << 30).ptys
    out = probe(lab, PTYS)
    assert out["opened"] == cap and out["then"], out
    # none of the host's ptys is listed in the node; only its own and its ptmx
    assert set(out["pts"]) <= {"ptmx", *map(str, range(cap))}, out


SOCKET_BUFFERS = """
import json, socket, sys
lsn = socket.socket(); lsn.bind(("127.0.0.1", 0)); lsn.listen(8)
pairs, queued = [], 0
for _ in range(4):
    c = socket.create_connection(lsn.getsockname()); a, _ = lsn.accept()
    c.setblocking(False)
    try:
        while queued < (24 << 20):
            queued += c.send(b"x" * 65536)
    except BlockingIOError:
        pass
    pairs.append((c, a))
print(json.dumps(queued), flush=True)
sys.stdin.readline()
"""


def test_the_nodes_socket_buffers_are_charged_to_its_memory(lab):
    """TCP buffers are kernel memory from one global pool (net.ipv4.tcp_mem): uncharged,
    a node could queue gigabytes beyond its memory limit and starve every TCP socket of the
    host (the agent's, the other nodes' sessions). They count against the node's cgroup."""
    cg = lab.node("n0").cgroup
    before = cg.socket_memory()
    proc = lab.run_in_node("n0", [PY, "-c", SOCKET_BUFFERS], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
    try:
        queued = json.loads(proc.stdout.readline())
        assert queued >= 8 << 20, queued
        assert cg.socket_memory() - before >= queued // 2, (before, cg.socket_memory(), queued)
    finally:
        proc.stdin.close()
        proc.wait(10)


INOTIFY = """
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
try:  # the node's own user namespace's limit: its root may raise it
    with open("/proc/sys/user/max_inotify_instances", "w") as f:
        f.write("100000")
    raised = True
except OSError:
    raised = False
fds = []
while len(fds) < 1000:
    fd = libc.inotify_init()
    if fd < 0:
        break
    fds.append(fd)
print(json.dumps({"raised": raised, "opened": len(fds), "errno": ctypes.get_errno()}))
"""


def test_what_a_node_creates_is_charged_to_its_own_uid_not_to_host_root(lab):
    """Per-user kernel budgets (inotify instances: 128, fanotify groups, namespaces, POSIX
    message queue bytes) of a user namespace are also charged, in the parent, to its
    owner's uid: owned by host root, a node could use up host root's (every root daemon's)
    inotify instances. The node's user namespace is owned by its own unprivileged uid."""
    import fcntl
    import struct
    NS_GET_OWNER_UID = 0xB704
    fd = os.open(f"/proc/{lab.container('n0').init_pid}/ns/user", os.O_RDONLY)
    try:
        owner = struct.unpack("I", fcntl.ioctl(fd, NS_GET_OWNER_UID, b"\0" * 4))[0]
    finally:
        os.close(fd)
    assert owner == lab.isolation("n0").uid_base, owner
    out = probe(lab, INOTIFY)  # its own limit raised, it still stops at its owner's budget
    with open("/proc/sys/fs/inotify/max_user_instances") as f:
        assert out["raised"] and out["opened"] <= int(f.read()), out


def test_the_hosts_environment_does_not_leak_into_a_node(lab, monkeypatch):
    """What the lab's owner has in its environment (a CI token, a cloud key) is not the
    node's: programs in a node get the few variables they need, and the agent's socket."""
    monkeypatch.setenv("RT_CLOUD_TOKEN", "s3cr3t")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    for env in (probe(lab, code, root=False),  # `lab exec`, from the owner's shell
                json.loads(lab.run_in_node("n0", [PY, "-c", code], stdout=subprocess.PIPE)
                           .communicate(timeout=30)[0])):
        assert "RT_CLOUD_TOKEN" not in env, sorted(env)
        assert env["PATH"] == os.environ["PATH"] and env["LC_ALL"] == "C.UTF-8"
        assert env["BACKDOORS_AGENT_SOCKET"].endswith("/nodes/n0/agent.sock")
