"""The VM backdoor: a guest kernel watched, tampered with and healed from outside, and
Orion's predictions, against Gibraltar's figures (`backdoors scenario vm`, in full).

A lab with one VM node: the guest hang by its jiffies deadline; the integrity baseline
from the kernel image; the scan's cost side by side (a copy loop in the guest with the
scan paused and running, alternately); `benign_s` of benign work in the guest (every
integrity finding and every Orion alarm meanwhile is false); three tampers, 5 rounds,
each detected and healed; a leak and a fork bomb in the guest, Orion's alarm against the
plain bound. The JSON has the scenario's timeline, which the report plots. Root, about
`benign_s` + 3 minutes.

    python bench/bench_vm.py [BENIGN_S]        # default 600
"""

from __future__ import annotations

import json
import sys


def run(benign_s: float = 600.0) -> dict:
    from backdoors.scenarios.vm import vm_integrity

    return vm_integrity(benign_s=benign_s)


if __name__ == "__main__":
    print(json.dumps(run(float(sys.argv[1]) if len(sys.argv) > 1 else 600.0), indent=2))
