"""Local registration: only a node's own processes register, and only sealed memfds, capped."""

import json
import os
import re
import resource
import signal
import stat
import subprocess
import time

import pytest
from test_agent_support import REGISTER, agent_lab, daemon, prefix, read_line, wait_for

from backdoors.agent import local
from backdoors.common.runtime import register_box, register_region
from backdoors.errors import RegistrationError
from backdoors.sensors import SensorBox, parse_box

__all__ = ["agent_lab", "prefix"]
pytestmark = pytest.mark.root


def _try(lab, node, **spec):
    return json.loads(read_line(lab.run(node, REGISTER, json.dumps(spec))))


def test_a_process_inside_the_node_registers_its_box(agent_lab):
    lab = agent_lab()
    proc, reply = lab.start_app("n0", "svc")
    assert reply["box"] == {"name": "svc", "kind": "sensorbox", "size": 64 + 64 * 64,
                            "writable": False}
    c = lab.client()
    regions = {r.name: r for r in c.regions("n0")}
    assert regions["svc"].pid == proc.pid and regions["svc"].registrant_alive
    image = parse_box(c.sensors("n0").boxes["svc"])
    assert image.name == "svc" and image.owner_pid == proc.pid
    assert [s.name for s in image.sensors] == ["tick"]
    socket_mode = os.stat(lab.socket_path("n0")).st_mode
    assert stat.S_ISSOCK(socket_mode) and stat.S_IMODE(socket_mode) == 0o666


def test_the_region_outlives_the_process_that_registered_it(agent_lab):
    lab = agent_lab()
    proc, _ = lab.start_app("n0", "svc")
    proc.kill()
    proc.wait()
    c = lab.client()
    info = {r.name: r for r in c.regions("n0")}["svc"]
    assert not info.registrant_alive
    assert parse_box(c.sensors("n0").boxes["svc"]).owner_pid == proc.pid


def test_a_process_outside_the_node_is_refused_and_audited(agent_lab):
    lab = agent_lab(nodes={"n0": {}, "n1": {}})
    box = SensorBox.create("intruder")
    try:
        with pytest.raises(RegistrationError, match=r"only for itself: process \d+ is not inside node n0"):
            register_box(box, socket_path=lab.socket_path("n0"))
    finally:
        box.close()
    # A process of node n1 cannot register into n0 either.
    proc = lab.run("n1", REGISTER, json.dumps({"name": "x"}), socket_of="n0")
    assert "is not inside node n0" in json.loads(read_line(proc))[0]["error"]
    assert [r.name for r in lab.client().regions("n0")] == ["kernel"]
    refusals = [a for a in lab.audit() if a["kind"] == "local" and not a["ok"]]
    assert len(refusals) == 2 and all("only for itself" in a["error"] for a in refusals)


# Registers a region per line read (its name), on the process's one connection to the
# agent; prints each reply (or refusal) as a JSON line.
REGISTER_EACH_LINE = """
import fcntl, json, os, sys
from backdoors.common.runtime import register_region
from backdoors.errors import RegistrationError
for line in sys.stdin:
    fd = os.memfd_create("r", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    try:
        print(json.dumps({"ok": register_region(fd, line.strip(), timeout=30)}), flush=True)
    except RegistrationError as e:
        print(json.dumps({"error": str(e)}), flush=True)
"""


def test_a_caller_moved_out_of_its_node_is_refused_within_the_recheck(agent_lab):
    """The agent reads a caller's cgroups at most every CALLER_RECHECK_S on its
    connection: a process the host moves out of its node (into the root cgroup of one
    hierarchy) is refused from then on, on the same connection."""
    lab = agent_lab()
    proc = lab.run("n0", REGISTER_EACH_LINE, stdin=subprocess.PIPE)

    def register(name: str) -> dict:
        proc.stdin.write(f"{name}\n".encode())
        proc.stdin.flush()
        return json.loads(read_line(proc))

    assert "ok" in register("before")
    node = lab.nodes["n0"]
    mount = next(iter(node.cgroup.layout.hierarchies().values()))
    (mount / "cgroup.procs").write_text(str(proc.pid))  # out of the node there only
    time.sleep(local.CALLER_RECHECK_S + 0.2)
    after = register("after")
    assert "registers only for itself" in after.get("error", ""), after
    assert f"process {proc.pid} is not inside node n0" in after["error"]
    assert sorted(r.name for r in lab.client().regions("n0")) == ["before", "kernel"]


def test_an_unsealed_memfd_is_refused(agent_lab):
    lab = agent_lab()
    [result] = _try(lab, "n0", seal=False)
    assert "not sealed against shrinking" in result["error"]


def test_a_file_that_is_not_a_memfd_is_refused(agent_lab):
    lab = agent_lab()
    script = f"""
import os, json
from backdoors.common.runtime import register_region
from backdoors.errors import RegistrationError
fd = os.open("{lab.tmp}", os.O_RDONLY)
try:
    register_region(fd, "dir")
except RegistrationError as e:
    print(json.dumps(str(e)), flush=True)
"""
    assert "not a memfd" in json.loads(read_line(lab.run("n0", script)))


