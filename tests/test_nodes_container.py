"""Nodes as real containers: what a node's root cannot do to the host, and what a service can.

Each test starts a container for node "a" (its cgroup, a netns of its own, run directory
<base>/nodes/a) beside a sibling node "b" (a cgroup and a run directory), with <base> hidden in
the node and an agent-like 0600 key file in it. Probes run inside the node as small Python
programs that print JSON. Everything is removed at the end (cgroups reaped by prefix).
"""

import fcntl
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_nodes_support import prefix, wait_for

from backdoors.errors import NodeError
from backdoors.net import netns as netns_mod
from backdoors.nodes import Node, detect, read_process
from backdoors.nodes.container import (
    Container,
    Isolation,
    python_paths,
    tools_missing,
    uid_base_for,
)

__all__ = ["prefix"]  # the fixture, imported for pytest
pytestmark = pytest.mark.root

PY = sys.executable
F_GET_SEALS = 1034
F_SEAL_WRITE = 0x8


@dataclass
class Setup:
    box: Container
    node: Node
    sibling: Node
    iso: Isolation
    netns: str
    base: Path
    run_dir: Path
    other_run_dir: Path
    keys: Path

    def probe(self, code: str, *args, root: bool = True, timeout: float = 20.0) -> dict:
        """Run Python `code` inside the node (argv[1:] = JSON of `args`); its JSON output."""
        proc = self.box.spawn([PY, "-c", code, *(json.dumps(a) for a in args)], root=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err.decode()
        return json.loads(out)


@pytest.fixture
def setup(prefix):
    if missing := tools_missing():
        from conftest import unavailable

        unavailable(f"containers need {', '.join(missing)} (make system-deps)")
    ns = f"{prefix}-a"
    netns_mod.create(ns)
    base = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/run"))  # /tmp is private in nodes
    os.chmod(base, 0o755)
    run_dir, other = base / "nodes" / "a", base / "nodes" / "b"
    run_dir.mkdir(parents=True)
    other.mkdir(mode=0o700)
    (other / "agent.sock").write_text("b's")
    keys = base / "keys.toml"
    keys.write_text("m1 = 'secret'\n")
    keys.chmod(0o600)
    box = None
    try:
        node = Node.create("a", f"{prefix}/a", netns=ns)
        sibling = Node.create("b", f"{prefix}/b")
        index = int(prefix.rsplit("-", 1)[1], 16) % 4096
        # the home directory is hidden too; this Python is shared back if it lives there
        iso = Isolation(uid_base=uid_base_for(index), hide=(base, Path.home()),
                        share=python_paths(), hostname="a")
        box = Container.start(node.cgroup, ns, iso, run_dir)
        yield Setup(box, node, sibling, iso, ns, base, run_dir, other, keys)
    finally:
        if box is not None:
            box.stop()
        netns_mod.remove(ns)
        shutil.rmtree(base)


@pytest.fixture
def host_sleeper():
    """A host process (standing in for the agent) the node must not reach."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


# -- what the node's root cannot do -----------------------------------------------------

LIST_PIDS = """
import json, os, sys
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
comm = open("/proc/1/comm").read().strip()
print(json.dumps({"pids": pids, "me": os.getpid(), "init": comm}), flush=True)
sys.stdin.read()
"""


def test_root_sees_only_the_nodes_processes(setup):
    proc = setup.box.spawn([PY, "-c", LIST_PIDS], root=True, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
    try:
        seen = json.loads(proc.stdout.readline())
        inside = {p: setup.box.host_pid(p) for p in seen["pids"]}
    finally:
        proc.stdin.close()
        proc.wait()
    assert seen["init"] == "catatonit" and seen["pids"][0] == 1
    assert inside[1] == setup.box.init_pid and inside[seen["me"]] == proc.pid
    assert all(inside.values()), f"pids seen inside that are not the node's: {inside}"
    assert os.getpid() not in inside.values()


SIGNAL_HOST = """
import json, os, signal, sys
host = json.loads(sys.argv[1])
out = {}
try:
    os.kill(host, signal.SIGSTOP)
    out["stop_host"] = "sent"
except OSError as e:
    out["stop_host"] = e.errno
for target in (1, -1):
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        try:
            os.kill(target, sig)
        except OSError as e:
            pass
print(json.dumps(out))
"""


def test_root_cannot_signal_host_processes(setup, host_sleeper):
    out = setup.probe(SIGNAL_HOST, host_sleeper)
    assert out["stop_host"] != "sent"
    assert read_process(host_sleeper).state != "T"
    # kill -STOP -1 and -KILL 1 from inside left the node's PID 1 and the container alive
    assert setup.box.alive()
    assert setup.probe("import json; print(json.dumps(1))") == 1


WRITE_FILES = """
import json, sys
out = {}
for path in json.loads(sys.argv[1]):
    try:
        with open(path, "w") as f:
            f.write("FROZEN" if path.endswith("freezer.state") else "1")
        out[path] = "written"
    except OSError as e:
        out[path] = e.strerror
print(json.dumps(out))
"""


READ_CGROUP_FILES = """
import json, sys
out = {}
for path in json.loads(sys.argv[1]):
    try:
        with open(path) as f:
            out[path] = "read" if f.read() else "empty"
    except OSError as e:
        out[path] = e.strerror
print(json.dumps(out))
"""


def test_root_reads_only_its_own_cgroup_files(setup):
    """The host's cgroupfs is hidden, but for the node's own cgroup (read-only): another
    node's files (its limits, its pressure, which a tight loop of reads would blind) are
    not there, the node's own are."""
    theirs = [p / f for p in setup.sibling.cgroup.paths.values()
              for f in ("cgroup.procs", "memory.pressure", "cpu.pressure", "pids.max")
              if (p / f).exists()]
    own = [p / f for p in setup.node.cgroup.paths.values()
           for f in ("cgroup.procs", "cpu.pressure", "pids.current") if (p / f).exists()]
    out = setup.probe(READ_CGROUP_FILES, [str(p) for p in theirs + own])
    assert len(theirs) >= 3 and len(own) >= 3
    assert {out[str(p)] for p in theirs} == {"No such file or directory"}, out
    assert {out[str(p)] for p in own} == {"read"}, out
    made = setup.probe(WRITE_FILES, [str(own[0].parent / "pids.max")])
    assert set(made.values()) != {"written"}, made


def test_the_cgroupfs_is_covered_whole_only_where_it_is_a_file_system_of_its_own():
    from backdoors.nodes.container import _cgroup_roots
    from backdoors.nodes.hierarchies import Layout
    assert _cgroup_roots(detect()) == (Path("/sys/fs/cgroup"),)  # this host's (either layout)
    # hierarchies in folders of the root file system: each is covered, never their parent
    scattered = Layout(v1={"memory": Path("/cgroup-memory"), "pids": Path("/srv/pids")})
    assert _cgroup_roots(scattered) == (Path("/cgroup-memory"), Path("/srv/pids"))


def test_root_cannot_write_cgroupfs(setup):
    node, sibling = setup.node.cgroup, setup.sibling.cgroup
    targets = []
    for name, path in sibling.paths.items():
        targets += [path / "cgroup.procs", path / "tasks"]
        if name == "freezer":
            targets.append(path / "freezer.state")
        if name == "pids":
            targets.append(path / "pids.max")
        if name == "unified":
            targets += [path / "cgroup.freeze", path / "cgroup.kill"]
    for name, path in node.paths.items():
        targets.append(path.parent / "cgroup.procs")  # moving itself out of the node
        if name == "pids":
            targets.append(path / "pids.max")  # raising its own limit
        if name == "memory":
            targets.append(path / "memory.limit_in_bytes")
    targets = [str(t) for t in targets if t.exists()]
    out = setup.probe(WRITE_FILES, targets)
    assert len(out) == len(targets) >= 6
    assert {k: v for k, v in out.items() if v == "written"} == {}
    assert not sibling.is_frozen() and sibling.pids_limit() is None
    assert setup.node.cgroup.pids_limit() is None


READ_MEMORY = """
import ctypes, json, os, sys
host = json.loads(sys.argv[1])
out = {}
for name in ("mem", "environ", "maps"):
    try:
        open(f"/proc/{host}/{name}", "rb").read(16)
        out[name] = "read"
    except OSError as e:
        out[name] = e.strerror

class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

libc = ctypes.CDLL(None, use_errno=True)
buf = ctypes.create_string_buffer(64)
local, remote = IoVec(ctypes.addressof(buf), 64), IoVec(0x400000, 64)
n = libc.process_vm_readv(host, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
out["process_vm_readv"] = "read" if n >= 0 else os.strerror(ctypes.get_errno())
print(json.dumps(out))
"""


def test_root_cannot_read_host_process_memory(setup, host_sleeper):
    out = setup.probe(READ_MEMORY, host_sleeper)
    assert "read" not in out.values(), out


READ_FILES = """
import ctypes, json, os, sys
out = {}
for path in json.loads(sys.argv[1]):
    try:
        out[path] = os.listdir(path) if os.path.isdir(path) else open(path).read()
    except OSError as e:
        out[path] = e.strerror
libc = ctypes.CDLL(None, use_errno=True)
hidden = json.loads(sys.argv[2]).encode()
out["umount"] = "unmounted" if libc.umount2(hidden, 2) == 0 else os.strerror(ctypes.get_errno())
print(json.dumps(out))
"""


def test_root_cannot_read_host_secrets(setup):
    outside = Path(tempfile.mkdtemp(prefix="bdt-key-", dir="/run"))  # not a private tmpfs there
    try:
        key = outside / "agent.key"
        key.write_text("secret")
        key.chmod(0o600)
        paths = [str(key), str(setup.keys), str(setup.other_run_dir),
                 str(setup.other_run_dir / "agent.sock"), str(setup.base)]
        out = setup.probe(READ_FILES, paths, str(setup.base))
    finally:
        shutil.rmtree(outside)
    assert out[str(key)] == "Permission denied"  # a 0600 root file: DAC, no override
    for hidden in paths[1:4]:  # under the hidden base: not there at all
        assert out[hidden] == "No such file or directory"
    assert out[str(setup.base)] == ["nodes"]  # only the path to its own run dir
    assert out["umount"] != "unmounted"  # the hiding mount is locked


# -- what a service can do ----------------------------------------------------------------

REGISTER = """
import json, os, socket, sys, fcntl
run_dir = json.loads(sys.argv[1])
with open(os.path.join(run_dir, "written-by-node"), "w") as f:
    f.write("hi")
fd = os.memfd_create("region", os.MFD_ALLOW_SEALING)
os.write(fd, b"sensor box")
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
            | fcntl.F_SEAL_SEAL)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.path.join(run_dir, "agent.sock"))
socket.send_fds(s, [json.dumps({"ns_pid": os.getpid(), "uid": os.getuid()}).encode()], [fd])
print(json.dumps(s.recv(10).decode()))
"""


def test_service_registers_a_memfd_through_its_run_dir(setup):
    path = setup.run_dir / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o666)  # as the agent does
    listener.listen(1)
    listener.settimeout(20)
    proc = setup.box.spawn([PY, "-c", REGISTER, json.dumps(str(setup.run_dir))],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        conn, _ = listener.accept()
        with conn:
            msg, fds, _, _ = socket.recv_fds(conn, 1024, 1)
            pid, uid, _ = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            hello = json.loads(msg)
            mapped = setup.box.host_pid(hello["ns_pid"])  # while it waits for the reply
            in_node = pid in setup.node.cgroup.procs()
            conn.sendall(b"ok")
        out, err = proc.communicate(timeout=20)
    finally:
        listener.close()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == "ok"
    assert hello["uid"] == setup.iso.uid  # the service's uid inside the node
    assert uid == setup.iso.host_uid(setup.iso.uid)  # ... an unprivileged one outside
    assert pid == proc.pid == mapped and in_node
    (fd,) = fds
    try:
        assert fcntl.fcntl(fd, F_GET_SEALS) & F_SEAL_WRITE
        assert os.pread(fd, 10, 0) == b"sensor box"
    finally:
        os.close(fd)
    written = setup.run_dir / "written-by-node"
    assert written.read_text() == "hi" and written.stat().st_uid == uid


LISTEN = """
import json, socket, sys
out = {}
try:
    socket.socket().bind(("0.0.0.0", 80))
    out["port80"] = "bound"
except OSError as e:
    out["port80"] = e.strerror
s = socket.socket()
s.bind(("0.0.0.0", 7000))
s.listen(1)
print(json.dumps(out), flush=True)
conn, _ = s.accept()
conn.sendall(b"from the node")
conn.close()
"""


def test_service_binds_a_tcp_port_in_the_nodes_netns(setup):
    proc = setup.box.spawn([PY, "-c", LISTEN], stdout=subprocess.PIPE)
    try:
        first = json.loads(proc.stdout.readline())
        with netns_mod.socket_in(setup.netns) as client:
            client.settimeout(10)
            client.connect(("127.0.0.1", 7000))
            assert client.recv(100) == b"from the node"
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
    # a port below 1024 needs CAP_NET_BIND_SERVICE in the netns owner (the host's userns)
    assert first["port80"] == "Permission denied"


ORPHAN = """
import os, time
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_orphans_are_reaped_by_the_nodes_pid_1(setup):
    cgroup = setup.node.cgroup
    proc = setup.box.spawn([PY, "-c", ORPHAN], stdout=subprocess.PIPE)
    child = setup.box.host_pid(int(proc.stdout.readline()))
    proc.stdout.close()
    assert child is not None and read_process(child).ppid == proc.pid
    proc.kill()  # the parent dies; its child lives on
    assert proc.wait(10) == 128 + signal.SIGKILL
    wait_for(lambda: read_process(child).ppid == setup.box.init_pid, what="the reparenting")
    before = cgroup.pids_current()
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: read_process(child) is None, what="the orphan to be reaped")
    assert cgroup.pids_current() == before - 1
    zombies = [p for p in setup.node.processes() if p.state == "Z"]
    assert zombies == []


def _in_cgroup(pid: int, node: Node) -> bool:
    text = Path(f"/proc/{pid}/cgroup").read_text()
    return text.count(f":/{node.cgroup.relpath}\n") == len(node.cgroup.paths)


NAMESPACES = ("pid", "mnt", "uts", "ipc", "net", "user", "cgroup")


def test_processes_are_in_the_nodes_cgroup_and_namespaces(setup):
    proc = setup.box.spawn(["sleep", "60"])
    try:
        assert read_process(proc.pid).comm == "sleep"
        for pid in (proc.pid, setup.box.init_pid):
            assert _in_cgroup(pid, setup.node)
            for ns in NAMESPACES:
                mine = os.readlink(f"/proc/self/ns/{ns}")
                assert os.readlink(f"/proc/{pid}/ns/{ns}") != mine, ns
        assert os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat(
            f"/run/netns/{setup.netns}").st_ino
        inside = setup.probe("import json; print(json.dumps(open('/proc/self/cgroup').read()))")
        assert {line.split(":", 2)[2] for line in inside.splitlines()} == {"/"}
    finally:
        proc.kill()
        proc.wait()


# -- the handle and the container's life ---------------------------------------------------


def test_spawn_gives_the_commands_status_and_signals_the_command(setup):
    assert setup.box.spawn(["sh", "-c", "exit 3"]).wait(10) == 3
    proc = setup.box.spawn(["sleep", "60"])
    assert proc.ns_pid is not None and setup.box.host_pid(proc.ns_pid) == proc.pid
    proc.terminate()
    assert proc.wait(10) == 128 + signal.SIGTERM


def test_open_finds_the_running_container_and_stop_ends_it(setup):
    again = Container.open(setup.node.cgroup, setup.iso)
    assert again.init_pid == setup.box.init_pid
    proc = again.spawn(["sleep", "60"])
    again.stop()
    assert proc.wait(10) == 128 + signal.SIGKILL  # the PID namespace died with its PID 1
    wait_for(lambda: not setup.node.cgroup.procs(), what="the node to be empty")
    assert not setup.box.alive()


def test_errors_say_what_is_wrong(setup):
    with pytest.raises(NodeError, match="not one: start the node's container"):
        Container.open(setup.sibling.cgroup, setup.iso)
    with setup.node.locked():
        with pytest.raises(NodeError, match="is locked"):
            setup.box.spawn(["true"])
    with pytest.raises(NodeError, match="does not exist"):
        Container.start(setup.sibling.cgroup, None, setup.iso, setup.base / "missing")
    with pytest.raises(NodeError, match="No such file"):
        Container.start(setup.sibling.cgroup, f"{setup.netns}-missing", setup.iso, setup.run_dir)


def test_two_nodes_cannot_reach_each_other(setup):
    """Node b (no netns given: a fresh one) sees a's run directory path, as nothing hides it
    here, but may not enter it; neither sees the other's processes."""
    index = (setup.iso.uid_base - uid_base_for(0)) // setup.iso.count + 1
    iso_b = Isolation(uid_base=uid_base_for(index), hide=(Path.home(),), share=python_paths(),
                      hostname="b")
    box_b = Container.start(setup.sibling.cgroup, None, iso_b, setup.other_run_dir)
    try:
        sleeper = setup.box.spawn(["sleep", "60"])
        code = LIST_PIDS.replace("sys.stdin.read()", "")
        seen_b = json.loads(box_b.spawn([PY, "-c", code], root=True,
                                        stdout=subprocess.PIPE).communicate(timeout=20)[0])
        out = json.loads(box_b.spawn([PY, "-c", READ_FILES, json.dumps([str(setup.run_dir)]),
                                      json.dumps(str(setup.base))], root=True,
                                     stdout=subprocess.PIPE).communicate(timeout=20)[0])
        net_b = os.readlink(f"/proc/{box_b.init_pid}/ns/net")
        sleeper.kill()
        sleeper.wait()
    finally:
        box_b.stop()
    assert out[str(setup.run_dir)] == "Permission denied"
    assert seen_b["pids"] == [1, seen_b["me"]]  # not a's sleeper, nor anything else
    assert net_b not in (os.readlink("/proc/self/ns/net"),
                         os.readlink(f"/proc/{setup.box.init_pid}/ns/net"))


# Makes a node's user namespace, its maker stuck where it maps it: prints its holder's pid.
MAKER = r"""
import subprocess, sys, time
from backdoors.nodes import container
made = subprocess.Popen
def spied(*args, **kwargs):
    proc = made(*args, **kwargs)
    print(proc.pid, flush=True)
    return proc
container.subprocess.Popen = spied
container.open = lambda *args, **kwargs: time.sleep(60)  # the uid_map write, held here
container._make_userns(container.Isolation(uid_base=container.uid_base_for(int(sys.argv[1]))))
"""


@pytest.mark.root
def test_a_user_namespaces_holder_ends_with_its_maker_killed_before_it_ended_it(prefix):
    """Review: the helper that holds a new user namespace until its maps are written (it
    ran `sleep infinity`) was left running by a maker SIGKILLed in those milliseconds. It
    now reads a pipe from its maker, and ends at EOF."""
    maker = subprocess.Popen([sys.executable, "-c", MAKER,
                              str(int(prefix.rsplit("-", 1)[1], 16) % 4096)],
                             stdout=subprocess.PIPE)
    try:
        holder = int(maker.stdout.readline())
        assert read_process(holder).comm == "cat"
    finally:
        maker.kill()
        maker.wait()
        maker.stdout.close()
    # reparented to us (a subreaper: the prefix fixture) or to init; gone or a zombie
    assert wait_for(lambda: read_process(holder) is None
                    or read_process(holder).state == "Z", 10), read_process(holder)
