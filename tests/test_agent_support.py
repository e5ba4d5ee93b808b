"""Fixtures and workloads shared by the agent tests (this module holds no tests).

`agent_lab` builds nodes named `bdt-<unique>/<node>` and runs an agent on them, in-process
(BackgroundAgent) on 127.0.0.1 with an ephemeral port; everything is removed at teardown,
even on failure (the `prefix` fixture reaps the cgroups). Node processes are started with
BACKDOORS_AGENT_SOCKET set to their node's registration socket.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from test_nodes_support import PY, prefix, wait_for  # noqa: F401 - fixture re-exported

from backdoors.agent import AgentClient, AgentConfig, BackgroundAgent, NodeSpec, new_identity
from backdoors.agent.keys import Identity, write_key_file
from backdoors.common.runtime import AGENT_SOCKET_ENV
from backdoors.nodes import Node

MONITORS = ("m1", "m2", "m3")

# A service: registers a Sensor Box named argv[1] (a progress sensor ticking every 10 ms)
# and, with argv[2] == "mailbox", a writable 4 KiB region "mailbox"; prints the replies as
# one JSON line, then prints each new non-zero first 8 bytes of the mailbox.
APP = """
import fcntl, json, mmap, os, sys, time
from backdoors.sensors import SensorBox
from backdoors.common.runtime import register_box, register_region
box = SensorBox.create(sys.argv[1])
tick = box.progress("tick", deadline=1.0)
out = {"box": register_box(box)}
mm = None
if len(sys.argv) > 2 and sys.argv[2] == "mailbox":
    fd = os.memfd_create("mailbox", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    mm = mmap.mmap(fd, 4096)
    out["mailbox"] = register_region(fd, "mailbox", writable=True, timeout=30)
print(json.dumps(out), flush=True)
last = bytes(8)
while True:
    tick.tick()
    if mm is not None and mm[:8] != last:
        last = mm[:8]
        print(json.dumps({"mailbox": last.hex()}), flush=True)
    time.sleep(0.01)
"""

# Tries one registration described by argv[1] (JSON) and prints {"ok": ...} or {"error"}.
REGISTER = """
import fcntl, json, os, sys
from backdoors.common.runtime import register_region
from backdoors.errors import RegistrationError
spec = json.loads(sys.argv[1])
results = []
for i in range(spec.get("count", 1)):
    fd = os.memfd_create("r", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, spec.get("size", 4096))
    if spec.get("seal", True):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    try:
        results.append({"ok": register_region(fd, spec.get("name", "r") + str(i),
                                              writable=spec.get("writable", False),
                                              timeout=30)})
    except RegistrationError as e:
        results.append({"error": str(e)})
print(json.dumps(results), flush=True)
"""

# Allocates and touches 4 MiB every 50 ms (about 80 MB/s of RSS growth), up to argv[1] MiB.
GROWER = """
import sys, time
chunks = []
while len(chunks) * 4 < int(sys.argv[1]):
    chunks.append(bytearray(4 << 20))
    time.sleep(0.05)
time.sleep(300)
"""


@dataclass
class AgentLab:
    """Nodes, keys and a running agent; `client()` talks to it as a monitor. `keys` are the
    monitors' signers, `agent_key` the agent's own."""

    prefix: str
    tmp: str
    keys: dict[str, Identity]
    agent_key: Identity
    nodes: dict[str, Node]
    config: AgentConfig
    agent: BackgroundAgent | None = None
    address: tuple[str, int] | None = None  # of a daemon started with `daemon()`
    procs: list[subprocess.Popen] = field(default_factory=list)
    clients: list[AgentClient] = field(default_factory=list)

    def client(self, monitor: str = "m1", **kwargs) -> AgentClient:
        kwargs.setdefault("timeout", 5.0)
        address = self.address or self.agent.address
        key = monitor if isinstance(monitor, Identity) else self.keys[monitor]
        c = AgentClient(address, key, self.config.host, self.agent_key.public, **kwargs)
        self.clients.append(c)
        return c

    def socket_path(self, node: str) -> str:
        return os.path.join(self.config.run_dir, node, "agent.sock")

    def run(self, node: str, script: str, *args: str, socket_of: str | None = None,
            **kwargs) -> subprocess.Popen:
        """Run a Python script in `node`, told the registration socket of `socket_of`."""
        env = dict(os.environ, **{AGENT_SOCKET_ENV: self.socket_path(socket_of or node)})
        proc = self.nodes[node].run([PY, "-c", script, *args], env=env,
                                    stdout=subprocess.PIPE, **kwargs)
        self.procs.append(proc)
        return proc

    def start_app(self, node: str, box: str = "app", mailbox: bool = False):
        """Start APP in `node`; returns (proc, its registration replies)."""
        proc = self.run(node, APP, box, *(["mailbox"] if mailbox else []))
        return proc, json.loads(read_line(proc))

    def audit(self) -> list[dict]:
        return read_audit(self.config.audit_log)


def read_audit(path) -> list[dict]:
    """The records of an audit log the agent may be appending to: its last line is left
    out until whole (a reader can see a write's first page before its next)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def to_toml(config: AgentConfig) -> str:
    """The config as a TOML file (the daemon reads files)."""
    from backdoors.common.configfile import dumps
    return dumps(config)


@contextmanager
def daemon(lab: AgentLab, *args: str):
    """Run `python -m backdoors agent` on the lab's config; SIGTERM it at the end.

    Yields the process and its ready line; the lab's clients then talk to it.
    """
    path = os.path.join(lab.tmp, "agent.toml")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(to_toml(lab.config))  # root's only: it holds the keys (a sealed agent checks)
    proc = subprocess.Popen([PY, "-m", "backdoors", "agent", "--config", path, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = json.loads(read_line(proc, 20))
        host, _, port = ready["listen"].rpartition(":")
        lab.address = (host, int(port))
        yield proc, ready
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        proc.stderr.close()


class Supervised:
    """An agent run by the lab's keeper (its fd store): `kill()` SIGKILLs it and waits for
    the one the keeper starts in its place to answer."""

    def __init__(self, lab: AgentLab, pid_file: str):
        self.lab, self.pid_file = lab, pid_file

    @property
    def pid(self) -> int:
        return json.loads(open(self.pid_file).read())["pid"]

    def answering(self, old: int | None = None, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                with self.lab.client(timeout=1.0) as c:
                    if c.ping().pid != old:
                        return
            except Exception:  # noqa: BLE001 - not serving yet
                pass
            time.sleep(0.05)
        raise AssertionError(f"no agent answered in {timeout} s")

    def kill(self) -> None:
        old = self.pid
        os.kill(old, signal.SIGKILL)
        self.answering(old)


@contextmanager
def supervised(make, tmp_path, **overrides):
    """An AgentLab (from the agent_lab fixture `make`) whose agent runs under the lab's
    keeper on a TCP port of 127.0.0.1; yields (lab, Supervised)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lab = make(start=False, listen=f"127.0.0.1:{port}", **overrides)
    lab.address = ("127.0.0.1", port)
    path = tmp_path / "agent.toml"
    path.write_text(to_toml(lab.config))
    path.chmod(0o600)
    pid_file = tmp_path / "pid"
    keeper = subprocess.Popen(
        [PY, "-m", "backdoors.lab.keeper", "--notify", str(tmp_path / "notify"),
         "--pid-file", str(pid_file), "--", PY, "-m", "backdoors", "agent",
         "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert json.loads(keeper.stdout.readline())["event"] == "ready"
        agent = Supervised(lab, str(pid_file))
        agent.answering()
        yield lab, agent
    finally:
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(20)
        keeper.stdout.close()


def read_line(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    """One line of a child's stdout, or AssertionError after `timeout`."""
    import select

    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"process {proc.pid} printed nothing within {timeout} s")
    line = proc.stdout.readline().decode()
    if not line:
        proc.wait(timeout)
        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
        raise AssertionError(f"process {proc.pid} exited (status {proc.returncode}) without "
                             f"output; stderr:\n{err}")
    return line


def make_config(prefix: str, tmp: str, nodes: dict[str, str], keys: dict[str, Identity],
                agent_key: Identity, **overrides) -> AgentConfig:
    # these nodes are bare cgroups whose processes run as root on the host: not isolated
    specs = [NodeSpec(name, relpath, **{"isolation": "trusted",
                                        **overrides.pop(f"node_{name}", {})})
             for name, relpath in nodes.items()]
    fields = dict(host="h0", listen="127.0.0.1:0", run_dir=f"{tmp}/run",
                  audit_log=f"{tmp}/audit.jsonl",
                  monitors={m: k.public_text() for m, k in keys.items()},
                  key_file=write_agent_key(tmp, agent_key), nodes=specs, cgroup=f"{prefix}-agent")
    fields.update(overrides)
    return AgentConfig(**fields)


def write_agent_key(tmp: str, key: Identity) -> str:
    """The agent's private key file in `tmp` (mode 0600); its path."""
    path = os.path.join(tmp, f"agent-{key.id}.key")
    write_key_file(path, key, overwrite=True)
    return path


@pytest.fixture
def agent_lab(prefix):  # noqa: F811 - the nodes tests' fixture
    """A factory: agent_lab(nodes={"n0": {"pids_limit": 64}}, **config) -> AgentLab."""
    tmp = tempfile.mkdtemp(prefix="bdt-", dir="/tmp")
    labs: list[AgentLab] = []

    def make(nodes=None, start=True, **overrides) -> AgentLab:
        nodes = {"n0": {}} if nodes is None else nodes
        built = {name: Node.create(name, f"{prefix}/{name}", **limits)
                 for name, limits in nodes.items()}
        keys = {m: new_identity(m) for m in MONITORS}
        agent_key = new_identity(overrides.get("host", "h0"))
        config = make_config(prefix, tmp, {n: f"{prefix}/{n}" for n in nodes}, keys, agent_key,
                             **overrides)
        lab = AgentLab(prefix, tmp, keys, agent_key, built, config)
        labs.append(lab)
        if start:
            lab.agent = BackgroundAgent(config).start()
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            for proc in lab.procs:  # (a test that failed before stopping them)
                if proc.poll() is None:
                    proc.terminate()
            for c in lab.clients:
                c.close()
            if lab.agent is not None:
                lab.agent.stop()
            for node in lab.nodes.values():
                node.destroy()
            for proc in lab.procs:
                proc.wait(5)
                if proc.stdout:
                    proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)


def alive_in(node: Node, pid: int) -> bool:
    return pid in node.cgroup.procs()


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(milliseconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return (time.perf_counter() - start) * 1000, result


__all__ = ["prefix", "agent_lab", "wait_for", "PY", "sys"]
