"""The recovery harness of the Continuation Box tests, and its own checks.

It plays the agent, for real but without an agent: example servers run as processes in
private network namespaces; a recovery freezes (SIGSTOP) or kills (SIGKILL) the server
holding the session, takes the network lock (the old node's link down), dumps the
session socket with TCP_REPAIR from a duplicate taken with pidfd_getfd (before the
crash, in the crash case: as the agent holds one), reads the CB from its memfd, moves
the service address, restores the socket in the recovery node and hands socket + CB to
the recovery server through its adoption socket.

    netns sw: bridge br0, one veth port per node
      c  10.91.0.1   client (test threads, curl)
      a  10.91.0.100 (the service address, VIP) first server
      b  10.91.0.2   recovery node
      d  10.91.0.3   second recovery node

Other test modules import RecoveryLab and the `rlab` fixture from here.
"""

from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from backdoors.continuations import AdoptionClient, CbFormatError, Handover, read_cb
from backdoors.continuations.image import CbImage
from backdoors.net import add_address, add_bridge, add_veth, del_address, gratuitous_arp, netns, set_up
from backdoors.tcprepair import TcpState, repair, restore

CLIENT_IP = "10.91.0.1"
VIP = "10.91.0.100"
NODE_IPS = {"a": VIP, "b": "10.91.0.2", "d": "10.91.0.3"}
PORT = 8080
_SYS_PIDFD_GETFD = 438
_libc = ctypes.CDLL(None, use_errno=True)


def pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate of descriptor `fd` of process `pid` (works on stopped processes)."""
    pidfd = os.pidfd_open(pid)
    try:
        new = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return new
    finally:
        os.close(pidfd)


@dataclass
class Held:
    """A session as the agent holds it: a duplicate of its socket, its CB memfd."""

    sock: socket.socket
    cb_fd: int
    session: str

    def close(self) -> None:
        self.sock.close()
        if self.cb_fd >= 0:
            os.close(self.cb_fd)
            self.cb_fd = -1


class Server:
    """An example server process running in a node's network namespace (`example`: a
    module of backdoors.examples, or a full module name); `nofile`: its RLIMIT_NOFILE."""

    def __init__(self, lab: RecoveryLab, node: str, example: str, *args: str,
                 nofile: int | None = None):
        self.node, self.example = node, example
        self.adopt = os.path.join(lab.tmp, f"{node}-{len(lab.servers)}.adopt")
        self.log_path = os.path.join(lab.tmp, f"{node}-{len(lab.servers)}.log")
        self._log = open(self.log_path, "wb")
        module = example if "." in example else f"backdoors.examples.{example}"
        limit = [] if nofile is None else ["prlimit", f"--nofile={nofile}"]  # it execs too
        cmd = ["nsenter", f"--net={netns.path(lab.ns[node])}", *limit, sys.executable,
               "-m", module, "--port", str(PORT), "--adopt", self.adopt, *args]
        env = {k: v for k, v in os.environ.items() if k != "BACKDOORS_AGENT_SOCKET"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=env)
        self.pid = self.proc.pid  # nsenter (and prlimit) exec python: same process
        lab.servers.append(self)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 15) -> None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if b"listening" not in line:
            self.kill()
            pytest.fail(f"{self.example} in {self.node} did not start: {line!r}\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")[-3000:]

    def freeze(self) -> None:
        """Stop the server; returns once all its threads have stopped (a signal is
        delivered asynchronously: without the wait the server could read on for a while)."""
        os.kill(self.pid, signal.SIGSTOP)
        os.waitid(os.P_PID, self.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            os.kill(self.pid, signal.SIGCONT)
        self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        self.proc.stdout.close()
        self._log.close()

    def sessions(self) -> list[Held]:
        """Duplicates of every session socket and CB memfd of this process, paired."""
        socks, boxes = [], []
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{name}")
            except FileNotFoundError:
                continue
            if target.startswith("socket:"):
                sock = socket.socket(fileno=pidfd_getfd(self.pid, int(name)))
                if sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM and _peer(sock):
                    socks.append(sock)
                else:
                    sock.close()
            elif target.startswith(("/memfd:bdcb:", "/memfd:bdhand:")):  # a box, or a handed copy taken over
                fd = pidfd_getfd(self.pid, int(name))
                try:
                    boxes.append((read_cb(fd), fd))
                except CbFormatError:  # caught being created: its header is not there yet
                    os.close(fd)
        held = []
        for sock in socks:  # (both ends: a server's channels to one peer share its address)
            match = [(img, fd) for img, fd in boxes
                     if (img.local, img.remote) == (sock.getsockname(), _peer(sock))]
            if match:
                held.append(Held(sock, match[0][1], match[0][0].session_id))
                boxes.remove(match[0])
            else:
                sock.close()
        for _, fd in boxes:
            os.close(fd)
        return held


def _peer(sock: socket.socket):
    try:
        return sock.getpeername()
    except OSError:
        return None


@dataclass
class Move:
    """What one recovery did: the dumped socket state, the CB as read, the new socket."""

    state: TcpState
    image: CbImage
    sock: socket.socket

    @property
    def skip(self) -> int:
        return self.image.plan(self.state.handed, self.state.read).skip

    @property
    def replay(self) -> int:
        return self.state.read - self.image.export.received


class RecoveryLab:
    """The namespaces, servers and held descriptors of one test; close() removes all."""

    def __init__(self, unique: str):
        self.prefix = f"bdt-{unique}-cb-"
        self.tmp = tempfile.mkdtemp(prefix="bdt-cb-")
        self.ns = {n: self.prefix + n for n in ("sw", "c", "a", "b", "d")}
        self.servers: list[Server] = []
        self.held: list[socket.socket | Held] = []
        self.vip_at = "a"
        try:
            for name in self.ns.values():
                netns.create(name)
            add_bridge(self.ns["sw"], "br0")
            for node, ip in [("c", CLIENT_IP), *NODE_IPS.items()]:
                add_veth(self.ns["sw"], node, self.ns[node], "eth0", bridge="br0")
                add_address(self.ns[node], "eth0", f"{ip}/24")
                if node != "c":
                    # ARP requests from the node's own address, never from the service
                    # address: a restored socket resolving the client must not announce
                    # the address before the gratuitous ARP does (see recover_all).
                    with netns.enter(self.ns[node]):
                        Path("/proc/sys/net/ipv4/conf/eth0/arp_announce").write_text("2")
        except BaseException:
            self.close()
            raise

    def server(self, node: str, example: str, *args: str, nofile: int | None = None) -> Server:
        return Server(self, node, example, *args, nofile=nofile)

    def connect(self, timeout: float = 5) -> socket.socket:
        """A client socket in netns c connected to the service address."""
        sock = netns.socket_in(self.ns["c"])
        self.held.append(sock)
        sock.settimeout(timeout)
        sock.connect((VIP, PORT))
        sock.settimeout(None)
        return sock

    def run_in_client(self, *cmd: str, **kw) -> subprocess.Popen:
        """A command (e.g. curl) in the client's namespace."""
        return subprocess.Popen(["nsenter", f"--net={netns.path(self.ns['c'])}", *cmd], **kw)

    def lock(self, node: str) -> None:
        """The network lock: `node`'s link goes down; its segments no longer go anywhere."""
        set_up(self.ns[node], "eth0", False)

    def recover(self, held: Held, to: Server, *, since: TcpState | None = None) -> Move:
        """Recover one session (see recover_all)."""
        return self.recover_all([held], to, since=[since])[0]

    def recover_all(self, held: list[Held], to: Server, *,
                    since: list[TcpState | None] | None = None) -> list[Move]:
        """Lock the node holding the service address, dump every session in `held`,
        restore them all in `to`'s node with the address moved there, and hand them to
        `to`. `since[i]`: the TcpState session i was last restored from, if any."""
        self.lock(self.vip_at)
        dumped = []
        for h, prev in zip(held, since or [None] * len(held)):
            with repair(h.sock) as handle:
                dumped.append((handle.dump(since=prev), read_cb(h.cb_fd)))
                handle.close()
        # The address first (restore binds to it), the announcement only once every
        # session is restored: until the gratuitous ARP the client still sends to the
        # old, locked node, so no segment reaches the new node before its socket exists
        # (the new node would answer with a reset). The nodes' arp_announce=2 keeps the
        # restored sockets' own ARP requests from announcing the address early.
        old, self.vip_at = self.vip_at, to.node
        if old != to.node:
            del_address(self.ns[old], "eth0", f"{VIP}/24")
            add_address(self.ns[to.node], "eth0", f"{VIP}/24")
        moves = []
        with netns.enter(self.ns[to.node]):
            for state, image in dumped:
                new = restore(state)
                self.held.append(new)  # the agent's duplicate of the restored socket
                moves.append(Move(state, image, new))
        if old != to.node:
            gratuitous_arp(self.ns[to.node], "eth0", VIP, 2)
        with AdoptionClient(to.adopt) as agent:
            errors = agent.hand_over_all([
                (move.sock, h.cb_fd, Handover.from_tcp_state(move.image.session_id, move.state))
                for h, move in zip(held, moves)
            ])
        for h in held:
            h.close()
        assert errors == [None] * len(held), errors
        return moves

    def logs(self) -> str:
        return "\n".join(f"--- {s.example}@{s.node}\n{s.log()}" for s in self.servers)

    def close(self) -> None:
        for server in self.servers:
            try:
                server.close()
            except Exception:  # noqa: BLE001 - tear down the rest regardless
                pass
        for item in self.held:
            item.close()
        netns.reap(self.prefix)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def rlab(root, unique):
    lab = RecoveryLab(unique)
    try:
        yield lab
    finally:
        lab.close()
        left = netns.names(f"bdt-{unique}")
        assert not left, f"namespaces left behind: {left}"


