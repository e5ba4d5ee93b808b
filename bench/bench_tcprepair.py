"""Cost of moving N established TCP sockets with TCP_REPAIR: dump, silent close, restore.

For N = 1, 100, 1000 connections over loopback in a private network namespace (removed
at the end), each with a little unread data in both directions, it times repair + dump()
of all N, the silent close() of all N and restore() of all N, and reports per-socket costs and the
total for N (what a move adds between the network lock and repair-off). As a reference
point, the cost of establishing a fresh connection (connect + accept) is measured in the
same run. Every restored socket is checked afterwards: one byte each way.

    python bench/bench_tcprepair.py [--sockets 1 100 1000] [--repeat 3]

Prints JSON on stdout. Needs root (network namespace, TCP_REPAIR).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from pyroute2 import IPRoute, netns

from backdoors.tcprepair import repair, restore

CLONE_NEWNET = 0x40000000
QUEUED = 100  # unread bytes left in each direction of every connection


class PrivateNetns:
    """A network namespace with loopback up and one worker thread inside it."""

    def __init__(self) -> None:
        self.name = f"bdb-{uuid.uuid4().hex[:6]}-tr"  # (not bdt-: the tests reap those)
        netns.create(self.name)
        self.pool = ThreadPoolExecutor(1)
        try:
            with IPRoute(netns=self.name) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            self.run(self._enter)
        except BaseException:
            self.close()
            raise

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {self.name}")
        finally:
            os.close(fd)

    def run(self, fn, *args):
        return self.pool.submit(fn, *args).result()

    def close(self) -> None:
        self.pool.shutdown()
        netns.remove(self.name)


def connect_all(count: int) -> tuple[list[socket.socket], list[socket.socket], float]:
    """`count` connections to one listener; returns clients, servers, seconds taken."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    clients, servers = [], []
    started = time.perf_counter()
    for _ in range(count):
        clients.append(socket.create_connection(listener.getsockname()))
        servers.append(listener.accept()[0])
    elapsed = time.perf_counter() - started
    listener.close()
    for client, server in zip(clients, servers):
        client.sendall(b"q" * QUEUED)
        server.sendall(b"r" * QUEUED)
    return clients, servers, elapsed


def timed_restore(states):
    started = time.perf_counter()
    sockets = [restore(state) for state in states]
    return sockets, time.perf_counter() - started


def one_round(ns: PrivateNetns, count: int) -> dict:
    clients, servers, connect_s = ns.run(connect_all, count)
    time.sleep(0.05)  # let the queued bytes arrive
    try:
        started = time.perf_counter()
        handles = [repair(sock) for sock in servers]
        states = [handle.dump() for handle in handles]
        dumped = time.perf_counter()
        for handle in handles:
            handle.close()
        closed = time.perf_counter()
        restored, restore_s = ns.run(timed_restore, states)
        check(clients, restored)
    finally:
        for sock in clients + servers:
            sock.close()
    for sock in restored:
        sock.close()
    return {
        "dump_s": dumped - started,
        "close_s": closed - dumped,
        "restore_s": restore_s,
        "connect_s": connect_s,
    }


def check(clients: list[socket.socket], restored: list[socket.socket]) -> None:
    """Each restored socket has its unread bytes and still talks to its client."""
    for client, server in zip(clients, restored):
        assert server.recv(QUEUED, socket.MSG_WAITALL) == b"q" * QUEUED
        server.sendall(b"!")
        client.settimeout(5)
        assert client.recv(QUEUED + 1, socket.MSG_WAITALL) == b"r" * QUEUED + b"!"


def run(sizes: list[int] = (1, 100, 1000), repeat: int = 3) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ns = PrivateNetns()
    results = []
    try:
        for count in sizes:
            rounds = [one_round(ns, count) for _ in range(repeat)]
            med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
            per_socket_us = {key: round(med[key] / count * 1e6, 2) for key in med}
            results.append(
                {
                    "sockets": count,
                    "dump_us_per_socket": per_socket_us["dump_s"],
                    "close_silently_us_per_socket": per_socket_us["close_s"],
                    "restore_us_per_socket": per_socket_us["restore_s"],
                    "total_ms": round((med["dump_s"] + med["close_s"] + med["restore_s"]) * 1e3, 3),
                    "reference_connect_accept_us_per_socket": per_socket_us["connect_s"],
                }
            )
    finally:
        ns.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {
        "benchmark": "tcprepair",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "queued_bytes_each_way": QUEUED,
        "repeat": repeat,
        "statistic": "median of repeats",
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockets", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_tcprepair needs root: network namespace and TCP_REPAIR", file=sys.stderr)
        return 2
    json.dump(run(args.sockets, args.repeat), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
