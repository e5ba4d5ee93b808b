"""Dump and restore one established TCP socket with Linux TCP_REPAIR.

A small leaf library in the spirit of CRIU's soccr: it knows sockets, not nodes or agents.

    state = dump(sock)          # sock enters repair mode; the caller holds the network lock
    close_silently(sock)        # no FIN, no RST
    blob = state.encode()       # msgpack, to another agent
    with initial_window([state.remote_addr], segments_needed([state])):
        new = restore(TcpState.decode(blob))   # in the target network namespace

`bytes_handed` and `bytes_received` give the application's stream positions for the
Continuation Box. Every failure is a TcpRepairError naming the step and the errno.
"""

from .accounting import bytes_handed, bytes_received
from .dump import close_silently, dump, release, resume
from .restore import finish_restore, restore
from .route import initial_window, segments_needed
from .state import TcpOptions, TcpState, TcpWindow

__all__ = [
    "TcpOptions",
    "TcpState",
    "TcpWindow",
    "bytes_handed",
    "bytes_received",
    "close_silently",
    "initial_window",
    "dump",
    "finish_restore",
    "release",
    "restore",
    "resume",
    "segments_needed",
]
