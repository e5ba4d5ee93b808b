"""The cost of reading a guest's process table from its memory, beside a container's.

The VM backdoor's table (`vm.memory.GuestMemory.process_table`: the guest kernel's task
list walked through its RAM, each task's state, memory, parent, start and exec) is what
the agent's guest sampler reads every TASKS_EVERY_S and what a guest repair acts on. Its
peer, measured in the same run: a container node's table read from the host's /proc
(`Node.processes`, what the agent reads for every other node). A lab of one container
node and one VM node; both get the same number of extra sleeping processes (the guest's
`breed` tree, the container's `sleep`s), in steps; at each step each table is read
`reads` times, alternately. Reports per step the tasks read, each reader's median ms and
us per task, and their ratio (guest / container). Root, about 2-4 minutes (the guest's
boot and forks run under TCG unless KVM is there).

    python bench/bench_vm_tasks.py [--depths 3 6 8] [--reads 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid


def _guest_table(memory, tries: int = 50):
    """One walk that the guest's forks and exits did not break, and its seconds."""
    from backdoors.errors import VmError

    for _ in range(tries):
        t0 = time.perf_counter()
        try:
            table = memory.process_table()
        except VmError:  # the list changed under the walk: the sampler reads it again too
            continue
        return table, time.perf_counter() - t0
    raise RuntimeError(f"{tries} walks of the guest's task list in a row were broken")


def run(depths: tuple[int, ...] = (3, 6, 8), reads: int = 30) -> dict:
    from backdoors.lab import Lab
    from backdoors.scenarios.labkit import wait_until
    from backdoors.scenarios.vm import guest_get

    rows = []
    extra = 0  # processes added to each so far
    with Lab("bv" + uuid.uuid4().hex[:6], hosts=1, nodes=1, services=False, vm_nodes=1,
             pids_limit=4096) as lab:
        memory = lab.vm("v0").memory()
        node = lab.node("n0")
        base_guest = len(_guest_table(memory)[0])
        sleepers = 0  # the shells that start the container's sleeps (the lab ends all)
        for depth in depths:
            added = 2 ** (depth + 1) - 1  # the breed tree: each level doubles
            guest_get(lab, "v0", f"/cgi-bin/breed?{depth}")
            extra += added
            wait_until(lambda: len(_guest_table(memory)[0]) >= base_guest + extra, 300,
                       f"{base_guest + extra} guest tasks", step=0.2)
            lab.run_in_node("n0", ["sh", "-c", f"for i in $(seq {added}); do sleep 3600 & done; wait"])
            sleepers += 1
            wait_until(lambda: len(node.processes()) >= extra + sleepers, 300,
                       f"{extra} sleeping processes in n0", step=0.2)
            guest_s, proc_s = [], []
            guest_n = proc_n = 0
            for i in range(reads):  # alternately, so both share the machine's moments
                for which in (("guest", "proc") if i % 2 == 0 else ("proc", "guest")):
                    if which == "guest":
                        table, s = _guest_table(memory)
                        guest_s.append(s)
                        guest_n = len(table)
                    else:
                        t0 = time.perf_counter()
                        proc_n = len(node.processes())
                        proc_s.append(time.perf_counter() - t0)
            g, p = statistics.median(guest_s), statistics.median(proc_s)
            rows.append({"depth": depth, "guest_tasks": guest_n, "node_processes": proc_n,
                         "guest_ms_p50": round(g * 1000, 3),
                         "node_ms_p50": round(p * 1000, 3),
                         "guest_us_per_task": round(g * 1e6 / guest_n, 2),
                         "node_us_per_process": round(p * 1e6 / proc_n, 2),
                         "ratio_per_task": round((g / guest_n) / (p / proc_n), 2)})
        boot = lab.state.vm_boots.get("v0", {})
    return {"reads": reads, "accel": boot.get("accel"), "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[3, 6, 8])
    ap.add_argument("--reads", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    result = run(tuple(args.depths), args.reads)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for r in result["rows"]:
            print(f"{r['guest_tasks']:5d} guest tasks {r['guest_ms_p50']:8.2f} ms "
                  f"({r['guest_us_per_task']:.1f} us each) | {r['node_processes']:5d} node "
                  f"processes {r['node_ms_p50']:8.2f} ms ({r['node_us_per_process']:.1f} us "
                  f"each) | ratio {r['ratio_per_task']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
