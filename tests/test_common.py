"""The ground floor: framed IPC with descriptors, the stale-socket rule, process identity."""

import os
import socket
import subprocess
import sys

import pytest

from backdoors.common import ipc, procs, runtime


def test_frames_keep_their_descriptors_when_sent_back_to_back():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pipes = [os.pipe() for _ in range(3)]
    for i, (r, _) in enumerate(pipes):
        ipc.send(a, {"n": i, "pad": b"x" * (i * 50_000)}, [r] if i != 1 else [])
    reader = ipc.FrameReader(max_bytes=1 << 20, max_fds=2)
    got = [reader.read(b) for _ in range(3)]
    assert [len(f.fds) for f in got] == [1, 0, 1]
    for frame, (r, w) in zip(got, pipes):
        if frame.fds:
            os.write(w, b"!")
            assert os.read(frame.fds[0], 1) == b"!"
        frame.close_fds()
    a.close()
    with pytest.raises(ipc.PeerClosed):
        reader.read(b)
    b.close()


def test_a_partial_frame_is_kept_between_reads():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setblocking(False)
    frame = ipc.pack({"op": "x"})
    reader = ipc.FrameReader(max_bytes=100)
    previous = 0
    for cut in (2, ipc.HEADER, len(frame) - 1):
        a.send(frame[previous:cut])
        previous = cut
        assert reader.read(b) is None and reader.partial
    a.send(frame[previous:])
    assert reader.read(b).payload == frame[ipc.HEADER:] and not reader.partial
    a.close(), b.close()


def test_a_frame_over_the_bound_is_refused():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ipc.send(a, b"y" * 2000)
    with pytest.raises(ipc.FrameError, match="exceeds 1000"):
        ipc.recv(b, max_bytes=1000)
    a.close(), b.close()


def test_stale_socket_rule(tmp_path):
    path = str(tmp_path / "s.sock")
    ipc.remove_stale(path)  # nothing there
    live = ipc.listen(path, mode=0o600, backlog=1)
    with pytest.raises(ipc.SocketInUse):
        ipc.remove_stale(path)
    live.close()  # the file stays behind, nobody listens
    ipc.remove_stale(path)
    assert not os.path.exists(path)
    open(path, "w").close()
    with pytest.raises(ipc.NotASocket):
        ipc.remove_stale(path)


def test_process_identity():
    me = procs.read_process(os.getpid())
    assert procs.alive(os.getpid()) and procs.is_same(os.getpid(), me.start_time)
    assert not procs.is_same(os.getpid(), me.start_time + 1.0)
    child = subprocess.Popen([sys.executable, "-c", "print('ready', flush=True)"],
                             stdout=subprocess.PIPE)
    assert procs.read_line(child, 10.0) == "ready"
    child.stdout.close()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie now
    assert not procs.alive(child.pid)
    child.wait()
    assert not procs.alive(child.pid)


def test_runtime_paths_follow_the_environment():
    env = runtime.service_env(runtime.agent_socket("/run/bd", "n0"))
    assert env == {"BACKDOORS_AGENT_SOCKET": "/run/bd/n0/agent.sock",
                   "BACKDOORS_ADOPT_DIR": "/run/bd/n0"}
    assert runtime.adoption_socket(7100, env) == "/run/bd/n0/adopt-7100.sock"
    assert runtime.adoption_socket(7100, {**env, "BACKDOORS_ADOPT_SOCKET": "/a.sock"}) == "/a.sock"
    assert runtime.adoption_socket(7100, {}) is None


def test_ready_takes_descriptors_above_select_limit():
    """An agent with many nodes holds more than 1024 descriptors: ipc.ready (poll) takes
    those select(2) refuses (the registration check failed there at 128 nodes)."""
    import os
    import resource
    import select

    import pytest

    from backdoors.common.ipc import ready

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip("needs a descriptor limit of 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    r, w = os.pipe()
    high = os.dup2(r, 1500)
    try:
        assert not ready(high)
        os.write(w, b"x")
        assert ready(high) and ready(w, select.POLLOUT)
    finally:
        for fd in (high, r, w):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_listen_never_changes_the_mode_of_what_a_symlink_swapped_in_names(tmp_path, monkeypatch):
    """Whoever may write the socket's directory (a node, in its run directory) can swap the
    bound socket for a symlink between bind and chmod: the mode must not follow it."""
    victim = tmp_path / "keys"
    victim.write_text("secret")
    victim.chmod(0o600)
    path = tmp_path / "agent.sock"

    class Swapped(socket.socket):
        def bind(self, address):
            super().bind(address)
            os.rename(address, str(tmp_path / "moved.sock"))  # the node's move, right then
            os.symlink(victim, address)

    monkeypatch.setattr(ipc.socket, "socket", Swapped)
    with pytest.raises(ipc.NotASocket):
        ipc.listen(str(path), mode=0o666, backlog=1)
    assert victim.stat().st_mode & 0o777 == 0o600
