"""Shared by the case study's tests: a lab with PostgreSQL in one node, loaded with a
small RUBiS data set."""

from __future__ import annotations

from contextlib import contextmanager

import psycopg

from backdoors.casestudy.rubis import dataset
from backdoors.casestudy.rubis.dataset import Scale


@contextmanager
def rubis_lab(name: str, *, hosts: int, nodes: int, db_node: str, scale: Scale):
    """(lab, pg): a lab of `hosts` hosts and `nodes` nodes with agents, its database in
    `db_node` loaded with `scale`; all of it removed after."""
    from conftest import needs_root

    needs_root()
    from backdoors.casestudy.postgres import Postgres
    from backdoors.lab.lab import Lab
    from backdoors.scenarios.labkit import unique_name

    with Lab(unique_name(name), hosts=hosts, nodes=nodes, agents=True, services=False) as lab:
        with Postgres(lab, db_node) as pg:
            with psycopg.connect(pg.local_dsn()) as c:
                dataset.load(c, scale)
            yield lab, pg
