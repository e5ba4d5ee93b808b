"""Errors of the agent, its client and the local registration: each carries a `.code`.

A reply of the agent with `ok: false` becomes a RemoteError subclass chosen by its code
(docs/agent-protocol.md lists the codes). Failures on the client's side of the wire
(cannot connect, no reply in time, a reply that fails authentication) are TransportError.
The registration client's RegistrationError is on the ground floor (backdoors.errors).
"""

from __future__ import annotations

from ..errors import AgentError


class RemoteError(AgentError):
    """The agent answered with an error; `.code` is the wire code, `.message` its text."""

    code = "failed"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RequestError(RemoteError):
    """The request was malformed (bad_frame, bad_request, unknown_op)."""

    code = "bad_request"


class AuthError(RemoteError):
    """The agent did not accept the request's authentication (auth, replay)."""

    code = "auth"


class NotFoundError(RemoteError):
    """No such node or region (no_such_node, no_such_region)."""

    code = "no_such_node"


class BoundsError(RemoteError):
    """A read or write outside the region, or a write to a read-only one."""

    code = "out_of_bounds"


class DeadlineError(RemoteError):
    """The operation did not finish within the agent's deadline and was abandoned."""

    code = "deadline"


class QuorumError(RemoteError):
    """Too few distinct monitors asked for the same destructive operation in time."""

    code = "quorum"


class BusyError(RemoteError):
    """The node is locked by other monitors, or the agent is saturated; retry later."""

    code = "busy"


class StaleTokenError(RemoteError):
    """The request's fencing token is older than one the agent has seen for the node:
    another monitor owns it now (a fleet, docs/operations.md). Not applied."""

    code = "stale_token"


class TransportError(AgentError):
    """The client could not get an authentic reply (code: connect, timeout, protocol)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.message, self.code = message, code


_BY_CODE: dict[str, type[RemoteError]] = {
    "bad_frame": RequestError,
    "bad_request": RequestError,
    "unknown_op": RequestError,
    "auth": AuthError,
    "replay": AuthError,
    "no_such_node": NotFoundError,
    "no_such_region": NotFoundError,
    "out_of_bounds": BoundsError,
    "not_writable": BoundsError,
    "deadline": DeadlineError,
    "quorum": QuorumError,
    "busy": BusyError,
    "stale_token": StaleTokenError,
}


def remote_error(code: str, message: str) -> RemoteError:
    """The RemoteError subclass for a wire error code (unknown codes give RemoteError)."""
    return _BY_CODE.get(code, RemoteError)(message, code)
