"""Dump and restore one established TCP socket with Linux TCP_REPAIR.

A small leaf library in the spirit of CRIU's soccr: it knows sockets, not nodes or agents.
Repair mode is explicit: a `Repair` handle holds a socket in it until `close()` or
`resume()` (or the end of its `with` block).

    with repair(sock) as r:     # the caller holds the network lock
        state = r.dump()
        r.close()               # no FIN, no RST
    blob = state.encode()       # msgpack, to another agent
    new = restore(TcpState.decode(blob))   # in the target network namespace

`restore_paused` keeps restored sockets inert until `resume()`, so many can be restored
before any talks; `segments_needed` is the initial window they need (the caller sets it on
their route: backdoors.net.route.initial_window). `bytes_handed` and `bytes_received` give
the application's stream positions for the Continuation Box. Every failure is a
TcpRepairError naming the step and the errno.
"""

from .accounting import bytes_handed, bytes_received
from .repair import Repair, close_silently, repair, restore, restore_paused
from .restore import segments_needed
from .state import TcpOptions, TcpState, TcpWindow

__all__ = [
    "Repair",
    "TcpOptions",
    "TcpState",
    "TcpWindow",
    "bytes_handed",
    "bytes_received",
    "close_silently",
    "repair",
    "restore",
    "restore_paused",
    "segments_needed",
]
