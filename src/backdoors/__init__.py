"""backdoors: remote healing for Linux services.

An out-of-band agent (the backdoor) reads a node's state without the node's help,
and a monitor uses it to detect failures, diagnose them and repair the node in place
or move its live client sessions to a healthy node.
"""

__version__ = "0.1.0"
