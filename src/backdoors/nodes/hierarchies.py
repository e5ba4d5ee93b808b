"""Where the cgroup hierarchies are mounted on this machine, detected at run time.

Two layouts exist in the wild and nodes must work on both:

- **hybrid**: the controllers nodes use (memory, pids, freezer, cpu, cpuacct) are cgroup v1
  hierarchies, usually at /sys/fs/cgroup/<controller>; a controller-less cgroup v2 hierarchy
  (often /sys/fs/cgroup/unified) may sit beside them and still offers cgroup.freeze,
  cgroup.kill, cgroup.events and the *.pressure files.
- **unified**: pure cgroup v2 at /sys/fs/cgroup; controllers are listed in cgroup.controllers
  and must be enabled in each parent's cgroup.subtree_control.

A controller is served by v1 when it is mounted as v1, else by v2 when the v2 root lists it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from backdoors.errors import NodeError

#: The v1 controllers a node uses, in the order their directories are made. cpu: a node
#: competes for the CPU as one group, whatever its number of tasks (a fork bomb of
#: hundreds cannot starve the agent, in a group of its own, nor the host's other tasks).
V1_CONTROLLERS = ("memory", "pids", "freezer", "cpu", "cpuacct")
#: The v2 controllers a node wants enabled in its parents' cgroup.subtree_control.
V2_CONTROLLERS = ("memory", "pids", "cpu")
#: Name of the v2 hierarchy among a cgroup's directories.
UNIFIED = "unified"

MOUNTS = Path("/proc/self/mounts")


@dataclass(frozen=True)
class Layout:
    """The cgroup hierarchies a node's cgroup spans.

    `v1` maps each v1-mounted controller nodes use to its mount point (co-mounted controllers
    share one); `v2` is the cgroup2 mount point or None; `v2_controllers` are the controllers
    the v2 root offers (empty on hybrid machines); `root` the folder that holds every
    hierarchy when it is a file system of its own for them (/sys/fs/cgroup: a tmpfs on
    hybrid hosts, the cgroup2 mount on unified ones), else None.
    """

    v1: dict[str, Path] = field(default_factory=dict)
    v2: Path | None = None
    v2_controllers: frozenset[str] = frozenset()
    root: Path | None = None

    @property
    def kind(self) -> str:
        """"hybrid" when any controller nodes use is a v1 hierarchy, else "unified"."""
        return "hybrid" if self.v1 else "unified"

    def hierarchies(self) -> dict[str, Path]:
        """Name -> mount point of every hierarchy a node's cgroup has a directory in.

        Co-mounted v1 controllers appear once, under the first controller's name; the v2
        hierarchy is called "unified" in both layouts.
        """
        out: dict[str, Path] = {}
        for name, mount in self.v1.items():
            if mount not in out.values():
                out[name] = mount
        if self.v2 is not None:
            out[UNIFIED] = self.v2
        return out

    def home(self, controller: str) -> str | None:
        """"v1" or "v2" for where `controller` lives, None when it is nowhere."""
        if controller in self.v1:
            return "v1"
        if self.v2 is not None and controller in self.v2_controllers:
            return "v2"
        return None

    def describe(self) -> str:
        """One line for messages and diagnostics."""
        parts = [f"{c}=v1:{p}" for c, p in self.v1.items()]
        if self.v2 is not None:
            ctl = ",".join(sorted(self.v2_controllers)) or "no controllers"
            parts.append(f"v2:{self.v2} ({ctl})")
        return f"{self.kind} cgroups [{'; '.join(parts)}]"


def _unescape(path: str) -> str:
    """Undo the octal escapes (\\040 for a space) of /proc/self/mounts."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _read_controllers(mount: Path) -> frozenset[str]:
    try:
        return frozenset((mount / "cgroup.controllers").read_text().split())
    except OSError:
        return frozenset()


def layout_from_mounts(text: str) -> Layout:
    """Build the Layout from the text of /proc/self/mounts.

    Raises NodeError when no cgroup hierarchy is mounted, or when the ones found are
    mounted read-only (nodes could not be created there).
    """
    v1: dict[str, Path] = {}
    v2_mounts: list[Path] = []
    readonly: list[str] = []
    fstypes: dict[Path, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            fstypes[Path(_unescape(fields[1]))] = fields[2]
        if len(fields) < 4 or fields[2] not in ("cgroup", "cgroup2"):
            continue
        mount, options = Path(_unescape(fields[1])), fields[3].split(",")
        used = [c for c in V1_CONTROLLERS if c in options] if fields[2] == "cgroup" else []
        if fields[2] == "cgroup" and not used:
            continue  # name=systemd and controllers nodes do not use
        if "ro" in options:
            readonly.append(str(mount))
            continue
        if fields[2] == "cgroup2":
            v2_mounts.append(mount)
        for controller in used:
            v1.setdefault(controller, mount)
    if not v1 and not v2_mounts:
        if readonly:
            raise NodeError(
                f"cgroups are mounted read-only ({', '.join(readonly)}): nodes cannot be "
                "created. In a container, run it privileged or with a writable cgroupfs."
            )
        raise NodeError(
            "no cgroup hierarchy is mounted (nothing of type cgroup or cgroup2 in "
            f"{MOUNTS}): mount cgroup2 at /sys/fs/cgroup (mount -t cgroup2 none /sys/fs/cgroup)."
        )
    preferred = [m for m in v2_mounts if str(m) in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")]
    v2 = (preferred or v2_mounts or [None])[0]
    controllers = _read_controllers(v2) if v2 is not None else frozenset()
    ordered = {c: v1[c] for c in V1_CONTROLLERS if c in v1}
    mounts = [*ordered.values(), *([v2] if v2 is not None else [])]
    common = Path(os.path.commonpath([str(m) for m in mounts]))
    root = common if fstypes.get(common) in ("tmpfs", "cgroup", "cgroup2") else None
    return Layout(v1=ordered, v2=v2, v2_controllers=controllers - ordered.keys(), root=root)


def detect() -> Layout:
    """Detect the cgroup layout of this machine (hybrid or unified).

    Raises NodeError with what to do when cgroups are not usable.
    """
    try:
        text = MOUNTS.read_text()
    except OSError as e:
        raise NodeError(f"cannot read {MOUNTS} to find the cgroup mounts: {e.strerror}") from None
    return layout_from_mounts(text)
