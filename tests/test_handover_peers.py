"""The node side of the hand-over path checks its peer is the agent (issue 10, finding 11).

One lab (one host with its agent, one container node n0). Inside n0 a recovery server
listens on an adoption socket in the node's run directory; other processes of the node
(as the services' uid and as the node's root) connect there and try a hand-over of a
real TCP socket with a CB memfd: refused unread, counted, with the reason. The host (as
the agent connects: root, outside the node's PID and user namespaces) passes the check.
Last, a process of n0 replaces the node's `agent.sock` (the run directory is the node's to
write) and a service registers a region: refused before anything is sent.
"""

import json
import subprocess
import sys
import uuid

import pytest

from backdoors.continuations import AdoptionClient, AdoptionError, Handover
from backdoors.continuations.adoption import cb_memfd
from backdoors.lab import Lab

pytestmark = pytest.mark.root

PY = sys.executable

SERVER = """
import json, select, sys
from backdoors.continuations.adoption import UnixAdoptionSource
src = UnixAdoptionSource(sys.argv[1])
print("ready", flush=True)
received = []
while True:
    ready = select.select([src.fileno(), sys.stdin], [], [])[0]
    if sys.stdin in ready:
        break
    while (r := src.receive()) is not None:
        received.append(r.session)
        r.close()
print(json.dumps({"refused": src.refused, "received": received}), flush=True)
src.close()
"""

HOSTILE = """
import json, os, socket, sys
from backdoors.continuations.adoption import AdoptionClient, Handover, cb_memfd
listener = socket.create_server(("127.0.0.1", 0))
tcp = socket.create_connection(listener.getsockname())
cb = cb_memfd("cb", b"\\0" * 4096)
out = {"uid": os.getuid(), "pid": os.getpid()}
try:
    with AdoptionClient(sys.argv[1]) as client:
        client.hand_over(tcp, cb, Handover("ab" * 16, 0, 0))
    out["error"] = None
except Exception as e:
    out["error"] = str(e)
print(json.dumps(out))
"""

REPLACE_AGENT_SOCK = """
import json, os, socket, sys, threading
from backdoors.common import runtime
from backdoors.errors import RegistrationError
path = os.environ["BACKDOORS_AGENT_SOCKET"]
os.unlink(path)
fake = socket.socket(socket.AF_UNIX)
fake.bind(path)
fake.listen(4)
got = {"bytes": 0, "fds": 0}
def serve():
    conn, _ = fake.accept()
    conn.settimeout(2.0)
    try:
        while True:
            data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 16))
            got["bytes"] += len(data)
            got["fds"] += sum(len(d) // 4 for _, _, d in anc)
            if not data:
                break
    except OSError:
        pass
t = threading.Thread(target=serve, daemon=True)
t.start()
fd = os.memfd_create("mailbox", os.MFD_ALLOW_SEALING)
os.ftruncate(fd, 4096)
import fcntl
fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
try:
    runtime.register_region(fd, "mailbox")
    out = {"registered": True}
except RegistrationError as e:
    out = {"error": str(e), "code": e.code}
t.join(3.0)
print(json.dumps({**out, **got}))
"""


@pytest.fixture(scope="module")
def lab():
    from conftest import needs_root
    needs_root()
    with Lab("p" + uuid.uuid4().hex[:6], hosts=1, nodes=1, agents=True) as lab:
        yield lab


def lab_exec(lab, *cmd, root=False, **kw):
    argv = [PY, "-m", "backdoors", "lab", "exec", "n0", "--name", lab.name,
            *(["--root"] if root else []), "--", *cmd]
    return subprocess.Popen(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def run(lab, code, *args, root=False) -> dict:
    p = lab_exec(lab, PY, "-c", code, *args, root=root)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    return json.loads(out)


def test_only_the_agent_can_hand_sessions_to_a_recovery_server_in_the_node(lab):
    path = str(lab.node_run_dir("n0") / "adopt-9999.sock")
    server = lab_exec(lab, PY, "-c", SERVER, path, stdin=subprocess.PIPE)
    try:
        assert server.stdout.readline().strip() == "ready", server.stderr.read()
        service = run(lab, HOSTILE, path)
        node_root = run(lab, HOSTILE, path, root=True)
        # the host, as the agent connects (root, outside the node's namespaces), passes the
        # check: this hand-over is judged on its CB (not one), not refused unread
        cb = cb_memfd("cb", b"\0" * 4096)
        with AdoptionClient(path) as client:
            with pytest.raises(AdoptionError) as host:
                import socket
                with socket.create_server(("127.0.0.1", 0)) as ls, \
                        socket.create_connection(ls.getsockname()) as tcp:
                    client.hand_over(tcp, cb, Handover("cd" * 16, 0, 0))
        out, err = server.communicate("stop\n", timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    for who, seen in (("service uid", service), ("node root", node_root)):
        assert seen["error"] and "hand-over refused: the peer (pid" in seen["error"], (who, seen)
        assert "is a process of this node" in seen["error"], (who, seen)
        assert f"uid {seen['uid']})" in seen["error"]
    assert service["uid"] == 1000 and node_root["uid"] == 0
    assert "hand-over refused" not in str(host.value) and "cdcd" in str(host.value)
    result = json.loads(out.splitlines()[-1])
    assert result == {"refused": 2, "received": []}, err
    assert err.count("refused a connection to") == 2, err


def test_a_process_that_replaces_agent_sock_receives_nothing(lab):
    """Last in this module: the node's agent.sock is gone afterwards."""
    seen = run(lab, REPLACE_AGENT_SOCK)
    assert seen["code"] == "not_agent", seen
    assert "the listener is not the agent" in seen["error"] and "nothing was sent" in seen["error"]
    assert "is a process of this node" in seen["error"]
    assert seen["bytes"] == 0 and seen["fds"] == 0, seen
