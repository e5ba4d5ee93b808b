"""The operator's path end to end (issue 11), on this machine's cgroup layout, as root, no
lab: every command is a step of docs/examples/operator-walkthrough.sh, the file
docs/operations.md §15 shows, so the docs run as tested.

Two nodes by `node create`, keys, one config file, `config show` and `monitor --check`, the
sealed agent and a monitor as daemons, the Python and the C example services registered
with `node run --user nobody --init`, then a memory hog killed, a fork bomb repaired and a
hang (SIGSTOP) seen by `status` and recorded, `incidents` listing the three, and the
teardown leaving nothing: cgroups in every hierarchy, netns, veths, sockets, records.

Names start with bdt-<unique> (nodes, netns, the nodes' cgroup parent, the agent's host and
so its cgroup bd-agent-bdt-<unique>); the files live in /tmp/bdt-<unique>, never /etc. The
fixture reaps all of it by prefix whatever happens.
"""

import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import backdoors
from backdoors import net, provision
from backdoors.nodes import detect, reap

from conftest import unavailable

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs/examples/operator-walkthrough.sh"
USER = "nobody"


def reachable_by_all(path: str) -> bool:
    """Whether any user may execute `path` (its real file) and traverse its folders."""
    real = Path(os.path.realpath(path))
    return all(p.stat().st_mode & stat.S_IXOTH for p in [real, *real.parents])


