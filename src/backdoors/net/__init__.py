"""Network plumbing for nodes and the lab: namespaces, bridges, veths, addresses, VIP moves.

Netlink only (pyroute2), never the `ip` command. Every call names the namespace it acts
in; interface names are local to that namespace.
"""

from backdoors.net import netns, sockets
from backdoors.net.arp import garp_frame, gratuitous_arp, neighbours
from backdoors.net.links import (
    LinkInfo,
    LinkWatch,
    add_address,
    add_bridge,
    add_route,
    add_veth,
    addresses,
    cut_off,
    del_address,
    link_info,
    remove_link,
    set_master,
    set_up,
)
from backdoors.net.vip import MoveTimings, move_address

__all__ = [
    "LinkInfo",
    "LinkWatch",
    "MoveTimings",
    "add_address",
    "add_bridge",
    "add_route",
    "add_veth",
    "addresses",
    "cut_off",
    "del_address",
    "garp_frame",
    "gratuitous_arp",
    "link_info",
    "move_address",
    "neighbours",
    "netns",
    "remove_link",
    "set_master",
    "set_up",
]
