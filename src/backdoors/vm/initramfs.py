"""The guest's initramfs: busybox (static), an /init script and the NIC's modules.

Written as a cpio "newc" archive by Python (no root, no cpio tool): every entry owned by
root whoever builds it. The /init brings the virtio NIC up with the addresses given on the
kernel command line (`bd.addr=A/P,B/P`), serves HTTP on `bd.port` with busybox httpd, and
prints `bd-guest: ready` on the console once it listens. A few CGI programs (CGI) let the
host make the guest run a system call, a process, a memory benchmark or a benign workload.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

from ..errors import VmError
from .kernel import GuestKernel, cache_dir

BUSYBOX = Path("/bin/busybox")
#: the guest's STREAM-like benchmark (its /bin/stream), built static on the host
STREAM_C = Path(__file__).with_name("stream.c")
#: the NIC: virtio-net over virtio-pci (modules in Debian's cloud kernel); deps are added
NIC_MODULES = ("virtio_pci", "virtio_net")
READY = "bd-guest: ready"
_HEAD = '#!/bin/sh\necho "Content-Type: text/plain"\necho\n'
#: CGI programs of the guest's httpd (/cgi-bin/NAME): what the host asks the guest to do
#: in the integrity tests and the vm scenario (`?N` is the argument)
CGI = {
    # a system call a rootkit can hijack: the kernel release, or the error
    "uname": _HEAD + 'uname -r 2>&1 || echo "uname failed"\n',
    # the guest's own view of what the host reads from its memory: load, processes
    "proc": _HEAD + "cat /proc/loadavg; cat /proc/[0-9]*/stat 2>/dev/null\n",
    "vmstat": _HEAD + "cat /proc/vmstat\n",
    # a long-lived process (the one the rootkit hides): its pid
    "spawn": _HEAD + "sleep 86400 </dev/null >/dev/null 2>&1 &\necho $!\n",
    # a STREAM-like copy loop: N passes of copy_to_user over a 16 MiB page-cache file
    "stream": _HEAD + "[ -f /tmp/stream ] || dd if=/dev/zero of=/tmp/stream bs=1M count=16 2>/dev/null\n"
              "i=0; while [ $i -lt ${QUERY_STRING:-1} ]; do dd if=/tmp/stream of=/dev/null bs=1M 2>/dev/null;"
              " i=$((i+1)); done\necho done\n",
    # benign work for N seconds in the background: file copies, compression (CPU),
    # memory churn, process creation
    "work": _HEAD + "end=$(( $(date +%s) + ${QUERY_STRING:-60} ))\n"
            "( while [ $(date +%s) -lt $end ]; do cp -a /bin /tmp/w; rm -rf /tmp/w;"
            " dd if=/dev/urandom of=/tmp/m bs=64k count=64 2>/dev/null; gzip -c /tmp/m | gunzip >/dev/null;"
            " rm -f /tmp/m; ps >/dev/null; done ) </dev/null >/dev/null 2>&1 &\necho started\n",
    # Orion's faults, bounded so the guest lives on: a leak of N MiB into a tmpfs of its
    # own (the root's is capped at half the RAM), 1 MiB per 50 ms, held 2 s, then freed;
    # and a fork bomb of depth N (2^(N+1) - 1 processes, each sleeping 3 s, then gone)
    "hog": _HEAD + "mkdir -p /hog; grep -q ' /hog ' /proc/mounts || mount -t tmpfs -o size=95% tmpfs /hog 2>&1\n"
           "grep ' /hog ' /proc/mounts\n"
           "( i=0; while [ $i -lt ${QUERY_STRING:-64} ]; do"
           " dd if=/dev/zero bs=1M count=1 >>/hog/leak 2>/dev/null; i=$((i+1)); usleep 50000; done;"
           " sleep 2; rm -f /hog/leak ) </dev/null >/dev/null 2>&1 &\necho started\n",
    # the STREAM-like benchmark (/bin/stream: ?N,NTIMES -- N doubles an array, best of NTIMES)
    "streambench": _HEAD + "IFS=,; set -- ${QUERY_STRING:-1048576,10}; /bin/stream \"$1\" \"$2\"\n",
    # what the agent's Orion and the monitor act on (docs/vm-backdoor.md): a process whose
    # own memory grows N MiB, 1 MiB per 50 ms (`tail` keeping what it reads), and a
    # process tree of depth N spinning (2^(N+1) - 1 processes, runnable, until killed);
    # each prints its top process's pid
    # (tail's buffer is allocated at once: N MiB, not more than the guest can commit)
    "grow": _HEAD + "n=${QUERY_STRING:-64}; ( i=0; while [ $i -lt $n ]; do dd if=/dev/zero bs=1M"
            " count=1 2>/dev/null; i=$((i+1)); usleep 50000; done ) </dev/null"
            " | tail -c $((n * 1048576)) >/dev/null 2>&1 &\necho $!\n",
    # CPU-bound workers started one by one: N of them, one every MS ms (?N,MS), each
    # spinning until killed, under one parent; prints the parent's pid
    "workers": _HEAD + "IFS=,; set -- ${QUERY_STRING:-64,100}; ( i=0; while [ $i -lt $1 ]; do"
               " ( while :; do :; done ) & i=$((i + 1)); usleep $(($2 * 1000)); done; wait )"
               " </dev/null >/dev/null 2>&1 &\necho $!\n",
    "spin": _HEAD + "b() { if [ $1 -gt 0 ]; then b $(($1 - 1)) & b $(($1 - 1)) & fi; while :; do :; done; }\n"
            "( b ${QUERY_STRING:-3} ) </dev/null >/dev/null 2>&1 &\necho $!\n",
    # a fork bomb of depth N whose processes stay until killed, each waking once a second
    # (tail -f: a SIGKILL written from outside takes a sleeper when it wakes, vm/kill.py);
    # prints its root's pid
    "breed": _HEAD + "b() { if [ $1 -gt 0 ]; then b $(($1 - 1)) & b $(($1 - 1)) & fi;"
             " exec tail -f /dev/null; }\n"
             "( b ${QUERY_STRING:-9} ) </dev/null >/dev/null 2>&1 &\necho $!\n",
    # a runaway that takes the guest service's name: the STREAM-like benchmark run as
    # /tmp/httpd, holding N MiB and spinning until killed; prints its pid
    "impostor": _HEAD + "ln -sf /bin/stream /tmp/httpd; /tmp/httpd $(( ${QUERY_STRING:-64} * 43690 ))"
                " 1000000000 </dev/null >/dev/null 2>&1 &\necho $!\n",
    # a CGI program that renames itself httpd (under the service's worker, which waits for
    # it) and grows N MiB, 1 MiB per 50 ms, until killed; prints its pid at once
    "renamed": _HEAD + r"""echo $$