# ------------------------------------------------------------ streams and accounting


def numbered(count: int) -> bytes:
    """`count` bytes of 8-byte big-endian block numbers: a lost or repeated block shows."""
    blocks = (count + 7) // 8
    return b"".join(struct.pack(">Q", n) for n in range(blocks))[:count]


def account(got: bytes, want: bytes) -> dict:
    """bytes_lost and bytes_duplicated of a received numbered stream, and where it broke.

    Blocks are counted by number, so a gap (lost) and a repeat (duplicated) are told
    apart; a stream that is not block-aligned counts as all lost."""
    if got == want:
        return {"bytes_lost": 0, "bytes_duplicated": 0, "first_difference": None}
    first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    seen: dict[bytes, int] = {}
    for i in range(0, len(got) - len(got) % 8, 8):
        seen[got[i:i + 8]] = seen.get(got[i:i + 8], 0) + 1
    expected = {want[i:i + 8] for i in range(0, len(want) - len(want) % 8, 8)}
    lost = sum(8 for block in expected if block not in seen)
    duplicated = sum(8 * (n - 1) for n in seen.values() if n > 1)
    return {"bytes_lost": lost, "bytes_duplicated": duplicated, "first_difference": first}


def assert_exact(got: bytes, want: bytes) -> None:
    result = account(got, want)
    assert result == {"bytes_lost": 0, "bytes_duplicated": 0, "first_difference": None}, (
        f"stream of {len(got)} bytes, expected {len(want)}: {result}"
    )


class Background(threading.Thread):
    """Runs fn(*args) in a thread; result() returns its value or raises its error."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args = fn, args
        self.value = self.error = None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args)
        except BaseException as err:  # noqa: BLE001 - re-raised in result()
            self.error = err

    def result(self, timeout: float = 60):
        self.join(timeout)
        assert not self.is_alive(), f"{self.fn.__name__} still running after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.value


def wait_for(event: threading.Event, what: str, timeout: float = 30,
             client: Background | None = None) -> None:
    """Wait for `event`; fail at once with the client's error if the client died."""
    for _ in range(int(timeout * 20)):
        if event.wait(0.05):
            return
        if client is not None and not client.is_alive():
            client.result(0)  # raises the client's error
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------ checks of the harness itself


def test_account_tells_lost_from_duplicated():
    want = numbered(800)
    assert account(want, want)["bytes_lost"] == 0
    assert account(want[:400] + want[480:], want)["bytes_lost"] == 80
    dup = account(want[:400] + want[320:], want)
    assert dup["bytes_duplicated"] == 80 and dup["bytes_lost"] == 0 and 400 <= dup["first_difference"] < 408


def test_lab_builds_reaches_and_leaves_nothing(root, unique):
    lab = RecoveryLab(unique)
    try:
        server = lab.server("a", "line_server")
        sock = lab.connect()
        sock.sendall(b"ADD 5\nGET\n")
        rfile = sock.makefile("rb")
        assert rfile.readline() == b"TOTAL 5\n" and rfile.readline() == b"TOTAL 5\n"
        held = server.sessions()
        assert len(held) == 1 and held[0].sock.getpeername() == sock.getsockname()
        held[0].close()
    finally:
        lab.close()
    assert not netns.names(f"bdt-{unique}")
    assert not os.path.exists(lab.tmp)
