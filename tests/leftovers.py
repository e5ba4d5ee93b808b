"""What a killed test run left behind, reaped when the next run starts.

Tests name their kernel objects and files `bdt-<unique>...` and remove them as they end;
a run killed before (SIGKILL, a CI timeout) leaves them: cgroups with their processes,
network namespaces, etcd and NATS servers, stand-alone VMs' QEMUs (their own session:
their owner's death does not end them), folders in /tmp and /dev/shm. Every run holds
a shared lock on RUNS_LOCK while it runs; a run that can take it exclusively at its start
is the only one, so every `bdt-` object is a dead run's, and it reaps them.
"""

import fcntl
import logging
import os
import shutil
from pathlib import Path

from backdoors.fleet import nats, process
from backdoors.lab.lab import reap_abandoned
from backdoors.net import netns
from backdoors.nodes import cgroups
from backdoors.vm import machine

RUNS_LOCK = "/run/backdoors-tests.lock"
PREFIX = "bdt-"

log = logging.getLogger("backdoors.tests")


def hold_runs_lock() -> int:
    """Take the runs' lock for this run (kept until the process exits: its descriptor,
    returned); first reap what dead runs left if no other run is live."""
    fd = os.open(RUNS_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # another run is live: what it made is its own
    else:
        reaped = reap()
        if any(reaped.values()):
            log.warning("reaped what a killed test run left: %s", reaped)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def reap() -> dict[str, list]:
    """Remove every `bdt-` object and file, and every lab whose owner died."""
    reaped: dict[str, list] = {"processes": nats.reap(PREFIX) + process.reap(PREFIX)
                               + machine.reap(PREFIX)}  # stand-alone VMs' QEMUs
    reaped["labs"] = reap_abandoned()
    reaped["cgroups"] = cgroups.reap(PREFIX)
    reaped["netns"] = netns.reap(PREFIX)
    reaped["files"] = []
    for folder in ("/tmp", "/dev/shm"):
        for path in Path(folder).glob(f"{PREFIX}*"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            reaped["files"].append(str(path))
    return reaped
