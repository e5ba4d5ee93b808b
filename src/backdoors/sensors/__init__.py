"""Sensor Boxes: progress, level and pressure sensors in shared memory.

Applications write with plain memory stores (`SensorBox`); the agent and monitors read
from outside, never trusting the region (`SensorBoxReader`, `parse`).
"""

from .box import Level, Pressure, Progress, SensorBox
from .layout import SensorType
from .reader import BoxImage, Sensor, SensorBoxReader, SensorState, SensorTracker, Snapshot, parse, read_consistent
from .region import Region

__all__ = [
    "BoxImage", "Level", "Pressure", "Progress", "Region", "Sensor", "SensorBox",
    "SensorBoxReader", "SensorState", "SensorTracker", "SensorType", "Snapshot", "parse",
    "read_consistent",
]
