"""The errors backdoors raises on purpose.

Every message says what was wrong, where, and (when there is one) what to do about it.
The CLI turns a BackdoorsError into one line on stderr and a non-zero exit.
"""

import os


class BackdoorsError(Exception):
    """Base of every error raised on purpose by this package."""


class NeedRootError(BackdoorsError):
    """The operation touches cgroups, namespaces or raw sockets and needs root."""


class SensorBoxError(BackdoorsError):
    """A Sensor Box region is malformed, truncated, hostile or full."""


class NodeError(BackdoorsError):
    """A node (cgroup + netns) operation failed."""


class VmError(NodeError):
    """A VM node (QEMU guest) could not be built, started, controlled or read."""


class NetError(BackdoorsError):
    """A network namespace, link or address operation failed."""


class LabError(BackdoorsError):
    """The embedded lab could not be built, queried or torn down."""


class TcpRepairError(BackdoorsError):
    """A TCP socket could not be dumped or restored."""


class AgentError(BackdoorsError):
    """The agent refused or failed a request."""


class RegistrationError(AgentError):
    """A local registration was refused or could not be made; `.code` says which
    (refused, no_agent, not_agent, protocol)."""

    def __init__(self, message: str, code: str = "refused"):
        super().__init__(message)
        self.message, self.code = message, code


class ConfigError(BackdoorsError):
    """A configuration or ruleset file is invalid."""


def require_root(what: str, why: str = "it creates cgroups and network namespaces") -> None:
    """Raise NeedRootError unless running as root; `what` names the operation, `why` says
    what of it needs root."""
    if os.geteuid() != 0:
        raise NeedRootError(f"{what} needs root: {why}. Run it with sudo or as root.")
