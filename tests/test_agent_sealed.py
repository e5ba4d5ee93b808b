"""The sealed agent (agent/sealing.py, `backdoors agent --sealed`): what it refuses, what
stays working, and who can no longer read its memory.

The refusals are shown in small sealed children that call the agent's own `seal()` (a real
seccomp filter, real prctl), the ops against a real sealed daemon; the lab's agents run
sealed too, so the lab-based tests (recovery scenarios, demo) run against sealed agents.
"""

import errno
import json
import os
import signal
import subprocess
import textwrap
import urllib.request

import msgspec
import pytest
from test_agent_support import PY, agent_lab, daemon, prefix, read_line, to_toml

from backdoors.agent.keys import verify
from backdoors.agent.protocol import EVENT_DOMAIN, Envelope
from backdoors.agent.sealing import DENIED
from backdoors.lab import Lab

__all__ = ["agent_lab", "prefix"]
pytestmark = pytest.mark.root

# A sealed child: a thread started before the seal (as the agent's are), then seal(), then
# each forbidden action, reported as JSON; then it waits on stdin.
FORBIDDEN = textwrap.dedent("""
    import ctypes, errno, json, os, sys, threading, time
    from backdoors.agent.sealing import dumpable, seal, status
    started = threading.Event()
    stop = threading.Event()
    def worker():
        started.set()
        stop.wait()
    t = threading.Thread(target=worker)
    t.start()
    started.wait()
    done = seal(action=sys.argv[1] if len(sys.argv) > 1 else "errno")
    libc = ctypes.CDLL(None, use_errno=True)
    out = {"denied": len(done.denied), "dumpable": dumpable()}
    def attempt(name, fn):
        try:
            rc = fn()
        except OSError as e:
            out[name] = e.errno
            return
        out[name] = ctypes.get_errno() if rc == -1 else 0
    def thread_exec():
        res = {}
        def run():
            try:
                os.execv("/bin/true", ["true"])
            except OSError as e:
                res["errno"] = e.errno
        x = threading.Thread(target=run)
        x.start()
        x.join()
        return res
    attempt("execve", lambda: os.execv("/bin/true", ["true"]))
    attempt("ptrace", lambda: libc.ptrace(16, os.getppid(), 0, 0))   # PTRACE_ATTACH
    attempt("mount", lambda: libc.mount(b"none", b"/mnt", b"tmpfs", 0, None))
    attempt("unshare", lambda: libc.unshare(0x40000000))             # CLONE_NEWNET
    attempt("bpf", lambda: libc.syscall(321, 0, None, 0))
    attempt("keyctl", lambda: libc.syscall(250, 0, 0, 0, 0, 0))
    attempt("init_module", lambda: libc.syscall(175, None, 0, b""))
    attempt("io_uring_setup", lambda: libc.syscall(425, 8, None))
    attempt("process_vm_writev", lambda: libc.syscall(311, os.getppid(), None, 0, None, 0, 0))
    out["execve_new_thread"] = thread_exec().get("errno")
    # Still allowed: what the agent's ops use.
    fd = os.memfd_create("ok")
    os.close(fd)
    pidfd = os.pidfd_open(os.getpid())
    os.close(pidfd)
    netns = os.open("/proc/self/ns/net", os.O_RDONLY)
    out["setns"] = 0 if libc.setns(netns, 0x40000000) == 0 else ctypes.get_errno()
    os.close(netns)
    st = status()
    out["status"] = {k: st[k] for k in ("Seccomp", "NoNewPrivs", "Seccomp_filters")}
    out["thread_status"] = open(f"/proc/self/task/{t.native_id}/status").read().split(
        "Seccomp:")[1].split()[0]
    print(json.dumps(out), flush=True)
    sys.stdin.readline()
    stop.set()
""")