printf httpd > /proc/$$/comm
i=0; while [ $i -lt ${QUERY_STRING:-64} ]; do
  eval "v$i=\$(head -c 1048576 /dev/zero | tr '\000' x)"; i=$((i+1)); usleep 50000
done
while :; do sleep 1; done
""",
    "bomb": _HEAD + "b() { if [ $1 -gt 0 ]; then b $(($1 - 1)) & b $(($1 - 1)) & fi; exec sleep 3; }\n"
            "( b ${QUERY_STRING:-8} ) </dev/null >/dev/null 2>&1 &\necho started\n",
}

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules); do insmod /lib/modules/$m || echo "bd-guest: insmod $m failed"; done
name=guest; addrs=; port=80
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    bd.name=*) name="${arg#bd.name=}";;
    bd.addr=*) addrs="${arg#bd.addr=}";;
    bd.port=*) port="${arg#bd.port=}";;
  esac
done
hostname "$name"
ip link set lo up
ip link set eth0 up
for a in $(echo "$addrs" | tr , ' '); do ip addr add "$a" dev eth0; done
mkdir -p /www/cgi-bin
echo "vm $name" > /www/index.html
for s in /etc/cgi/*; do ln -s "$s" /www/cgi-bin/; done
httpd -p "$port" -h /www
echo "%s $name" > /dev/console
while true; do sleep 3600; done
""" % READY


