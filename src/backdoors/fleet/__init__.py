"""A fleet of monitors sharing the nodes through etcd (docs/operations.md, "A fleet").

`etcd`: a small etcd v3 client (JSON gateway over httpx); `assign`: rendezvous hashing of
nodes over the live monitors; `member`: one monitor's membership under a lease, and its
ownership records, whose etcd revisions (in the fleet's epoch) are its fencing tokens;
`process`: an etcd server process of its own (the lab, the tests). The agent never imports this package: it only
checks the tokens (agent/tokens.py). Between clusters: `nats`, a NATS server process of its
own, linked to another cluster's by a leaf-node connection; `bus`, a NATS connection
(nats-py) for threaded code, which carries the monitors' signed warnings
(monitor/warning.py).
"""

from .assign import assign, owner
from .etcd import EtcdClient, EtcdError, EtcdUnavailable
from .member import FleetMember, Share, fencing_token
from .process import EtcdProcess, reap

__all__ = ["EtcdClient", "EtcdError", "EtcdProcess", "EtcdUnavailable", "FleetMember", "Share",
           "assign", "fencing_token", "owner", "reap"]
