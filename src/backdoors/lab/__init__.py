"""The embedded lab: hosts, nodes, a client and faults, on one machine."""

from .faults import KINDS as FAULT_KINDS
from .faults import Fault, inject, stop
from .lab import Lab, LabState, ServiceInfo, reap, running_labs
from .topology import CLIENT_ADDR, MONITOR_ADDR, SERVICE_PORT, Plan

__all__ = [
    "CLIENT_ADDR", "FAULT_KINDS", "Fault", "Lab", "LabState", "MONITOR_ADDR", "Plan",
    "SERVICE_PORT", "ServiceInfo", "inject", "reap", "running_labs", "stop",
]
