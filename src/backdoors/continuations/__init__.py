"""Continuation Boxes: transparent recovery of client sessions, byte-exact.

A server makes its sessions recoverable with a handful of calls (docs/continuations.md):

    with Listener.tcp(host, port, adopt=path) as listener:
        while conn := listener.accept():       # new connections and recovered sessions
            cb = create_cb(conn)               # CB region; socket and region to the agent
            state = cb.import_state() or new_state(cb.conn.readline())
            ... cb.conn.sendall(...); cb.export(state) ...

At recovery the agent dumps the session socket (tcprepair), restores it on a healthy
node and hands it over with the CB; the server resumes from the last export: output the
client already has is skipped, input read since the export is replayed.
"""

from .adoption import (
    AdoptionClient,
    AdoptionSource,
    Handover,
    HandoverReply,
    Recovered,
    UnixAdoptionSource,
    hand_over,
    prepare,
)
from .agent_link import AgentRegistrar, NullRegistrar, Registrar, default_registrar
from .async_box import AsyncContinuationBox, SessionReader, SessionWriter, create_cb_async
from .async_listener import AsyncListener, run
from .box import (
    DEFAULT_LOG_CAPACITY,
    DEFAULT_STATE_CAPACITY,
    SESSION_FDS,
    ContinuationBox,
    create_cb,
    open_cb,
)
from .connection import RecoverableConnection, SessionFile
from .errors import (
    AdoptionError,
    CbFormatError,
    ContinuationError,
    LogFullError,
    RecoveryError,
    StateTooLargeError,
)
from .image import CbImage, Export, ResumePlan, parse_cb, read_cb
from .listener import Listener

__all__ = [
    "AdoptionClient", "AdoptionError", "AdoptionSource", "AgentRegistrar", "CbFormatError",
    "CbImage", "ContinuationBox", "ContinuationError", "DEFAULT_LOG_CAPACITY",
    "DEFAULT_STATE_CAPACITY", "Export", "Handover", "HandoverReply", "Listener",
    "LogFullError", "NullRegistrar", "Recovered", "RecoverableConnection", "RecoveryError",
    "Registrar", "ResumePlan", "SESSION_FDS", "SessionFile", "SessionReader", "SessionWriter",
    "StateTooLargeError", "UnixAdoptionSource", "create_cb", "create_cb_async",
    "default_registrar", "hand_over", "open_cb", "parse_cb", "prepare", "read_cb", "run",
]