def service_python() -> tuple[str, dict]:
    """A Python that the services' user runs with backdoors importable, and its env.

    This interpreter, unless it lives where others cannot reach (pyenv under a 0700
    /root): then the system's Python of the same version, given this one's package
    directories (the source tree and the dependencies' site-packages) in PYTHONPATH."""
    if reachable_by_all(sys.executable):
        return sys.executable, {}
    import msgspec
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = shutil.which(version, path="/usr/local/bin:/usr/bin")
    dirs = [str(Path(backdoors.__file__).parents[1]), str(Path(msgspec.__file__).parents[1])]
    if python is None or not all(reachable_by_all(d) for d in dirs):
        unavailable(f"a {version} that user {USER} may run, with backdoors importable")
    return python, {"PYTHONPATH": os.pathsep.join(dirs)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what: str, timeout: float = 20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Walkthrough:
    """The walkthrough's steps with this test's names; the daemons it started."""

    def __init__(self, unique: str, logs: Path):
        self.prefix = p = f"bdt-{unique}"
        self.dir = Path(f"/tmp/{p}")
        self.nodes = [f"{p}a", f"{p}b"]
        self.logs = logs
        python, extra = service_python()
        self.env = dict(os.environ, BACKDOORS=f"{sys.executable} -m backdoors",
                        BD_PYTHON=python, BD_DIR=str(self.dir), BD_HOST=p,
                        BD_NODES=" ".join(self.nodes), BD_CGROUP=p, BD_USER=USER,
                        BD_LISTEN=f"127.0.0.1:{free_port()}", **extra)
        self.procs: dict[str, subprocess.Popen] = {}

    def step(self, name: str, *args: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["sh", str(SCRIPT), name, *args], env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"step {name}: {done.stderr}"
        return done

    def start(self, name: str) -> subprocess.Popen:
        """A long-running step (the script execs it: the pid is the daemon's)."""
        proc = subprocess.Popen(["sh", str(SCRIPT), name], env=self.env, stdout=subprocess.PIPE,
                                stderr=open(self.logs / f"{name}.err", "w"), text=True)
        self.procs[name] = proc
        return proc

    def line(self, name: str, timeout: float = 30.0) -> str:
        """The next stdout line of daemon `name`, waited for at most `timeout`."""
        proc = self.procs[name]
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        assert ready, f"{name} printed nothing in {timeout} s: {self.log(name)}"
        line = proc.stdout.readline()
        assert line, f"{name} ended ({proc.poll()}): {self.log(name)}"
        return line

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.err").read_text()[-3000:]

    def status(self) -> dict[str, dict]:
        return {r["node"]: r for r in json.loads(self.step("status", "--json").stdout)["nodes"]}

    def incidents(self) -> list[dict]:
        if not (self.dir / "incidents/incidents.jsonl").exists():
            return []
        return json.loads(self.step("incidents", "--json").stdout)

    def incident(self, rule: str, node: str, closed: bool = True):
        return next((i for i in self.incidents() if i["rule"] == rule and i["node"] == node
                     and (i["closed"] is not None) == closed), None)

    def reap(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for node in self.nodes:
            if provision.record_path(node).exists():
                provision.delete(node)
        reap(self.prefix)
        reap(f"bd-agent-{self.prefix}")
        net.netns.reap(self.prefix)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def walk(root, unique, tmp_path):
    if shutil.which("cc") is None or shutil.which("catatonit") is None:
        unavailable("cc (the C service) and catatonit (node run --init)")
    w = Walkthrough(unique, tmp_path)
    try:
        yield w
    finally:
        w.reap()


def test_the_operator_path_from_the_docs(walk):
    py_node, c_node = walk.nodes

    # set up: nodes, keys, the config, its checks, the C service built
    done = walk.step("nodes")
    assert "not a container" in done.stderr and "--user" in done.stderr
    entries = tomllib.loads((walk.dir / "nodes.toml").read_text())["agent"]["nodes"]
    assert [(e["name"], e["netns"]) for e in entries] == [(n, n) for n in walk.nodes]
    walk.step("keys")
    assert (walk.dir / "monitors.pub").read_text().startswith('m1 = "ed25519:')
    for key in ("m1.key", f"{walk.prefix}.key"):
        assert stat.S_IMODE((walk.dir / key).stat().st_mode) == 0o600
    walk.step("config")
    done = walk.step("check")
    assert f'host = "{walk.prefix}"' in done.stdout and 'isolation = "checked"' in done.stdout
    assert ": ok (1 agents, 6 rules: memory-hog, fork-bomb, kernel-integrity, guest-unstable, hang, agent-unreachable)" \
        in done.stdout, done.stdout
    walk.step("build-c")

    # the daemons: the sealed agent, then the monitor
    walk.start("agent")
    ready = json.loads(walk.line("agent"))
    assert ready["event"] == "ready" and ready["sealed"]["denied"] > 0, ready
    walk.start("monitor")
    wait_for(lambda: "monitor m1 starting" in walk.log("monitor"), "the monitor's start")

    # the services, as nobody under catatonit: both registered, both nodes ok
    walk.start("python-service")
    walk.start("c-service")
    assert walk.line("python-service") == "registered py-box\n"
    assert walk.line("c-service") == "registered c-box\n"

    def healthy():
        rows = walk.status()
        return (rows[py_node]["state"] == rows[c_node]["state"] == "ok"
                and "py-box" in rows[py_node]["boxes"] and "c-box" in rows[c_node]["boxes"])
    wait_for(healthy, "both services registered and ok in status")

    # a memory hog next to the Python service: killed by the monitor, the service lives
    hog = walk.start("hog")
    assert hog.wait(30) == 128 + signal.SIGKILL
    incident = wait_for(lambda: walk.incident("memory-hog", py_node), "the hog's incident")
    assert incident["state"] == "repaired", incident
    assert incident["diagnosis"]["culprits"][0]["comm"] == "bd-memhog"
    assert [(a["kind"], a["status"]) for a in incident["actions"]] == [("kill_culprit", "done")]

    # a fork bomb next to the C service: frozen, its lineage killed, thawed; it can fork
    bomb = walk.start("bomb")
    assert bomb.wait(30) == 128 + signal.SIGKILL
    incident = wait_for(lambda: walk.incident("fork-bomb", c_node), "the bomb's incident")
    assert incident["state"] == "repaired", incident
    assert incident["actions"][-1]["kind"] == "lock_kill_lineage"
    again = subprocess.run([sys.executable, "-m", "backdoors", "node", "run", c_node,
                            "--user", USER, "--", "sh", "-c", "true & wait"], timeout=30)
    assert again.returncode == 0
    assert walk.procs["python-service"].poll() is None and walk.procs["c-service"].poll() is None

    # a hang: the Python service stopped; status says stalled, an incident records it
    pid = int(walk.step("hang").stdout)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:4] == [b"-m", b"backdoors.examples.sensor_service", b"py-box"], cmdline

    def stalled():
        row = walk.status()[py_node]
        return row["state"] == "suspect" and "py-box/requests stalled" in row["worst"]["text"]
    wait_for(stalled, "status showing the Python service stalled")
    incident = wait_for(lambda: walk.incident("hang", py_node, closed=False), "the hang's incident")
    assert incident["diagnosis"]["culprits"][0]["pid"] == pid, incident["diagnosis"]
    assert walk.step("resume").stdout.strip() == str(pid)
    wait_for(lambda: walk.incident("hang", py_node), "the hang's incident closed")
    wait_for(healthy, "both nodes ok again")

    # incidents: the three, on the right nodes; the table too
    seen = {(i["rule"], i["node"], i["state"]) for i in walk.incidents()}
    assert seen == {("memory-hog", py_node, "repaired"), ("fork-bomb", c_node, "repaired"),
                    ("hang", py_node, "recorded")}, seen
    table = walk.step("incidents").stdout
    assert all(rule in table for rule in ("memory-hog", "fork-bomb", "hang"))

    # teardown: services, monitor, agent stop cleanly; then the nodes are deleted
    for name in ("python-service", "c-service", "monitor", "agent"):
        walk.procs[name].send_signal(signal.SIGTERM)
        assert walk.procs[name].wait(30) == 0, f"{name}: {walk.log(name)}"
    run_dir = walk.dir / "run"
    assert not list(run_dir.glob("*/*.sock")), "the agent left sockets"
    walk.step("teardown")
    for mount in detect().hierarchies().values():
        left = [e.name for e in os.scandir(mount)
                if e.name.startswith((walk.prefix, f"bd-agent-{walk.prefix}"))]
        assert left == [], f"cgroups left in {mount}: {left}"
    assert net.netns.names(walk.prefix) == []
    for node in walk.nodes:
        assert not Path(f"/sys/class/net/{node}-h").exists(), "a veth was left"
        assert not provision.record_path(node).exists()
    assert not walk.dir.exists()


def test_the_docs_show_the_walkthrough_as_the_script_has_it():
    """operations.md §15 names every step of the script, and its variables' defaults."""
    import re
    script = SCRIPT.read_text()
    text = (ROOT / "docs/operations.md").read_text()
    section = text[text.index("## 15. A walkthrough on one host"):]
    steps = set()
    for label in re.findall(r"^([a-z|\- ]+)\)$", script, re.MULTILINE):
        steps.update(s.strip() for s in label.split("|"))
    assert steps == set(re.findall(r"sh \$S ([a-z-]+)", section))
    defaults = re.findall(r'^: "\$\{(\w+):=(.*?)\}"', script, re.MULTILINE)
    assert len(defaults) == 8
    for var, value in defaults:
        shown = f'{var}="{value}"' if " " in value else f"{var}={value}"
        assert f"`{shown}`" in section, shown