def test_a_malformed_sensor_box_is_refused(agent_lab):
    lab = agent_lab()
    script = """
import fcntl, json, os
from backdoors.common.runtime import _call
from backdoors.errors import RegistrationError
fd = os.memfd_create("fake", os.MFD_ALLOW_SEALING)
os.write(fd, b"NOPE" + bytes(4092))
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
try:
    _call({"op": "register", "kind": "sensorbox", "name": "fake"}, fd, None, 2.0)
except RegistrationError as e:
    print(json.dumps(str(e)), flush=True)
"""
    assert "not a Sensor Box" in json.loads(read_line(lab.run("n0", script)))


def test_caps_on_count_size_and_bytes_per_node(agent_lab):
    lab = agent_lab(max_regions_per_node=3, max_region_bytes=64 << 10, max_node_bytes=128 << 10)
    results = _try(lab, "n0", count=4, size=4096, name="small")
    assert [("ok" in r) for r in results] == [True, True, True, False]
    assert "the cap is 3" in results[3]["error"]
    [big] = _try(lab, "n0", size=(64 << 10) + 4096, name="big")
    assert "the cap is 65536 per region" in big["error"]
    for name in ("small0", "small1", "small2"):
        unregister_script = f"""
from backdoors.common.runtime import unregister
unregister({name!r})
print("{{}}", flush=True)
"""
        read_line(lab.run("n0", unregister_script))
    results = _try(lab, "n0", count=3, size=60 << 10, name="mid")
    assert [("ok" in r) for r in results] == [True, True, False]
    assert "would hold" in results[2]["error"] and "131072" in results[2]["error"]
    assert sorted(r.name for r in lab.client().regions("n0")) == ["kernel", "mid0", "mid1"]


# Holds TCP sessions (a connected pair per session, the server end handed over) until
# the agent refuses one; prints how many it held and the refusal.
HOLD_UNTIL_REFUSED = """
import json, resource, socket
from backdoors.common.runtime import hold_socket
from backdoors.errors import RegistrationError
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
lsn = socket.create_server(("127.0.0.1", 0))
held, kept = 0, []
while True:
    c = socket.create_connection(lsn.getsockname())
    a, _ = lsn.accept()
    kept += [c, a]
    try:
        hold_socket(a.fileno(), name=f"cb-{held:032x}", timeout=10)
    except RegistrationError as e:
        print(json.dumps({"held": held, "error": str(e)}), flush=True)
        break
    held += 1
"""