def _sealed_child(*args: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", FORBIDDEN, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_sealed_process_cannot_exec_trace_mount_or_load_into_the_kernel():
    proc = _sealed_child()
    try:
        out = json.loads(read_line(proc, 20))
    finally:
        proc.communicate(b"\n", timeout=20)
    assert out["denied"] == len(DENIED)
    for call in ("execve", "execve_new_thread", "ptrace", "mount", "unshare", "bpf", "keyctl",
                 "init_module", "io_uring_setup", "process_vm_writev"):
        assert out[call] == errno.EPERM, (call, out)
    assert out["setns"] == 0  # entering a node's netns stays allowed
    assert out["dumpable"] is False
    assert out["status"] == {"Seccomp": "2", "NoNewPrivs": "1", "Seccomp_filters": "1"}
    assert out["thread_status"] == "2"  # a thread started before the seal is filtered too
    assert proc.returncode == 0


def test_kill_mode_kills_the_process_on_a_denied_call():
    proc = _sealed_child("kill")
    out, _ = proc.communicate(b"\n", timeout=20)
    assert proc.returncode == -signal.SIGSYS and out == b""


# Holds a secret, sealed (argv[1] == "sealed") or not; prints its pid and address.
TARGET = textwrap.dedent("""
    import ctypes, json, os, sys
    secret = ctypes.create_string_buffer(b"the-agent-key-0123456789abcdef", 32)
    if sys.argv[1] == "sealed":
        from backdoors.agent.sealing import seal
        seal()
    print(json.dumps({"pid": os.getpid(), "addr": ctypes.addressof(secret)}), flush=True)
    sys.stdin.readline()
""")

# Reads 30 bytes at address argv[2] of pid argv[1] through /proc/<pid>/mem and
# process_vm_readv; prints what it read or the errno of each.
READER = textwrap.dedent("""
    import ctypes, json, sys
    pid, addr = int(sys.argv[1]), int(sys.argv[2])
    out = {}
    try:
        with open(f"/proc/{pid}/mem", "rb") as f:
            f.seek(addr)
            out["mem"] = f.read(30).decode()
    except OSError as e:
        out["mem"] = e.errno
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(30)
    local, remote = iovec(ctypes.addressof(buf), 30), iovec(addr, 30)
    n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    out["vm_readv"] = buf.raw.decode() if n == 30 else ctypes.get_errno()
    print(json.dumps(out))
""")

SECRET = "the-agent-key-0123456789abcdef"
# Readers of the same uid and user namespace as their target, without CAP_SYS_PTRACE: for
# them the dumpable flag is what decides (the target runs with the reader's credentials).
SAME_UID_READERS = {
    "root-without-cap-sys-ptrace": ["setpriv", "--bounding-set=-sys_ptrace",
                                    "--inh-caps=-sys_ptrace", "--"],
    "unprivileged-uid": ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"],
}


def _read(target_prefix: list[str], target: str, reader_prefix: list[str]) -> dict:
    """Start TARGET (`target`: sealed or open) under `target_prefix`, read its secret with
    READER under `reader_prefix`."""
    proc = subprocess.Popen([*target_prefix, PY, "-c", TARGET, target], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        where = json.loads(read_line(proc, 20))
        out = subprocess.run([*reader_prefix, PY, "-c", READER, str(where["pid"]),
                              str(where["addr"])], capture_output=True, timeout=60)
    finally:
        proc.communicate(b"\n", timeout=20)
    assert out.returncode == 0, out.stderr.decode()
    return json.loads(out.stdout)


@pytest.mark.parametrize("reader", SAME_UID_READERS)
def test_a_sealed_agents_memory_cannot_be_read_without_cap_sys_ptrace(reader):
    prefix = SAME_UID_READERS[reader]
    # The control: the same reader reads an unsealed process of its own uid...
    assert _read(prefix, "open", prefix) == {"mem": SECRET, "vm_readv": SECRET}
    # ...and nothing of a sealed one.
    assert _read(prefix, "sealed", prefix) == {"mem": errno.EACCES, "vm_readv": errno.EPERM}


def test_root_of_a_user_namespace_cannot_read_a_sealed_agents_memory():
    # uid 0 mapped to 0: the agent's own uid, every capability, but in a namespace of its own
    userns_root = ["unshare", "--user", "--map-root-user", "--"]
    assert _read([], "sealed", userns_root) == {"mem": errno.EACCES, "vm_readv": errno.EPERM}


def test_a_sealed_daemon_serves_every_node_op(agent_lab):
    lab = agent_lab(nodes={"n0": {}, "n1": {}}, start=False,
                    metrics_listen="127.0.0.1:0")
    with daemon(lab, "--sealed") as (proc, ready):
        sealed = ready["sealed"]
        assert (sealed["action"], sealed["denied"]) == ("errno", len(DENIED))
        assert sealed["landlock"]["abi"] >= 1  # Linux >= 5.13 with Landlock on
        assert not any("execute" in a for a in sealed["landlock"]["rules"].values())
        with open(f"/proc/{proc.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1"
        assert int(status["VmLck"].split()[0]) > 0
        assert os.stat(f"/proc/{proc.pid}/mem").st_uid == 0  # not dumpable: root's files
        c = lab.client()
        assert c.ping().pid == proc.pid
        # Local registration: SCM_RIGHTS, memfd seal checks, SO_PEERCRED, pidfd.
        app, replies = lab.start_app("n0", mailbox=True)
        assert replies["box"] and replies["mailbox"]
        assert "app" in c.sensors("n0").boxes
        assert len(c.read("n0", "app", 0, 16)) == 16
        assert c.write("n0", "mailbox", 0, b"\x01sealed\x00") == 8
        assert json.loads(read_line(app, 10)) == {"mailbox": "017365616c656400"}
        assert app.pid in {r.pid for r in c.processes("n0").rows}
        assert c.status("n0").name == "n0"
        assert c.sessions("n0") == []
        events = lab.client()
        assert "last_seq" in events.call("subscribe")
        stream = events.take_socket()
        stream.settimeout(10)
        limits = c.set_limits("n1", pids=64)
        assert limits.pids_limit == 64
        assert c.lock("n0", 30).locked_by and lab.nodes["n0"].is_locked()
        assert c.unlock("n0").was_locked and not lab.nodes["n0"].is_locked()
        assert c.kill("n0", app.pid) is True
        app.wait(10)
        tree, _ = lab.start_app("n1")
        assert tree.pid in c.kill_tree("n1", tree.pid)
        tree.wait(10)
        other, _ = lab.start_app("n1", box="other")
        assert other.pid in c.kill_node("n1")
        other.wait(10)
        fence = c.fence("n0")
        assert fence.sessions == 0 and lab.nodes["n0"].is_locked()
        assert c.unfence("n0").was_locked
        # The event stream (pushed by the loop; a heartbeat at least every second).
        size = int.from_bytes(_exactly(stream, 4), "big")
        env = msgspec.msgpack.decode(_exactly(stream, size), type=Envelope)
        assert verify((lab.agent_key.public,), EVENT_DOMAIN, env.body, env.sig)  # the agent signs
        stream.close()
        # The metrics endpoint (its own thread, started before the seal).
        with urllib.request.urlopen(f"http://{ready['metrics']}/metrics", timeout=10) as r:
            assert b"backdoors_agent" in r.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    audit = lab.audit()  # the audit log is written while sealed
    assert audit[0]["kind"] == "start" and audit[-1]["kind"] == "stop"
    assert {"kill", "kill_tree", "kill_node", "write", "fence"} <= {a.get("op") for a in audit}


def test_a_sealed_agent_refuses_to_start_with_keys_readable_by_others(agent_lab, tmp_path):
    lab = agent_lab(start=False)
    keys = tmp_path / "agent.key"
    keys.write_text(open(lab.config.key_file).read())
    keys.chmod(0o644)
    lab.config.key_file = str(keys)
    config = tmp_path / "agent.toml"
    config.write_text(to_toml(lab.config))
    out = subprocess.run([PY, "-m", "backdoors", "agent", "--config", str(config), "--sealed"],
                         capture_output=True, timeout=60)
    assert out.returncode == 2 and out.stdout == b""  # a config problem, found before start
    stderr = out.stderr.decode()
    assert f"{keys} is readable by group or others" in stderr, stderr
    assert f"chmod 600 {keys}" in stderr
    assert not os.path.exists(lab.socket_path("n0"))  # it stopped and cleaned up


def test_the_labs_agents_run_sealed(unique):
    with Lab(f"t{unique}", hosts=2, nodes=2, agents=True, services=False) as lab:
        for host in lab.state.agents:  # (keeper pids) each keeper forks its host's agent
            pid = lab.agent_pid(host)
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f)
            assert status["Seccomp"].strip() == "2", host
            assert status["NoNewPrivs"].strip() == "1", host
            assert os.stat(f"/proc/{pid}/mem").st_uid == 0  # not dumpable
            config = lab.plan.run_dir / f"agent-{host}.toml"
            assert config.stat().st_mode & 0o777 == 0o600
            with lab.agent_client(host) as c:
                assert c.ping().pid == pid


def _exactly(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "the agent closed the event stream"
        buf += chunk
    return buf


# Landlock alone (confine(), no seccomp filter): the agent's rules, then a thread started
# after them tries what a hijacked agent would; argv[1]: a file outside the rules to read,
# argv[2]: a directory outside them to write in.
CONFINED = textwrap.dedent("""
    import json, os, sys, threading
    from backdoors.agent.sealing import confine, rules
    done = confine(rules(run_dir="/run/none", nodes=[], cgroup_mounts=["/sys/fs/cgroup"]))
    out = {"abi": done.landlock_abi}
    def attempt(name, fn):
        try:
            fn()
            out[name] = 0
        except OSError as e:
            out[name] = e.errno
    def run():
        attempt("read_outside", lambda: open(sys.argv[1]).read())
        attempt("write_outside", lambda: open(os.path.join(sys.argv[2], "x"), "w").close())
        attempt("write_root", lambda: open("/root/.backdoors-sealed-probe", "w").close())
        attempt("list_root", lambda: os.listdir("/root"))
        attempt("exec", lambda: os.execv("/bin/true", ["true"]))
        attempt("read_proc", lambda: open("/proc/self/status").read())
        attempt("read_sys", lambda: os.listdir("/sys/fs/cgroup"))
        attempt("lazy_import", lambda: __import__("colorsys") and __import__("_decimal"))
    t = threading.Thread(target=run)
    t.start()
    t.join()
    print(json.dumps(out), flush=True)
""")


def test_landlock_confines_the_agents_paths_and_forbids_execution(tmp_path):
    outside = tmp_path / "not-for-the-agent"
    outside.write_text("secret")
    out = subprocess.run([PY, "-c", CONFINED, str(outside), str(tmp_path)],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    got = json.loads(out.stdout)
    assert got["abi"] >= 1
    for what in ("read_outside", "write_outside", "write_root", "list_root", "exec"):
        assert got[what] == errno.EACCES, (what, got)
    for what in ("read_proc", "read_sys", "lazy_import"):
        assert got[what] == 0, (what, got)
    assert not (tmp_path / "x").exists()


# The real daemon with one extra op, `probe`, that tries an action from a worker thread of
# the sealed agent (started after the seal) and answers its errno (0: it worked).
PROBED_DAEMON = textwrap.dedent("""
    import logging, os, sys
    import msgspec
    from backdoors.agent import ops
    from backdoors.agent.run import run_agent
    from backdoors.config import load_agent_config

    class ProbeArgs(msgspec.Struct):
        what: str
        path: str

    def probe(call):
        what, path = call.args.what, call.args.path
        try:
            if what == "read":
                open(path, "rb").read()
            elif what == "write":
                open(path, "w").close()
            elif what == "exec":
                os.execv(path, [path])
            elif what == "import":
                __import__(path)
            return 0
        except OSError as e:
            return e.errno

    ops.OPS["probe"] = ops.Op("probe", ProbeArgs, probe, "memory")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    sys.exit(run_agent(load_agent_config(sys.argv[1]), sealed=True, config_path=sys.argv[1]))
""")


def test_a_sealed_daemon_cannot_read_write_or_run_outside_its_paths(agent_lab, tmp_path):
    lab = agent_lab(nodes={"n0": {}}, start=False)
    config = os.path.join(lab.tmp, "agent.toml")
    with open(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(to_toml(lab.config))
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("not the agent's")
    proc = subprocess.Popen([PY, "-c", PROBED_DAEMON, config], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        ready = json.loads(read_line(proc, 30))
        host, _, port = ready["listen"].rpartition(":")
        lab.address = (host, int(port))
        c = lab.client()
        probe = lambda what, path: c.call("probe", what=what, path=path)  # noqa: E731
        assert probe("read", str(outside)) == errno.EACCES
        assert probe("read", config) == errno.EACCES  # its own config and keys, read before
        assert probe("write", str(tmp_path / "new")) == errno.EACCES
        assert probe("write", "/root/.backdoors-sealed-probe") == errno.EACCES
        assert probe("exec", "/bin/true") == errno.EPERM  # seccomp answers first
        assert probe("read", "/proc/self/status") == 0
        assert probe("import", "colorsys") == 0  # a lazy import from the stdlib
        assert c.sensors("n0").boxes  # and an op on the same agent still works
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0
    assert not (tmp_path / "new").exists() and not os.path.exists("/root/.backdoors-sealed-probe")
