"""End-to-end scenarios: each builds its own lab, runs a case, tears down, returns JSON.

`SCENARIOS` maps the CLI names (`backdoors scenario NAME --json`) to their functions.
"""

from .hostile import hostile_node
from .repair import HANG_MODES, fork_bomb, hang, memory_hog
from .vm import vm_integrity

SCENARIOS = {"memory-hog": memory_hog, "fork-bomb": fork_bomb, "hang": hang,
             "hostile-node": hostile_node, "vm": vm_integrity}

__all__ = ["HANG_MODES", "SCENARIOS", "fork_bomb", "hang", "hostile_node", "memory_hog", "vm_integrity"]