def module_paths(kernel: GuestKernel, names: tuple[str, ...]) -> list[Path]:
    """The .ko files of `names` and what they depend on, dependencies first (read from
    each module's .modinfo `depends=`: the package ships no modules.dep)."""
    index = {p.name.removesuffix(".ko").replace("-", "_"): p
             for p in kernel.modules_dir.rglob("*.ko")}
    order: list[Path] = []

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise VmError(f"module dependency loop: {' -> '.join(chain + (name,))}")
        path = index.get(name)
        if path is None:
            raise VmError(f"kernel {kernel.version} has no module {name!r} under {kernel.modules_dir}")
        if path in order:
            return
        for dep in _depends(path):
            add(dep, chain + (name,))
        order.append(path)

    for n in names:
        add(n, ())
    return order


def _depends(ko: Path) -> list[str]:
    data = ko.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    end = data.index(b"\0", at + 1)
    deps = data[at + len(b"\0depends="):end].decode()
    return [d.replace("-", "_") for d in deps.split(",") if d]


def build(kernel: GuestKernel, out: Path | None = None) -> Path:
    """The initramfs for `kernel` (cached by content under cache_dir() unless `out`)."""
    if not BUSYBOX.is_file():
        raise VmError(f"{BUSYBOX} missing: install busybox-static (make system-deps)")
    mods = module_paths(kernel, NIC_MODULES)
    archive = Archive()
    for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "lib", "lib/modules"):
        archive.directory(d)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.file("bin/stream", stream_binary().read_bytes(), 0o755)
    archive.file("init", INIT.encode(), 0o755)
    archive.directory("etc/cgi")
    for name, script in CGI.items():
        archive.file(f"etc/cgi/{name}", script.encode(), 0o755)
    archive.file("etc/modules", "".join(f"{m.name}\n" for m in mods).encode(), 0o644)
    for m in mods:
        archive.file(f"lib/modules/{m.name}", m.read_bytes(), 0o644)
    data = archive.close()
    if out is None:
        digest = hashlib.sha256(data).hexdigest()[:16]
        out = cache_dir() / f"initramfs-{kernel.version}-{digest}.cpio"
        if out.exists():
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out


def stream_binary() -> Path:
    """vm/stream.c built static with the host's gcc (cached by its source under
    cache_dir()): the guest has no libc of its own."""
    source = STREAM_C.read_bytes()
    out = cache_dir() / f"stream-{hashlib.sha256(source).hexdigest()[:16]}"
    if out.exists():
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise VmError("gcc missing: it builds the guest's STREAM benchmark (make system-deps)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    try:
        run = subprocess.run([gcc, "-O2", "-static", "-o", str(tmp), str(STREAM_C)],
                             capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise VmError(f"building {STREAM_C} failed (is libc6-dev installed, for a static "
                          f"link?): {run.stderr.strip()[-500:]}")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


class Archive:
    """A cpio archive in the "newc" format the kernel unpacks (uncompressed)."""

    def __init__(self):
        self._buf = io.BytesIO()
        self._ino = 0

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def close(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", nlink=1, ino=0)
        return self._buf.getvalue()

    def _entry(self, name: str, mode: int, data: bytes, *, nlink: int = 1,
               ino: int | None = None) -> None:
        if ino is None:
            self._ino += 1
            ino = self._ino
        raw = name.encode() + b"\0"
        # magic, then 13 fields of 8 hex digits: ino mode uid gid nlink mtime filesize
        # devmajor devminor rdevmajor rdevminor namesize check
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        self._write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        self._write(data)

    def _write(self, chunk: bytes) -> None:
        self._buf.write(chunk)
        self._buf.write(b"\0" * (-self._buf.tell() % 4))
