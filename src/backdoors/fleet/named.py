"""Server processes the fleet runs by name (etcd, nats-server), each with a folder of its
own: stopped with it, and found again by name after their owner crashed.

The name is the value after `--name` on the command line; it starts with the owner's
prefix, so that `reap(executable, prefix)` kills what a crashed owner left running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import psutil


def stop(proc: subprocess.Popen | None, folder: str) -> None:
    """Stop `proc` (SIGTERM, SIGKILL after 5 s) if it runs, and remove its `folder`."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(folder, ignore_errors=True)


def reap(executable: str, prefix: str) -> list[int]:
    """SIGKILL the `executable` processes whose `--name` starts with `prefix` (a crashed
    owner's) and wait for them to be gone (their data folders are removed next); the pids
    killed."""
    killed, procs = [], []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if not cmd or os.path.basename(cmd[0]) != executable or "--name" not in cmd:
            continue
        i = cmd.index("--name")
        if i + 1 < len(cmd) and cmd[i + 1].startswith(prefix):
            try:
                p.kill()
                killed.append(p.pid)
                procs.append(p)
            except psutil.Error:
                pass
    psutil.wait_procs(procs, timeout=5)
    return killed
