"""The lab's supervisor of an agent: what systemd is on a real host, in one small process.

    python -m backdoors.lab.keeper --notify PATH [--pid-file PATH] [--watchdog-ms 800]
                                   -- python -m backdoors agent --config FILE
    python -m backdoors.lab.keeper --notify PATH ... --agent-config FILE   (warm fork)

It speaks systemd's notify protocol (`backdoors.common.fdstore`) on a Unix datagram
socket it binds at PATH and passes to the agent as $NOTIFY_SOCKET (made in --netns, if
given: the socket queues as many messages as that namespace's net.unix.max_dgram_qlen):

- READY=1: the agent serves. The first time, the keeper prints one JSON line on stdout
  {"event": "ready", "pid": <keeper>, "agent_pid": <agent>}, then closes stdout.
- WATCHDOG=1 (with $WATCHDOG_USEC set from --watchdog-ms): once the agent is ready, a
  missed ping within the interval means it is stopped or wedged: SIGKILL, then restart.
- FDSTORE=1 / FDSTOREREMOVE=1 with FDNAME: it keeps (or closes) the attached descriptors.
  Only messages from the current agent's pid count (systemd's NotifyAccess=main).

When the agent exits for any reason other than the keeper's own SIGTERM, the keeper starts
it again (after 100 ms, like systemd's RestartSec default) with every stored descriptor
passed from fd 3 on ($LISTEN_FDS, $LISTEN_FDNAMES, $LISTEN_PID). SIGTERM to the keeper:
SIGTERM to the agent, wait for it, close the store, exit. Each event is one line on
stderr; --pid-file always holds the current agent's pid (and its restart count).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import selectors
import signal
import sys
import time

from ..common import fdtable
from ..common.fdstore import (LISTEN_FDS_START, NOTIFY_SOCKET_ENV, WATCHDOG_USEC_ENV, Message,
                              notify_listener, receive)
from ..net.netns import enter

RESTART_S = 0.1
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
MESSAGES_PER_WAKE = 256  # then the loop checks the agent (its exit, the watchdog) again


def say(what: str, **fields) -> None:
    print(json.dumps({"keeper": what, "t": round(time.time(), 3), **fields}), file=sys.stderr,
          flush=True)


class Keeper:
    def __init__(self, argv: list[str], notify: str, pid_file: str | None,
                 watchdog_s: float | None, agent_config: str | None = None,
                 sealed: bool = False, netns: str | None = None):
        self.argv, self.notify_path, self.pid_file = argv, notify, pid_file
        self.agent_config, self.sealed = agent_config, sealed
        if agent_config:  # warm: import the agent once here, fork it ready to run
            from ..agent.run import run_agent
            from ..config import load_agent_config
            self._run_agent, self._load = run_agent, load_agent_config
            if sealed:  # its import runs ldconfig: done here, never in a sealed agent
                import pyseccomp  # noqa: F401
        self.watchdog_s = watchdog_s
        # (dev, ino) -> (name, fd), in the order stored; and name -> those identities:
        # every message costs O(1), not a scan (10,000 sessions are 40,000 messages)
        self.store: dict[tuple[int, int], tuple[str, int]] = {}
        self.names: dict[str, set[tuple[int, int]]] = {}
        if netns:  # its queue length is that namespace's net.unix.max_dgram_qlen
            with enter(netns):
                self.sock = notify_listener(notify)
        else:
            self.sock = notify_listener(notify)
        self.sock.setblocking(False)  # read only when the selector says so, until empty
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, "notify")
        self.pid = 0
        self.pidfd = -1
        self.ready = False
        self.announced = False
        self.deadline = 0.0  # start timeout, then the watchdog's
        self.restarts = 0
        self.stopping = False
        wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(wake_r, selectors.EVENT_READ, "signal")
        signal.set_wakeup_fd(self.wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)

    def _on_stop(self, *_):
        self.stopping = True

    # -- the agent ---------------------------------------------------------------------

    def spawn(self) -> None:
        fds = [fd for _, fd in self.store.values()]
        names = ":".join(name for name, _ in self.store.values())
        env = dict(os.environ)
        env[NOTIFY_SOCKET_ENV] = self.notify_path
        if self.watchdog_s:
            env[WATCHDOG_USEC_ENV] = str(int(self.watchdog_s * 1e6))
        for key in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "WATCHDOG_PID"):
            env.pop(key, None)
        if fds:
            env.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names)
        pid = os.fork()
        if pid == 0:  # the child: fds to 3.., then exec; never returns
            try:
                os.dup2(sys.stderr.fileno(), 1)  # the agent's stdout: the log, not our reader
                # first out of the way (above every target), then into place from 3 on
                base = LISTEN_FDS_START + len(fds)
                high = []
                for fd in fds:  # moved, not copied: 10,000 sessions' fds twice overflow
                    high.append(fcntl.fcntl(fd, fcntl.F_DUPFD, base))
                    os.close(fd)
                for i, fd in enumerate(high):
                    os.dup2(fd, LISTEN_FDS_START + i, inheritable=True)
                if fds:
                    env["LISTEN_PID"] = str(os.getpid())
                os.closerange(base, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                if self.agent_config:
                    os._exit(self._forked_agent(env))
                os.execve(self.argv[0], self.argv, env)
            except BaseException as e:  # noqa: BLE001
                what = self.argv[0] if self.argv else "the agent"
                os.write(2, f"keeper: cannot start {what}: {e}\n".encode())
            os._exit(127)
        self.pid, self.ready = pid, False
        self.pidfd = os.pidfd_open(pid)
        self.sel.register(self.pidfd, selectors.EVENT_READ, "exit")
        self.deadline = time.monotonic() + START_TIMEOUT_S
        self._write_pid()
        say("started", pid=pid, fds=len(fds), restarts=self.restarts)

    def _forked_agent(self, env: dict[str, str]) -> int:
        """In the forked child: what `backdoors agent --config FILE` does, without the
        second or two a fresh interpreter takes to import it."""
        import logging
        os.environ.clear()
        os.environ.update(env)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s agent %(levelname)s %(message)s")
        try:
            config = self._load(self.agent_config)
        except Exception as e:  # noqa: BLE001
            print(f"backdoors agent: {e}", file=sys.stderr, flush=True)
            return 2
        rc = self._run_agent(config, sealed=self.sealed, config_path=self.agent_config)
        sys.stdout.flush()
        sys.stderr.flush()
        return rc

    def _write_pid(self) -> None:
        if self.pid_file:
            tmp = f"{self.pid_file}.tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": self.pid, "restarts": self.restarts, "keeper": os.getpid(),
                           "stored": len(self.store)}, f)
            os.replace(tmp, self.pid_file)

    def reap(self) -> int:
        self.sel.unregister(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        _, status = os.waitpid(self.pid, 0)
        return status

    # -- messages ----------------------------------------------------------------------

    def message(self) -> None:
        """Take what is queued, up to MESSAGES_PER_WAKE: the notify socket queues only
        net.unix.max_dgram_qlen (10 by default) datagrams, and an agent storing a thousand
        descriptors waits on each one the keeper has not taken yet."""
        for _ in range(MESSAGES_PER_WAKE):
            try:
                msg = receive(self.sock)
            except BlockingIOError:
                return
            self.handle(msg)

    def handle(self, msg: Message) -> None:
        if msg.pid != self.pid:  # NotifyAccess=main
            for fd in msg.fds:
                os.close(fd)
            return
        f = msg.fields
        if f.get("FDSTORE") == "1":
            name = f.get("FDNAME", "stored")
            for fd in msg.fds:
                st = os.fstat(fd)
                ident = (st.st_dev, st.st_ino)
                if ident in self.store:
                    os.close(fd)  # systemd keeps one copy of a file
                else:
                    self.store[ident] = (name, fd)
                    self.names.setdefault(name, set()).add(ident)
        else:
            for fd in msg.fds:
                os.close(fd)
        if f.get("FDSTOREREMOVE") == "1" and "FDNAME" in f:
            for ident in self.names.pop(f["FDNAME"], ()):
                os.close(self.store.pop(ident)[1])
        if f.get("READY") == "1":
            self.ready = True
            say("ready", pid=self.pid, stored=len(self.store))
            if not self.announced:
                self.announced = True
                print(json.dumps({"event": "ready", "pid": os.getpid(), "agent_pid": self.pid}),
                      flush=True)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.close(devnull)
        if self.ready and (f.get("WATCHDOG") == "1" or f.get("READY") == "1"):
            if self.watchdog_s:
                self.deadline = time.monotonic() + self.watchdog_s

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        fdtable.raise_limit()
        fdtable.reserve()  # the fd store fills in bursts (a recovery's thousand sessions)
        self.spawn()
        while not self.stopping:
            timeout = self.deadline - time.monotonic() if (self.watchdog_s or not self.ready) else None
            for key, _ in self.sel.select(None if timeout is None else max(0.0, timeout)):
                if key.data == "notify":
                    self.message()
                elif key.data == "signal":
                    try:
                        os.read(key.fileobj, 64)
                    except BlockingIOError:
                        pass
                elif key.data == "exit" and self.pidfd >= 0:
                    status = self.reap()
                    if not self.stopping:
                        say("exited", pid=self.pid, status=status)
                        self._restart()
            if self.stopping:
                break
            if self.pidfd >= 0 and (self.watchdog_s or not self.ready) \
                    and time.monotonic() >= self.deadline:
                why = "watchdog" if self.ready else "start timeout"
                say("killing", pid=self.pid, why=why)
                os.kill(self.pid, signal.SIGKILL)
                self.reap()
                self._restart()
        return self.stop()

    def _restart(self) -> None:
        time.sleep(RESTART_S)
        # the dead agent's last queued messages: what it stored just before dying counts
        try:
            while True:
                msg = receive(self.sock)
                msg.fields.pop("READY", None)
                msg.fields.pop("WATCHDOG", None)
                self.handle(msg)  # only the old pid's: self.pid is still the dead agent's
        except BlockingIOError:
            pass
        if not os.path.exists(self.notify_path):  # the lab was torn down around us
            say("notify socket gone: not restarting")
            self.stopping = True
            return
        self.restarts += 1
        self.spawn()

    def stop(self) -> int:
        if self.pidfd >= 0:
            try:
                os.kill(self.pid, signal.SIGTERM)
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            end = time.monotonic() + STOP_TIMEOUT_S
            while time.monotonic() < end:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    break
                time.sleep(0.01)
            else:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
        say("stopped", stored=len(self.store))
        for _, fd in self.store.values():
            os.close(fd)
        self.store.clear()
        self.names.clear()
        self.sock.close()
        try:
            os.unlink(self.notify_path)
        except FileNotFoundError:
            pass
        if self.pid_file:
            try:
                os.unlink(self.pid_file)
            except FileNotFoundError:
                pass
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m backdoors.lab.keeper",
        description="Supervise one agent like systemd: fd store, watchdog, restart.")
    parser.add_argument("--notify", required=True, help="path of the notify socket to bind")
    parser.add_argument("--pid-file", help="file holding the current agent's pid (JSON)")
    parser.add_argument("--watchdog-ms", type=float, default=None,
                        help="kill and restart an agent that does not ping within this")
    parser.add_argument("--agent-config",
                        help="fork the agent of this config from the keeper (imported once, "
                             "so a restart takes milliseconds) instead of executing COMMAND")
    parser.add_argument("--sealed", action="store_true",
                        help="seal the forked agent once it is set up (backdoors agent --sealed)")
    parser.add_argument("--netns",
                        help="make the notify socket in this network namespace: it queues "
                             "that namespace's net.unix.max_dgram_qlen messages (systemd "
                             "raises the host's to 512; the kernel's default is 10)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the agent's command line")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command and not args.agent_config:
        parser.error("give the agent's command after --, or --agent-config")
    keeper = Keeper(command, args.notify, args.pid_file,
                    args.watchdog_ms / 1000 if args.watchdog_ms else None, args.agent_config,
                    sealed=args.sealed, netns=args.netns)
    return keeper.run()


if __name__ == "__main__":
    sys.exit(main())
