"""The agent survives its own crash: the fd store protocol, re-adoption of regions and
sessions, the keeper's restart and watchdog, registrars that register again, peers that
report a dead agent."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backdoors.agent.fdstore import PREFIX, AgentStore
from backdoors.agent.regions import Entry, RegionTable
from backdoors.agent.sessions import SessionTable
from backdoors.common import fdstore
from backdoors.common.fdstore import (Notifier, NotifyError, PassedFd, decode_name, encode_name,
                                      notify_listener, receive)
from backdoors.continuations.agent_link import AgentRegistrar
from backdoors.monitor.detectors import AgentDown, NodeView, evaluate
from backdoors.sensors import Region
from test_agent_support import agent_lab, prefix  # noqa: F401 - fixtures


def _wait(pred, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (v := pred()):
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("bdt-region", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    import fcntl
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.fixture
def listener():
    d = tempfile.mkdtemp(prefix="bdt-notify-")
    path = os.path.join(d, "notify")
    sock = notify_listener(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()
    os.unlink(path)
    os.rmdir(d)


@pytest.fixture
def tcp_pair():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    server.close()
    yield conn, client
    conn.close()
    client.close()


# -- the protocol ---------------------------------------------------------------------


def test_names_carry_metadata_within_systemds_rules():
    meta = {"t": "r", "n": "node-with-24-characters", "r": "cb-" + "x" * 61, "k": "cb",
            "w": False, "p": 4194304, "s": 1234567.89}
    name = encode_name(PREFIX, meta)
    assert fdstore.valid_name(name) and len(name) <= 255 and ":" not in name
    assert decode_name(name) == (PREFIX, meta)
    assert decode_name("unrelated") is None and decode_name("x.!!!") is None
    with pytest.raises(NotifyError, match="limit is 255"):
        encode_name(PREFIX, {"r": "y" * 400})
    assert not fdstore.valid_name("a:b") and not fdstore.valid_name("a\nb")


@given(st.text(max_size=300))
def test_a_name_is_valid_when_it_has_1_to_255_printable_ascii_characters_but_colon(name):
    assert fdstore.valid_name(name) == (
        0 < len(name) <= 255 and all(32 <= ord(c) <= 126 and c != ":" for c in name))


def test_fdstore_messages_carry_real_descriptors(listener):
    path, sock = listener
    fd = _memfd(b"kept across a crash")
    n = Notifier(path)
    try:
        assert n.store("bd1.abc", fd)
        msg = receive(sock)
        assert msg.fields == {"FDSTORE": "1", "FDNAME": "bd1.abc"} and msg.pid == os.getpid()
        assert len(msg.fds) == 1 and os.fstat(msg.fds[0]).st_ino == os.fstat(fd).st_ino
        assert os.pread(msg.fds[0], 100, 0) == b"kept across a crash"
        os.close(msg.fds[0])
        n.remove("bd1.abc")
        assert receive(sock).fields == {"FDSTOREREMOVE": "1", "FDNAME": "bd1.abc"}
        n.watchdog()
        assert receive(sock).fields == {"WATCHDOG": "1"}
        with pytest.raises(NotifyError):
            n.store("bad:name", fd)
    finally:
        n.close()
        os.close(fd)
    assert not Notifier(None, environ={}).enabled and not Notifier(None, environ={}).ready()


def test_watchdog_interval_from_the_environment():
    assert fdstore.watchdog_interval({"WATCHDOG_USEC": "800000"}) == 0.8
    assert fdstore.watchdog_interval({"WATCHDOG_USEC": "800000", "WATCHDOG_PID": "1"}) is None
    assert fdstore.watchdog_interval({}) is None


# -- re-adoption ----------------------------------------------------------------------


def _tables():
    return (RegionTable(["n0"], max_regions=8, max_region_bytes=1 << 20, max_node_bytes=1 << 22),
            SessionTable(["n0"], 16))


def test_a_new_agent_takes_back_regions_and_sessions(listener, tcp_pair):
    path, sock = listener
    regions, sessions = _tables()
    store = AgentStore(Notifier(path))
    store.attach(regions, sessions)
    fd = _memfd(b"box image")
    regions.add(Entry("n0", "app", "region", Region(fd), False, 4242, 99.5))
    os.close(fd)
    conn, client = tcp_pair
    sessions.hold("n0", "cb-s1", conn.fileno(), 4243)
    stored = [receive(sock) for _ in range(2)]
    assert all(m.fields["FDSTORE"] == "1" for m in stored)
    passed = [PassedFd(m.fds[0], m.fields["FDNAME"]) for m in stored]
    # the old agent is gone (its tables closed); the supervisor hands the fds to a new one
    regions.close()
    sessions.close()
    regions2, sessions2 = _tables()
    store2 = AgentStore(Notifier(path))
    back = store2.readopt(passed, regions2, sessions2)
    assert (back.regions, back.sessions, back.dropped) == (1, 1, [])
    entry = regions2.entries("n0")[0]
    assert (entry.name, entry.kind, entry.pid, entry.start_time) == ("app", "region", 4242, 99.5)
    assert entry.region.read(0, 9) == b"box image"
    held = sessions2.list("n0")[0]
    assert (held.name, held.pid) == ("cb-s1", 4243)
    assert held.sock.getpeername() == client.getsockname()
    # dropping them removes them from the store, under the names they were stored with
    store2.attach(regions2, sessions2)
    sessions2.release("n0", "cb-s1")
    regions2.remove("n0", "app")
    removed = {receive(sock).fields["FDNAME"] for _ in range(2)}
    assert removed == {p.name for p in passed}
    regions2.close()
    sessions2.close()
    store.close()
    store2.close()


def test_a_replaced_entry_is_stored_before_the_old_one_goes(listener, tcp_pair):
    """A server's own box over the agent's stand-in: the new file is stored first, so an
    agent killed between the two messages leaves both and the next one takes the newest.
    The same file held again as it was sends nothing; held again by another pid, it is
    removed first (the supervisor keeps one copy of a file)."""
    path, sock = listener
    regions, sessions = _tables()
    store = AgentStore(Notifier(path))
    store.attach(regions, sessions)
    stand_in, own = _memfd(b"stand-in"), _memfd(b"server's own")
    regions.add(Entry("n0", "cb-s1", "cb", Region(stand_in), False, 4242, 9.5))
    first = receive(sock)
    regions.add(Entry("n0", "cb-s1", "cb", Region(own), False, 4242, 9.5))
    second, removed = receive(sock), receive(sock)
    assert second.fields["FDSTORE"] == "1" and second.fields["FDNAME"] != first.fields["FDNAME"]
    assert removed.fields == {"FDSTOREREMOVE": "1", "FDNAME": first.fields["FDNAME"]}
    conn, _ = tcp_pair
    sessions.hold("n0", "cb-s1", conn.fileno(), 4242)
    held = receive(sock)
    sessions.hold("n0", "cb-s1", conn.fileno(), 4242)  # the server's own hold, as it was
    sessions.hold("n0", "cb-s1", conn.fileno(), 5151)  # a successor's
    gone, again = receive(sock), receive(sock)
    assert gone.fields == {"FDSTOREREMOVE": "1", "FDNAME": held.fields["FDNAME"]}
    assert again.fields["FDSTORE"] == "1"
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        receive(sock)  # nothing else was sent
    # killed between storing `second` and removing `first`: both reach the next agent
    passed = [PassedFd(m.fds[0], m.fields["FDNAME"]) for m in (second, first, again)]
    regions2, sessions2 = _tables()
    sock.settimeout(5)
    back = AgentStore(Notifier(path)).readopt(passed, regions2, sessions2)
    assert (back.regions, back.sessions, back.dropped) == (1, 1, [])
    assert receive(sock).fields == {"FDSTOREREMOVE": "1", "FDNAME": first.fields["FDNAME"]}
    (entry,) = regions2.entries("n0")
    assert entry.region.read(0, 12) == b"server's own"
    assert sessions2.list("n0")[0].pid == 5151
    for fd in (stand_in, own):
        os.close(fd)
    for table in (regions, sessions, regions2, sessions2):
        table.close()
    store.close()


def test_entries_that_no_longer_fit_are_dropped_from_the_store(listener):
    path, sock = listener
    regions, sessions = _tables()
    fd = _memfd(b"x")
    name = encode_name(PREFIX, {"t": "r", "n": "gone-node", "r": "app", "k": "region", "w": False,
                                "p": 1, "s": 0.0})
    back = AgentStore(Notifier(path)).readopt([PassedFd(fd, name)], regions, sessions)
    assert back.regions == 0 and len(back.dropped) == 1
    assert receive(sock).fields == {"FDSTOREREMOVE": "1", "FDNAME": name}
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by readopt


# -- the keeper -----------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from backdoors.common.fdstore import Notifier, listen_fds
    out = sys.argv[1]
    passed = listen_fds()
    n = Notifier()
    if passed:
        with open(out, "a") as f:
            for p in passed:
                f.write(f"{os.getpid()} {p.name} {os.pread(p.fd, 100, 0).decode()}\\n")
    else:
        fd = os.memfd_create("kept")
        os.write(fd, b"content")
        n.store("region.one", fd)
    n.ready()
    mode = sys.argv[2]
    if mode == "crash" and not passed:
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang" and not passed:
        os.kill(os.getpid(), signal.SIGSTOP)
    while True:
        n.watchdog()
        time.sleep(0.1)
""")


