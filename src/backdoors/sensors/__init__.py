"""Sensor Boxes: progress, level and pressure sensors in shared memory.

Applications write with plain memory stores (`SensorBox`); the agent and monitors read
from outside, never trusting the region (`SensorBoxReader`, `parse_box`), and judge a sensor
with `judgement` (`stalled`, `out_of_bounds`, `over_rate`). `KERNEL_BOX` names the
agent's box of a node's kernel-derived sensors.
"""

from .box import Level, Pressure, Progress, SensorBox, StampedProgress
from .judgement import out_of_bounds, over_rate, stalled
from .abi import GUEST_BOX, KERNEL_BOX, KERNEL_SENSORS, SensorType
from .reader import BoxImage, Sensor, SensorBoxReader, SensorState, SensorTracker, Snapshot, parse_box, read_consistent
from .region import Region

__all__ = [
    "GUEST_BOX", "KERNEL_BOX", "KERNEL_SENSORS", "BoxImage", "Level", "Pressure", "Progress",
    "Region", "Sensor", "SensorBox", "SensorBoxReader", "SensorState", "SensorTracker", "SensorType", "Snapshot",
    "StampedProgress", "out_of_bounds", "over_rate", "parse_box", "read_consistent", "stalled",
]
