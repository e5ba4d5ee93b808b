"""Cut one process group's TCP traffic to some ports, inside a network namespace (nftables).

    cut("bd-lab-mon", "backdoors_cut_m1", cgroup="bd-lab-mon-m1",
        daddr="10.99.0.250", ports=[2379])
    ...
    restore("bd-lab-mon", "backdoors_cut_m1")

The cut is a table of its own in that namespace: an output-hook chain dropping the packets
that sockets of the cgroup v2 `cgroup` (a top-level one) send to `daddr`:`ports` (SYNs and
data alike: the peer looks gone, as in a partition; nothing is reset). `restore` deletes the
table; the namespace's removal deletes it too (its owner's). Other processes of the
namespace, and that cgroup's traffic elsewhere, pass.

nft resolves a cgroup path under /sys/fs/cgroup; on a hybrid layout cgroup2 is mounted
elsewhere (/sys/fs/cgroup/unified), so nft runs in a private mount namespace of its own
(unshare -m) with cgroup2 mounted there on /sys/fs/cgroup. The rule keeps the cgroup's id.
Needs nft (Debian: nftables), unshare and nsenter (util-linux).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess

from backdoors.errors import NetError, require_root
from backdoors.net import netns

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_CGROUP = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
# in a private mount namespace: cgroup2 on /sys/fs/cgroup, then nft in the netns ($1)
_SCRIPT = 'mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec nsenter --net="$1" nft -f -'


def available() -> str | None:
    """The nft executable, None when it is not installed (Debian: nftables)."""
    return shutil.which("nft")


def cut(ns: str, table: str, *, cgroup: str, daddr: str, ports: list[int]) -> None:
    """Drop what sockets of cgroup v2 `cgroup` send to `daddr`:`ports` (TCP) from inside
    namespace `ns`, in table `table` (inet; replaced if it exists)."""
    if not _NAME.match(table):
        raise NetError(f"nft table name {table!r}: letters, digits and _ only, a letter first")
    if not _CGROUP.match(cgroup):
        raise NetError(f"cgroup {cgroup!r}: a top-level cgroup name (no /) is expected")
    try:
        addr = ipaddress.IPv4Address(daddr)
    except ValueError:
        raise NetError(f"cut: {daddr!r} is not an IPv4 address") from None
    if not ports or any(not (0 < int(p) < 65536) for p in ports):
        raise NetError(f"cut: ports {ports!r} must be 1..65535, at least one")
    require_root("cutting traffic with nftables", "nftables rules are the host's")
    if not netns.exists(ns):
        raise NetError(f"cut: no network namespace {ns!r}")
    rules = (f"table inet {table}\ndelete table inet {table}\n"  # replace: add, then delete
             f"table inet {table} {{\n"
             f"  chain out {{\n    type filter hook output priority 0; policy accept;\n"
             f"    socket cgroupv2 level 1 \"{cgroup}\" ip daddr {addr} "
             f"tcp dport {{ {', '.join(str(int(p)) for p in ports)} }} drop\n  }}\n}}\n")
    _nft(ns, rules, f"cut {cgroup} from {addr} {ports} in {ns}")


def restore(ns: str, table: str) -> None:
    """Delete table `table` of `cut` (nothing when it, or the namespace, is gone)."""
    if not _NAME.match(table):
        raise NetError(f"nft table name {table!r}: letters, digits and _ only, a letter first")
    if not netns.exists(ns):
        return
    if table in tables(ns):
        _nft(ns, f"delete table inet {table}\n", f"remove table {table} in {ns}")


def tables(ns: str) -> list[str]:
    """The inet tables of namespace `ns` (to check none is left)."""
    out = _run(["nsenter", f"--net={netns.path(ns)}", "nft", "list", "tables", "inet"], "",
               f"list tables in {ns}")
    return [line.split()[-1] for line in out.splitlines() if line.startswith("table inet ")]


def _nft(ns: str, rules: str, what: str) -> None:
    _run(["unshare", "-m", "--", "sh", "-c", _SCRIPT, "sh", netns.path(ns)], rules, what)


def _run(argv: list[str], stdin: str, what: str) -> str:
    if available() is None:
        raise NetError("nft is not installed (Debian: apt-get install nftables; make "
                       "system-deps installs it)")
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise NetError(f"nftables: {what} failed: {(r.stderr or r.stdout).strip()[:400]}")
    return r.stdout
