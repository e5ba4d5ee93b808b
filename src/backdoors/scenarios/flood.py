"""A flood of keyless connections against an agent's RPC port: what a client without a
key can do to it. Used by the availability tests and by `bench/bench_dos.py`."""

from __future__ import annotations

import selectors
import socket
import threading


def loopback_addresses(n: int) -> list[str]:
    """`n` distinct loopback source addresses (127.0.1.1, 127.0.1.2, ...)."""
    return [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(n)]


class KeylessFlood:
    """Keeps `count` silent connections without a key open to `address`, from `sources`
    (round robin), opening a new one whenever the agent closes one. Counts `opened` and
    `closed_by_agent`; a connection refused is retried on the next turn. A context
    manager: the flood runs on a thread of its own until the `with` block ends, then
    every connection it holds is closed."""

    def __init__(self, address: tuple[str, int], count: int, sources: list[str],
                 connect_timeout: float = 5.0):
        if not sources:
            raise ValueError("a flood needs at least one source address")
        self.address, self.count, self.sources = address, count, sources
        self.connect_timeout = connect_timeout
        self.opened = self.closed_by_agent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bd-keyless-flood", daemon=True)

    def __enter__(self) -> KeylessFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _open(self, sel: selectors.BaseSelector) -> bool:
        source = self.sources[self.opened % len(self.sources)]
        try:
            s = socket.create_connection(self.address, timeout=self.connect_timeout,
                                         source_address=(source, 0))
        except OSError:
            return False
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        self.opened += 1
        return True

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            while not self._stop.is_set():
                while len(sel.get_map()) < self.count and self._open(sel):
                    pass
                for key, _ in sel.select(0.05):
                    try:
                        gone = key.fileobj.recv(65536) == b""
                    except (ConnectionResetError, BlockingIOError):
                        gone = True
                    if gone:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
                        self.closed_by_agent += 1
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()


__all__ = ["KeylessFlood", "loopback_addresses"]
