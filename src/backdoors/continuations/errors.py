"""Errors of the Continuation Box package; each names the session and what to do.

They live here rather than in `backdoors.errors` so that this package stays one folder;
all derive from `BackdoorsError`, so the CLI and callers catching it see them too.
"""

from __future__ import annotations

from ..errors import BackdoorsError


class ContinuationError(BackdoorsError):
    """Base of the errors raised on purpose by `backdoors.continuations`."""


class CbFormatError(ContinuationError):
    """A Continuation Box region is malformed, truncated, torn or hostile."""


class StateTooLargeError(ContinuationError):
    """An exported state does not fit the box's state capacity."""


class LogFullError(ContinuationError):
    """The receive log is full: the application must export before reading more."""


class RecoveryError(ContinuationError):
    """A recovered session is inconsistent (CB against the socket's byte counts), or the
    recovering server's regenerated output differs from what the client already has."""


class AdoptionError(ContinuationError):
    """A recovered session could not be handed over to (or taken by) a recovery server."""


class NoVerdict(AdoptionError):
    """A session was sent to a recovery server but its verdict never came (late, or the
    connection broke): the server may hold it and serve it, so it is not refused."""


class NotHanded(AdoptionError):
    """A session was never sent: the connection to the recovery server broke while the
    batches before it were on their way (their sessions are NoVerdict)."""