def test_the_session_cap_is_each_nodes_share_of_the_agents_descriptors():
    """Two descriptors a session, one or two a region, a reserve for the agent's own: a
    node's cap is at most its share of the agent's RLIMIT_NOFILE (worked out by hand)."""
    from backdoors.agent.descriptors import session_cap

    # 20,000: a reserve of 2,500; 17,500 / 3 nodes = 5,833, less 2 * 64 regions and 288
    cap = session_cap(16384, 3, 64, limit=20_000)
    assert (cap.sessions, cap.lowered) == ((5833 - 128 - 288) // 2, True)
    assert "descriptor limit of 20000 shared by its 3 nodes" in cap.note
    # a shell's 1,024: a reserve of 256 at least
    assert session_cap(4096, 1, 64, limit=1024).sessions == (768 - 416) // 2
    # enough for the configured cap: kept, and said as configured
    roomy = session_cap(4096, 2, 64, limit=1 << 20)
    assert (roomy.sessions, roomy.lowered, roomy.note) == (4096, False, "max_sessions_per_node")
    assert session_cap(4096, 1000, 64, limit=2048).sessions == 0  # none rather than EMFILE


def test_a_node_is_refused_past_its_share_of_the_agents_descriptors(agent_lab):
    """An agent started with few descriptors (a soft RLIMIT_NOFILE of 3,000 for one
    node: a cap of 1,104 sessions, not 4,096) holds that many of a node's sessions and
    refuses the next one saying why, instead of running out of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (3000, hard))
    try:
        lab = agent_lab(max_sessions_per_node=4096)  # the agent works its cap out now
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    got = json.loads(read_line(lab.run("n0", HOLD_UNTIL_REFUSED), timeout=120))
    # 3,000 less a reserve of 375, less 2 * 64 regions and 288: 2,209 descriptors, 2 each
    assert got["held"] == 1104, got
    assert "the cap is 1104 (max_sessions_per_node 4096, lowered to fit the agent's " \
           "descriptor limit of 3000 shared by its 1 nodes" in got["error"], got
    assert lab.client().held("n0").sessions == 1104


# Registers a region named by each line it reads, on a new connection each time.
REGISTER_ON_LINE = """
import fcntl, json, os, sys
from backdoors.common import runtime
from backdoors.common.runtime import _call
kept = []  # earlier connections stay open: the agent frees nothing when one closes
for line in sys.stdin:
    kept += runtime._channels.values()
    runtime._channels.clear()
    fd = os.memfd_create("r", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    try:
        r = _call({"op": "register", "name": line.strip(), "kind": "region"}, fd, None, 30)
        print(json.dumps({"ok": bool(r)}), flush=True)
    except Exception as e:
        print(json.dumps({"error": str(e)}), flush=True)
"""


def test_an_agent_out_of_descriptors_pauses_its_registration_sockets(agent_lab):
    """The agent daemon's soft RLIMIT_NOFILE lowered under every descriptor it has open
    (prlimit) for a second: a node's new connection cannot be accepted (EMFILE). The
    agent stops watching its registration sockets for 0.1 s at a time instead of
    spinning on them, lives through it, and once it has descriptors again the
    connection is accepted and served."""
    lab = agent_lab(start=False)
    with daemon(lab) as (proc, _):
        node = lab.run("n0", REGISTER_ON_LINE, stdin=subprocess.PIPE)
        node.stdin.write(b"first\n")
        node.stdin.flush()
        assert json.loads(read_line(node, 30)) == {"ok": True}
        soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        # no number free under the limit: whatever the agent closes meanwhile, it can
        # open nothing (its other threads too) until the limit is back
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (3, hard))
        try:
            node.stdin.write(b"second\n")  # a new connection: nothing free to accept it
            node.stdin.flush()
            time.sleep(1.0)
        finally:
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert json.loads(read_line(node, 30)) == {"ok": True}  # accepted after a pause
        node.stdin.close()
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1].decode()
    assert "the agent's registration sockets: cannot accept (Too many open files)" in err, err
    again = re.findall(r"registration sockets: accepting again after ([\d.]+) s \((\d+) "
                       r"retries\)", err)
    assert again, err
    for seconds, retries in again:  # one retry per pause, no spinning
        assert int(retries) <= float(seconds) / 0.1 + 2, err


def test_kernel_is_a_reserved_name_and_a_live_owner_keeps_its_name(agent_lab):
    lab = agent_lab()
    script = """
import fcntl, json, os
from backdoors.common.runtime import register_region
from backdoors.errors import RegistrationError
fd = os.memfd_create("r", os.MFD_ALLOW_SEALING)
os.ftruncate(fd, 4096)
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
try:
    register_region(fd, "kernel")
except RegistrationError as e:
    print(json.dumps(str(e)), flush=True)
"""
    assert "reserved" in json.loads(read_line(lab.run("n0", script)))
    proc, _ = lab.start_app("n0", "svc")
    # Another live process of the node cannot take the name over...
    script = """
import json
from backdoors.sensors import SensorBox
from backdoors.common.runtime import register_box
from backdoors.errors import RegistrationError
box = SensorBox.create("svc")
try:
    print(json.dumps(register_box(box)), flush=True)
except RegistrationError as e:
    print(json.dumps(str(e)), flush=True)
"""
    assert "still runs" in json.loads(read_line(lab.run("n0", script)))
    # ...but once the owner has exited, a restarted service re-registers it.
    proc.kill()
    proc.wait()
    assert json.loads(read_line(lab.run("n0", script)))["name"] == "svc"


def test_unregister_and_writable_regions(agent_lab):
    lab = agent_lab()
    [result] = _try(lab, "n0", name="mbox", writable=True)
    assert result["ok"]["writable"] is True
    assert {r.name: r.writable for r in lab.client().regions("n0")}["mbox0"] is True
    script = """
import json
from backdoors.common.runtime import unregister
from backdoors.errors import RegistrationError
print(json.dumps(unregister("mbox0")), flush=True)
try:
    unregister("mbox0")
except RegistrationError as e:
    print(json.dumps(str(e)), flush=True)
"""
    proc = lab.run("n0", script)
    assert json.loads(read_line(proc))["name"] == "mbox0"
    assert "has no region 'mbox0'" in json.loads(read_line(proc))
    assert [r.name for r in lab.client().regions("n0")] == ["kernel"]


def test_register_without_an_agent_socket_says_so(monkeypatch):
    monkeypatch.delenv("BACKDOORS_AGENT_SOCKET", raising=False)
    fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    try:
        with pytest.raises(RegistrationError, match="BACKDOORS_AGENT_SOCKET") as info:
            register_region(fd, "x")
        assert info.value.code == "no_agent"
        with pytest.raises(RegistrationError, match="No such file"):
            register_region(fd, "x", socket_path="/nonexistent/agent.sock")
    finally:
        os.close(fd)


def test_garbage_on_the_local_socket_is_answered_and_changes_nothing(agent_lab):
    import socket

    lab = agent_lab()
    for garbage in (b"\x00\x00\x00\x03abc", b"\xff\xff\xff\xff", b"\x00\x00\x00\x01\xc1"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(lab.socket_path("n0"))
            try:
                s.sendall(garbage)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused at accept (this test is outside the node): the reply waits
            reply = s.recv(65536)
            assert reply and b"error" in reply
    _, reply = lab.start_app("n0", "svc")  # still serving
    assert reply["box"]["name"] == "svc"
    wait_for(lambda: len(lab.client().regions("n0")) == 2)


def test_the_app_side_module_is_light():
    import subprocess
    import sys

    code = ("import sys, backdoors.common.runtime; "
            "print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
            "('asyncio', 'pyroute2', 'prometheus_client', 'psutil')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