@pytest.fixture
def keeper_run(tmp_path):
    procs = []

    def start(mode):
        out = tmp_path / "out"
        proc = subprocess.Popen(
            [sys.executable, "-m", "backdoors.lab.keeper", "--notify", str(tmp_path / "notify"),
             "--pid-file", str(tmp_path / "pid"), "--watchdog-ms", "500", "--",
             sys.executable, "-c", CHILD, str(out), mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "ready" and ready["pid"] == proc.pid
        return proc, out, tmp_path / "pid"

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not (tmp_path / "notify").exists() and not (tmp_path / "pid").exists()


@pytest.mark.parametrize("mode", ["crash", "hang"])
def test_the_keeper_restarts_its_service_with_the_stored_fds(keeper_run, mode):
    """A crashed (SIGKILL) or hung (SIGSTOP: no watchdog ping) service is replaced, and
    the replacement gets the stored memfd back as LISTEN_FDS with its name."""
    _, out, pid_file = keeper_run(mode)
    line = _wait(lambda: out.exists() and out.read_text(), what="the restarted child")
    pid, name, content = line.split()
    assert (name, content) == ("region.one", "content")
    state = json.loads(pid_file.read_text())
    assert state["pid"] == int(pid) and state["restarts"] == 1 and state["stored"] == 1


@pytest.mark.root
@pytest.mark.parametrize("queue", [None, 512], ids=["kernel-default", "netns-512"])
def test_the_keepers_notify_socket_queues_what_its_namespace_allows(tmp_path, unique, queue):
    """systemd raises net.unix.max_dgram_qlen to 512, so its notify socket queues that many
    messages while it is busy; the lab's keeper makes its socket in the namespace given
    (--netns, raised so by the lab) and queues as many, else the machine's own (the
    kernel's default is 10)."""
    from backdoors.net import netns

    name = f"bdt-{unique}-kq"
    netns.create(name)
    args = []
    if queue:
        netns.set_sysctl(name, "net/unix/max_dgram_qlen", queue)
        args = ["--netns", name]
    notify = tmp_path / "notify"
    proc = subprocess.Popen(
        [sys.executable, "-m", "backdoors.lab.keeper", "--notify", str(notify), *args, "--",
         sys.executable, "-c", "import time; time.sleep(60)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sender.setsockopt(socket.SOL_SOCKET, 32, 8 << 20)  # SO_SNDBUFFORCE: the queue limits
    try:
        _wait(lambda: notify.exists(), what="the notify socket")
        os.kill(proc.pid, signal.SIGSTOP)  # busy: it reads nothing meanwhile
        sent = 0
        try:
            while sent < 600:
                sender.sendto(b"WATCHDOG=1", socket.MSG_DONTWAIT, str(notify))
                sent += 1
        except BlockingIOError:
            pass
        with open("/proc/sys/net/unix/max_dgram_qlen") as f:
            machine = int(f.read())
        assert sent == (queue or machine) + 1  # (the kernel lets one more in)
    finally:
        sender.close()
        os.kill(proc.pid, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        netns.remove(name)


# -- registrar reconnection -----------------------------------------------------------


class _Box:
    def __init__(self, name):
        self.name, self.session, self.registered = name, name, False
        self.fd = 99
        self.conn = self

    def fileno(self):
        return 98


class _Client:
    def __init__(self):
        self.calls = []

    def register_region(self, fd, name, writable=False, *, kind="region"):
        self.calls.append(("register", name))
        return {}

    def hold_socket(self, fd, *, name):
        self.calls.append(("hold", name))
        return {}

    def release(self, name):
        self.calls.append(("release", name))
        return {}


def test_registrars_register_again_when_the_agent_comes_back(tmp_path):
    path = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    client = _Client()
    reg = AgentRegistrar(client, socket_path=path)
    kept, ended = _Box("cb-a"), _Box("cb-b")
    assert reg.attach(kept) and reg.attach(ended)
    reg.detach(ended)
    client.calls.clear()
    # the agent dies and a new one binds a new socket at the same path
    listener.close()
    os.unlink(path)
    time.sleep(0.3)  # as a real restart does: a new socket, bound later (another mtime)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    _wait(lambda: len(client.calls) >= 2, 5, "registering again")
    assert client.calls == [("register", "cb-a"), ("hold", "cb-a")]
    assert reg.reattached == 1
    reg._watch.close()
    listener.close()


def test_a_registration_the_agents_death_cut_short_is_made_again(tmp_path):
    """The agent dies between a box's region and its socket: nothing is released (the
    new agent may have taken the region back from the store) and the box is registered
    again when the agent is back. A refusal is released and not registered again."""
    from backdoors.errors import RegistrationError
    path = str(tmp_path / "agent.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    client = _Client()
    verdicts = {"cb-cut": RegistrationError("agent socket: Connection reset", "no_agent"),
                "cb-no": RegistrationError("the agent refused hold_socket")}

    def hold_socket(fd, *, name):
        client.calls.append(("hold", name))
        if name in verdicts:
            raise verdicts.pop(name)
        return {}
    client.hold_socket = hold_socket
    reg = AgentRegistrar(client, socket_path=path)
    cut, refused = _Box("cb-cut"), _Box("cb-no")
    assert reg.attach(cut) is True  # the agent may hold it: released when it ends
    assert reg.attach(refused) is False
    assert ("release", "cb-cut") not in client.calls
    assert client.calls[-1] == ("release", "cb-no")
    client.calls.clear()
    listener.close()
    os.unlink(path)
    time.sleep(0.3)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    _wait(lambda: len(client.calls) >= 2, 5, "registering again")
    assert client.calls == [("register", "cb-cut"), ("hold", "cb-cut")]
    assert reg.reattached == 1 and cut.registered
    reg._watch.close()
    listener.close()


# -- peers ----------------------------------------------------------------------------


def test_agent_down_needs_the_monitor_and_a_peer_to_agree():
    d = AgentDown()
    seen = NodeView("n1", "h1", 10.0, agent_ok=False, agent_silent_s=0.4, down_reports=["h0"])
    hit = evaluate(d, 0, seen)
    assert hit is not None and "peers h0" in hit.summary
    assert evaluate(d, 0, NodeView("n1", "h1", 10.0, agent_ok=False)) is None  # a partition?
    assert evaluate(d, 0, NodeView("n1", "h1", 10.0, down_reports=["h0"])) is None
    assert evaluate(AgentDown(min_peers=2), 0, seen) is None


@pytest.mark.root
def test_a_killed_agent_is_restarted_with_its_sessions_and_reported_by_its_peer(root):
    """Lab end to end: the agent of h1 is SIGSTOPped; its peer h0 reports it (agent-down
    naming h0), the keeper's watchdog replaces it, and the new agent holds the region the
    node's service registered, taken back from the fd store; so does one started again
    after a clean SIGTERM."""
    from backdoors.lab import Lab
    from backdoors.lab.agents import agent_pid
    from backdoors.scenarios.labkit import unique_name
    from backdoors.scenarios.recovery import monitor_for

    with Lab(unique_name("ar"), hosts=2, nodes=2, agents=True, services=False) as lab:
        lab.start_service("n1", recoverable=True)
        with lab.agent_client("h1") as c:
            _wait(lambda: any(r.name.startswith("rsvc") for r in c.regions("n1")), 20,
                  "the service's box")
        with lab.agent_client("h0") as c:
            assert _wait(lambda: c.call("peers")["h1"]["answering"], 10, "h0 seeing h1")
        with monitor_for(lab) as mon:
            mon.wait_ready(timeout=10)
            old = agent_pid(lab.plan, lab.plan.host("h1"))
            os.kill(old, signal.SIGSTOP)
            inc = mon.wait_for(lambda i: i.rule == "agent-down", 10)
            assert inc is not None and inc.host == "h1"
            assert "peers h0" in inc.detectors[0].summary
            new = _wait(lambda: (p := agent_pid(lab.plan, lab.plan.host("h1"))) != old and p,
                        10, "a new agent")

            def regions():
                try:
                    with lab.agent_client("h1") as c:
                        return [r.name for r in c.regions("n1")]
                except Exception:  # noqa: BLE001 - not serving yet
                    return None
            names = _wait(regions, 10, "the new agent answering")
            assert any(n.startswith("rsvc") for n in names), names
            with lab.agent_client("h1") as c:
                assert c.ping().pid == new
            # a clean stop (an upgrade's restart) keeps the store too
            os.kill(new, signal.SIGTERM)
            _wait(lambda: agent_pid(lab.plan, lab.plan.host("h1")) not in (new, None), 10,
                  "the agent started again")
            names = _wait(regions, 10, "the restarted agent answering")
            assert any(n.startswith("rsvc") for n in names), names


@pytest.mark.root
def test_services_register_their_boxes_again_with_an_agent_without_store(agent_lab):
    """An agent run without a supervisor (no fd store) starts empty: the node's service
    notices the new agent's socket and registers its Sensor Box again by itself."""
    from test_agent_support import daemon

    lab = agent_lab(start=False)
    with daemon(lab) as (proc, _):
        lab.start_app("n0")
        assert "app" in lab.client().sensors("n0").boxes
        proc.kill()
        proc.wait()
    with daemon(lab) as (proc, _):
        def boxes():
            with lab.client() as c:
                return "app" in c.sensors("n0").boxes
        _wait(boxes, 10, "the box registered again")


@pytest.mark.root
def test_the_agent_tells_its_supervisor(agent_lab, listener, monkeypatch):
    """A real agent under a supervisor: READY=1, watchdog pings, FDSTORE=1 of a registered
    Sensor Box (the very file the agent maps), FDSTOREREMOVE=1 when it is dropped."""
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    lab = agent_lab()
    seen = []

    def until(pred):
        while True:
            msg = receive(sock)
            seen.append(msg)
            if pred(msg.fields):
                return msg

    try:
        until(lambda f: f.get("READY") == "1")
        until(lambda f: f.get("WATCHDOG") == "1")
        lab.start_app("n0")
        stored = until(lambda f: f.get("FDSTORE") == "1")
        prefix, meta = decode_name(stored.fields["FDNAME"])
        assert prefix == PREFIX and (meta["t"], meta["n"], meta["r"], meta["k"]) == \
            ("r", "n0", "app", "sensorbox")
        entry = next(e for e in lab.agent.agent.regions.entries("n0") if e.name == "app")
        assert os.fstat(stored.fds[0]).st_ino == os.fstat(entry.region.fd).st_ino
        assert meta["p"] == entry.pid and meta["s"] == entry.start_time
        lab.agent.agent.regions.remove("n0", "app")
        removed = until(lambda f: f.get("FDSTOREREMOVE") == "1")
        assert removed.fields["FDNAME"] == stored.fields["FDNAME"]
    finally:
        for msg in seen:
            for fd in msg.fds:
                os.close(fd)


def test_a_nodes_service_is_its_first_registrant_and_a_new_agent_keeps_it():
    """RegionTable.service: the first process to register while no service runs; one that
    registers beside it does not take its place, one that registers after its end does.
    A new agent readopts the regions in whatever order the store hands them over: the
    services it kept are taken back over what that order claimed."""
    from backdoors.common.procs import read_process

    me = (os.getpid(), read_process(os.getpid()).start_time)
    parent = (os.getppid(), read_process(os.getppid()).start_time)  # runs beside it
    gone = (2**22 + 1, 1.0)  # above pid_max: no process

    def add(table, name, who):
        fd = _memfd(b"r")
        table.add(Entry("n0", name, "region", Region(fd), False, *who))
        os.close(fd)

    regions, _ = _tables()
    kept = []
    regions.service_observer = kept.append
    add(regions, "svc", me)
    add(regions, "intruder", parent)
    assert regions.service("n0") == me and kept == [{"n0": me}]
    again, _ = _tables()  # the next agent: the intruder's region readopted first
    add(again, "intruder", parent)
    add(again, "svc", me)
    assert again.service("n0") == parent
    again.take_back_services({**kept[-1], "not-a-node": gone})
    assert again.service("n0") == me
    ended, _ = _tables()
    add(ended, "svc", gone)
    add(ended, "next", me)
    assert ended.service("n0") == me
    for table in (regions, again, ended):
        table.close()


# A service: registers a Sensor Box "svc"; after a line on stdin, registers "svc2" and
# unregisters "svc" (its regions then all newer in the fd store than what registered
# between); prints a line after each step, then holds until stdin ends.
SERVICE = """
import sys
from backdoors.common.runtime import register_box, unregister
from backdoors.sensors import SensorBox
first = SensorBox.create("svc")
register_box(first)
print("registered", flush=True)
sys.stdin.readline()
again = SensorBox.create("svc2")
register_box(again)
unregister("svc")
print("again", flush=True)
sys.stdin.readline()
"""


@pytest.mark.root
def test_a_restarted_agent_keeps_the_nodes_service_not_a_process_registered_beside_it(root):
    """Lab end to end: the node's service registered first, a hostile process beside it,
    then the service registered anew (so the fd store hands the new agent the hostile
    process's region first); the agent is SIGKILLed and its keeper starts another, which
    takes the regions back: the service is still the service, the other process not."""
    from backdoors.lab import Lab
    from backdoors.lab.agents import agent_pid
    from backdoors.scenarios.labkit import unique_name

    with Lab(unique_name("ar"), hosts=1, nodes=1, agents=True, services=False) as lab:
        service = lab.run_in_node("n0", [sys.executable, "-c", SERVICE],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert service.stdout.readline().strip() == b"registered"
        intruder = lab.run_in_node("n0", [sys.executable, "-m", "backdoors.lab.hogs", "memory",
                                          "--rate-mb", "0.1", "--cap-mb", "1",
                                          "--register", "intruder"])

        def registered(names):
            try:
                with lab.agent_client("h0") as c:
                    if {r.name for r in c.regions("n0")} >= names:
                        return {r.pid: r.registered for r in c.processes("n0").rows
                                if r.pid in (service.pid, intruder.pid)}
            except Exception:  # noqa: BLE001 - the new agent not serving yet
                return None
            return None

        want = {service.pid: True, intruder.pid: False}
        assert _wait(lambda: registered({"svc", "intruder"}), 20, "both registered") == want
        service.stdin.write(b"\n")
        service.stdin.flush()
        assert service.stdout.readline().strip() == b"again"
        assert _wait(lambda: registered({"svc2", "intruder"}), 10, "svc2") == want
        old = agent_pid(lab.plan, lab.plan.host("h0"))
        os.kill(old, signal.SIGKILL)
        _wait(lambda: agent_pid(lab.plan, lab.plan.host("h0")) not in (old, None), 10,
              "a new agent")
        assert _wait(lambda: registered({"svc2", "intruder"}), 10, "the new agent") == want
        service.stdin.close()
        service.wait(10)


def test_the_agents_durable_state_is_kept_newest_generation_first(listener, tcp_pair):
    """`keep` stores bytes in a memfd (new generation before the old one is removed); a
    new agent takes the newest back and removes older generations left by a crash; a
    restored session's stream offsets travel in its name."""
    from backdoors.agent.sessions import since_from

    path, sock = listener
    regions, sessions = _tables()
    store = AgentStore(Notifier(path))
    store.keep("addresses", b'{"n0": ["10.77.100.1/16"]}')
    first = receive(sock)
    store.keep("addresses", b'{"n0": ["10.77.100.1/16", "10.77.100.2/16"]}')
    second, removed = receive(sock), receive(sock)
    assert removed.fields == {"FDSTOREREMOVE": "1", "FDNAME": first.fields["FDNAME"]}
    store.attach(regions, sessions)
    conn, _ = tcp_pair
    sessions.hold("n0", "cb-s1", conn.fileno(), 4243, since_from(5000, 17))
    held = receive(sock)
    # a crash between a store and its remove: both generations reach the next agent
    passed = [PassedFd(m.fds[0], m.fields["FDNAME"]) for m in (second, first, held)]
    regions2, sessions2 = _tables()
    back = AgentStore(Notifier(path)).readopt(passed, regions2, sessions2)
    assert back.state == {"addresses": b'{"n0": ["10.77.100.1/16", "10.77.100.2/16"]}'}
    assert receive(sock).fields == {"FDSTOREREMOVE": "1", "FDNAME": first.fields["FDNAME"]}
    (s,) = sessions2.list("n0")
    assert (s.since.handed, s.since.send_queue, s.since.read) == (5000, b"", 17)
    for table in (regions, sessions, regions2, sessions2):
        table.close()
    store.close()


def test_recovery_takes_back_limbo_and_the_addresses_its_nodes_took_over():
    """What `Recovery.keep` kept, a new agent's Recovery takes back (for configured nodes
    only; others are dropped from the store), and keeps again as it changes."""
    import msgspec

    from backdoors.agent.keys import new_identity
    from backdoors.agent.protocol import MovedSession
    from backdoors.agent.recovery import Recovery, Unsure

    kept: dict = {}
    r = Recovery("/nonexistent", identity=new_identity("h0"), peers={}, monitors={})
    r.keep = kept.__setitem__
    moved = [MovedSession("cb-a", b"tcp", b"cb")]
    r.limbo["n0"] = moved
    r._keep_limbo("n0")
    r._adopted("n0", "10.77.100.1/16")
    r._adopted("gone", "10.77.100.3/16")
    unsure = Unsure("10.99.0.2:7700", "h1", "n1")  # where an evacuate's answer was lost
    r._set_unsure("n0", unsure)
    r2 = Recovery("/nonexistent", identity=new_identity("h0"), peers={}, monitors={})
    r2.keep = kept.__setitem__
    dropped = r2.take_back({**kept, "limbo.gone": msgspec.msgpack.encode(moved),
                            "limbo.n0x": b"\xc1", "unsure.n0x": b"\xc1"}, {"n0"})
    assert r2.limbo == {"n0": moved}
    assert r2.unsure == {"n0": unsure}
    assert r2.adopted_addresses == {"n0": {"10.77.100.1/16"}}
    assert len(dropped) == 4 and kept["limbo.gone"] is None and kept["limbo.n0x"] is None
    assert kept["unsure.n0x"] is None
    assert kept["addresses"] == b'{"n0": ["10.77.100.1/16"]}'
    r2._set_unsure("n0", None)
    assert kept["unsure.n0"] is None and r2.unsure == {}
    # the spent warrants (kept by adopt's final batch), and a bad copy dropped saying why
    r.warrants.spend(frozenset({("m1", b"n" * 16)}))
    r3 = Recovery("/nonexistent", identity=new_identity("h0"), peers={}, monitors={})
    r3.keep = kept.__setitem__
    assert r3.take_back({"warrants": r.warrants.encode()}, {"n0"}) == []
    assert r3.warrants.encode() == r.warrants.encode()
    assert r3.take_back({"warrants": b"{"}, {"n0"})[0].startswith("warrants: not the spent")
    assert kept["warrants"] is None
