"""The agent's Prometheus metrics, in a registry of their own (exposed later by the CLI).

Label values are bounded: op labels are known op names or "?", node labels are the
configured nodes, codes are the protocol's codes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0)


class AgentMetrics:
    """Counters, histograms and gauges of one agent; `registry` holds them all."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.rpc_seconds = Histogram(
            "backdoors_agent_rpc_seconds", "RPC latency from decoded request to reply",
            ["op"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rpc = Counter("backdoors_agent_rpc", "RPC requests by op and result (ok or code)",
                           ["op", "result"], registry=r)
        self.rejected = Counter("backdoors_agent_rejected",
                                "Requests rejected before dispatch, by code", ["code"], registry=r)
        self.votes = Counter("backdoors_agent_votes",
                             "Quorum votes: cast, applied (quorum reached), expired",
                             ["op", "outcome"], registry=r)
        self.regions = Gauge("backdoors_agent_regions", "Regions registered by a node", ["node"],
                             registry=r)
        self.registrations = Counter("backdoors_agent_registrations",
                                     "Local registration requests by node, op and result",
                                     ["node", "op", "result"], registry=r)
        self.stuck_ops = Gauge("backdoors_agent_stuck_ops",
                               "Operations past their deadline still running", ["node"], registry=r)
        self.sample_seconds = Gauge("backdoors_agent_sample_seconds",
                                    "Duration of the last kernel-sensor sample", ["node"],
                                    registry=r)
