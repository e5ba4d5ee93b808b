"""The RUBiS case study, short: `backdoors casestudy rubis` with small parameters, for the
report's two figures of the original evaluation (throughput and latency vs load, plain vs
recoverable; requests per 100 ms across each fault). Root; about ten minutes.

A data set of a tenth of the default (1,000 users, 2,000 items, 10,000 bids), load levels
of 1, 2, 4, 8 and 16 locust users, 4 s per level and kind of server, then every fault
(study.FAULTS) under load, each on a site of its own. Written by `make bench` to out/bench/bench_casestudy.json; the
full measure is `backdoors casestudy rubis --json --faults all` (docs/casestudy.md).

    python bench/bench_casestudy.py          # or: python bench/run_all.py bench_casestudy
"""

from __future__ import annotations

import json


def run(users: int = 16, seconds: float = 4.0, scale: float = 0.1, rounds: int = 1,
        faults: tuple[str, ...] | None = None) -> dict:
    from backdoors.casestudy.rubis.dataset import Scale
    from backdoors.casestudy.rubis.study import FAULTS, rubis

    return rubis(users, seconds, scale=Scale().scaled(scale), rounds=rounds,
                 faults=FAULTS if faults is None else faults)


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
