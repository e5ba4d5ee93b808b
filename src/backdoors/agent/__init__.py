"""The agent: the backdoor daemon of a host and its RPC client.

- `Agent`, `BackgroundAgent` (daemon.py); `run_agent` (run.py), the daemon process that
  `backdoors agent --config FILE` runs;
- `AgentConfig`, `load_config` (config.py); `Identity`, `new_identity`, `load_identity`,
  `generate` (keys.py: Ed25519 keypairs of monitors and agents);
- `AgentClient` (client.py), used by monitors;
- `fdstore.py` (its held descriptors in the supervisor's fd store, taken back on start)
  and `peerwatch.py` (agents watching each other; the op `peers`).

Services register with their agent through `backdoors.common.runtime`. Names are imported
lazily: importing the package does not load the daemon.
docs/agent-protocol.md describes the wire protocol and the configuration.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Agent": "daemon", "BackgroundAgent": "daemon",
    "AgentConfig": "config", "NodeSpec": "config", "KernelSensorLimits": "config",
    "load_config": "config",
    "AgentClient": "client",
    "Identity": "keys", "new_identity": "keys", "load_identity": "keys", "generate": "keys",
    "load_publics": "keys",
    "RemoteError": "errors", "TransportError": "errors",
    "AuthError": "errors", "QuorumError": "errors", "DeadlineError": "errors",
    "BusyError": "errors", "BoundsError": "errors", "NotFoundError": "errors",
    "RequestError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'backdoors.agent' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
