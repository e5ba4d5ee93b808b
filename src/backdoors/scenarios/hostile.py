"""The hostile-node scenario: a node's root attacks its own host's agent, and fails.

    hostile_node() -> {"attacks": [{"name", "succeeded", "detail"}], "succeeded",
        "agent_answered_throughout", "agent_read_p99_ms", "agent_reads",
        "other_node_healthy", "other_node", "duration_s"}

A lab of one host (its agent sealed, under its keeper) and two nodes: n0 is hostile, n1 is
its neighbour with its sample service and the recoverable stream service serving two
client sessions (their boxes and sockets held by the agent). Every attack is a small
Python program run inside n0 as the node's root (`Lab.run_in_node(root=True)`); it prints
what it managed to do. Around each attack the scenario takes a fingerprint of what the
node must not be able to change -- the agent's pid, run state, nice, I/O priority,
oom_score_adj and scheduling policy, its cgroup's freeze/limit files, n1's registered
regions and held sessions -- and an attack "succeeded" if the fingerprint changed, if
n1's progress sensor did not move during it, or if the program itself reports an effect
(a connection to the private network established, a cgroup file written, a refused
registration accepted). Meanwhile a reader thread asks the agent (authenticated, over the
private network, as a monitor does) for n1's sensors every 20 ms; one error or timeout
makes `agent_answered_throughout` false.

Each attack is also a function `ATTACKS[name](h)` of a running `Hostile` (the tests run
them one by one).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import BackdoorsError, LabError
from ..lab import topology
from ..lab.clients import StreamClients
from ..nodes import Cgroup, detect
from ..sensors import parse_box
from .labkit import AgentLab, unique_name, wait_until

PY = sys.executable
HOSTILE, NEIGHBOUR = "n0", "n1"
READ_EVERY_S = 0.02
READ_TIMEOUT_S = 1.0
SESSIONS = 2
NODE_MEMORY = 384 << 20  # the hostile node's memory limit: its memory + tmpfs fill stops there
#: cgroup files whose values the node must not change (those that exist are watched)
CGROUP_FILES = ("cgroup.freeze", "freezer.state", "memory.max", "memory.limit_in_bytes",
                "pids.max", "cpu.max", "cpu.weight", "io.max", "cgroup.procs")
#: ports of the host tried from the node besides the agent's (a metrics port would be one)
OTHER_PORTS = (9100, 9464, 8080, 22)

# ---- the programs run in the node ------------------------------------------------------

PRELUDE = r'''
import array, ctypes, errno, fcntl, json, os, socket, sys, time
ARG = json.loads(sys.argv[1])
SOCK = os.environ.get("BACKDOORS_AGENT_SOCKET", "")
libc = ctypes.CDLL(None, use_errno=True)
def out(**kw):
    print(json.dumps(kw), flush=True)
def err(e):
    return errno.errorcode.get(e.errno, str(e.errno)) if isinstance(e, OSError) else repr(e)
def connect(timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(SOCK)
    return s
def recvn(s, n):
    b = b""
    while len(b) < n:
        d = s.recv(n - len(b))
        if not d:
            raise EOFError("closed")
        b += d
    return b
def send_frame(s, payload, fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    s.sendmsg([len(payload).to_bytes(4, "big") + payload], anc)
def reply(s):
    import msgspec
    return msgspec.msgpack.decode(recvn(s, int.from_bytes(recvn(s, 4), "big")))
def request(req, fds=(), s=None):
    import msgspec
    own = s is None
    s = s or connect()
    try:
        send_frame(s, msgspec.msgpack.encode(req), fds)
        return reply(s)
    finally:
        if own:
            s.close()
def memfd(size, seals=0, content=b""):
    fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if content:
        os.pwrite(fd, content, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd
def box_bytes(name):
    from backdoors.sensors import SensorBox
    b = SensorBox.create(name)
    b.progress("p", deadline=1.0)
    return os.pread(b.fd, os.fstat(b.fd).st_size, 0)
'''

SIGNAL_ALL = r'''
import signal
res = {}
for name, sig in (("stop", signal.SIGSTOP), ("cont", signal.SIGCONT), ("kill", signal.SIGKILL)):
    try:
        os.kill(-1, sig)
        res[name] = "sent"
    except OSError as e:
        res[name] = err(e)
    time.sleep(0.05)
visible = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
targets = {}
for pid in ARG["pids"]:
    try:
        os.kill(pid, signal.SIGSTOP)
        targets[pid] = "sent"
    except OSError as e:
        targets[pid] = err(e)
out(kill_minus_1=res, visible_pids=visible, host_pids=targets,
    effect=any(v == "sent" for v in targets.values()))
'''

PTRACE = r'''
PTRACE_ATTACH, PTRACE_SEIZE, PTRACE_DETACH = 16, 0x4206, 17
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
res, effect = {}, False
buf = ctypes.create_string_buffer(64)
for pid in ARG["pids"]:
    r = {}
    for name, req in (("attach", PTRACE_ATTACH), ("seize", PTRACE_SEIZE)):
        rc = libc.ptrace(ctypes.c_long(req), ctypes.c_long(pid), None, None)
        r[name] = "ok" if rc == 0 else errno.errorcode.get(ctypes.get_errno())
        if rc == 0:
            effect = True
            libc.ptrace(ctypes.c_long(PTRACE_DETACH), ctypes.c_long(pid), None, None)
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), 64)
    remote = iovec(ctypes.c_void_p(0x400000), 64)
    n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    r["process_vm_readv"] = n if n >= 0 else errno.errorcode.get(ctypes.get_errno())
    effect |= n >= 0
    for f in ("mem", "environ", "maps", "fd"):
        try:
            p = f"/proc/{pid}/{f}"
            if f == "fd":
                os.listdir(p)
            else:
                open(p, "rb").read(1)
            r[f] = "read"
            effect = True
        except OSError as e:
            r[f] = err(e)
    rc = libc.syscall(438, pid, 0)  # pidfd_open
    r["pidfd_open"] = "ok" if rc >= 0 else errno.errorcode.get(ctypes.get_errno())
    effect |= rc >= 0
    res[pid] = r
out(results=res, effect=effect)
'''

CGROUPFS = r'''
mounts = [l.split()[1:3] for l in open("/proc/self/mounts")]
cg = [m for m in mounts if m[1] in ("cgroup", "cgroup2")]
# 1. the host's cgroup files of the agent and of the neighbour, where they are visible
writes = {}
for path, value in ARG["writes"]:
    try:
        with open(path, "w") as f:
            f.write(value)
        writes[path] = "written"
    except OSError as e:
        writes[path] = err(e)
# 2. a cgroupfs of its own (its user namespace owns its cgroup namespace: the kernel allows
# the mount) -- whose root is the node's own cgroup, every file owned by the host's root
os.makedirs("/tmp/cgmnt", exist_ok=True)
tries, inside = {}, {}
for fstype, data in (("cgroup2", None), ("cgroup", b"freezer"), ("cgroup", b"pids"),
                     ("cgroup", b"memory")):
    rc = libc.mount(b"none", b"/tmp/cgmnt", fstype.encode(), 0, data)
    key = fstype + (":" + data.decode() if data else "")
    tries[key] = "mounted" if rc == 0 else errno.errorcode.get(ctypes.get_errno())
    if rc != 0:
        continue
    r = {"entries": len(os.listdir("/tmp/cgmnt")),
         "dirs": sorted(d for d in os.listdir("/tmp/cgmnt") if os.path.isdir("/tmp/cgmnt/" + d))}
    for f, v in (("cgroup.freeze", "1"), ("freezer.state", "FROZEN"), ("cgroup.procs", "1"),
                 ("pids.max", "1"), ("memory.max", "4096"), ("memory.limit_in_bytes", "4096"),
                 ("cgroup.subtree_control", "+pids")):
        p = "/tmp/cgmnt/" + f
        if os.path.exists(p):
            try:
                with open(p, "w") as fh:
                    fh.write(v)
                r[f] = "written"
            except OSError as e:
                r[f] = err(e)
    try:
        os.mkdir("/tmp/cgmnt/escape"); r["mkdir"] = "made"; os.rmdir("/tmp/cgmnt/escape")
    except OSError as e:
        r["mkdir"] = err(e)
    inside[key] = r
    libc.umount2(b"/tmp/cgmnt", 2)
os.rmdir("/tmp/cgmnt")
wrote = [f"{k}/{f}" for k, r in inside.items() for f, v in r.items() if v in ("written", "made")]
out(cgroup_mounts=len(cg), own_mount=tries, through_own_mount=inside, host_files=writes,
    effect=any(v == "written" for v in writes.values()) or bool(wrote)
    or any(set(r.get("dirs", ())) & set(ARG["foreign"]) for r in inside.values()))
'''

CGROUP_READS = r'''
# the agent's and the neighbour's cgroup files, read in a tight loop: their usage is not
# the node's to see, and reads of a cgroup's *.pressure files within a jiffy of each other
# make the kernel drop those intervals from its totals (the neighbour's PSI, blinded)
read, refused = {}, {}
end = time.monotonic() + ARG["seconds"]
while time.monotonic() < end:
    for path in ARG["paths"]:
        try:
            with open(path) as f:
                f.read()
            read[path] = read.get(path, 0) + 1
        except OSError as e:
            refused[path] = err(e)
out(tried=len(ARG["paths"]), read=len(read), refused=sorted(set(refused.values())),
    effect=bool(read))
'''

PRIORITY = r'''
res, effect = {}, False
for pid in ARG["pids"]:
    r = {}
    try:
        os.setpriority(os.PRIO_PROCESS, pid, 19); r["renice"] = "ok"; effect = True
    except OSError as e:
        r["renice"] = err(e)
    # ioprio_set(IOPRIO_WHO_PROCESS, pid, IOPRIO_CLASS_IDLE << 13)
    rc = libc.syscall(ARG["ioprio_set"], 1, pid, 3 << 13)
    r["ioprio_set"] = "ok" if rc == 0 else errno.errorcode.get(ctypes.get_errno())
    effect |= rc == 0
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write("1000")
        r["oom_score_adj"] = "written"; effect = True
    except OSError as e:
        r["oom_score_adj"] = err(e)
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0)); r["sched_idle"] = "ok"
        effect = True
    except OSError as e:
        r["sched_idle"] = err(e)
    try:
        os.sched_setaffinity(pid, {0}); r["affinity"] = "ok"; effect = True
    except OSError as e:
        r["affinity"] = err(e)
    res[pid] = r
# everything it may touch by group or user: its own processes only
for who, name in ((os.PRIO_PGRP, "pgrp0"), (os.PRIO_USER, "user0")):
    try:
        os.setpriority(who, 0, 19); res[name] = "ok (its own processes)"
    except OSError as e:
        res[name] = err(e)
out(results=res, effect=effect)
'''

NETWORK = r'''
import shutil, subprocess
res, effect, changes = {}, False, {}
# first try to make a way there: an address and a route on the private network, forwarding
ip = shutil.which("ip")
for label, argv in (("ip addr add", [ip, "addr", "add", "10.99.0.77/24", "dev", "eth0"]),
                    ("ip route add", [ip, "route", "add", "10.99.0.0/24", "dev", "eth0"])):
    if ip is None:
        changes[label] = "no ip tool"
        continue
    r = subprocess.run(argv, capture_output=True, text=True)
    changes[label] = "done" if r.returncode == 0 else (r.stderr.strip() or str(r.returncode))
    effect |= r.returncode == 0
try:
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")
    changes["ip_forward"] = "written"; effect = True
except OSError as e:
    changes["ip_forward"] = err(e)
res["changes"] = changes
for addr, port in ARG["targets"]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect((addr, port)); res[f"{addr}:{port}"] = "connected"; effect = True
    except OSError as e:
        res[f"{addr}:{port}"] = err(e) if not isinstance(e, socket.timeout) else "timeout"
    finally:
        s.close()
routes = open("/proc/net/route").read().split("\n")[1:]
links = os.listdir("/sys/class/net")
out(results=res, links=links, routes=[r.split()[:3] for r in routes if r.strip()], effect=effect)
'''

MALFORMED = r'''
import random
rnd = random.Random(9)
n, replies, dropped, errors = ARG["count"], 0, 0, {}
s = connect()
kinds = [b"\xc1", b"\x92\x01", b"\x81\xa2op\xc0", b"\x80", b"\xa5hello", b"\x82\xa2op\xa8register\xa4node\xa2n1"]
for i in range(n):
    payload = kinds[i % len(kinds)] if i % 3 else bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 40)))
    try:
        send_frame(s, payload)
        r = reply(s)
        replies += 1
        if r.get("ok"):
            errors.setdefault("accepted", []).append(payload.hex())
    except (OSError, EOFError):
        dropped += 1
        s.close()
        s = connect()
# framing abuse: oversized length, a header then silence, a length of 4 GiB
for bad in (b"\xff\xff\xff\xff", (70000).to_bytes(4, "big") + b"x" * 100):
    c = connect()
    try:
        c.sendall(bad)
        r = reply(c)
        errors.setdefault("framing", []).append(r.get("error"))
    except (OSError, EOFError) as e:
        errors.setdefault("framing", []).append(err(e))
    c.close()
s.close()
out(sent=n, replies=replies, reconnects=dropped, notes=errors,
    effect=bool(errors.get("accepted")))
'''

CONNECTIONS = r'''
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (ARG["count"] + 200,) * 2)
socks, failed, accepted_open = [], {}, 0
for i in range(ARG["count"]):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(SOCK)
        socks.append(s)
    except BlockingIOError:
        socks.append(s)
    except OSError as e:
        failed[err(e)] = failed.get(err(e), 0) + 1
        s.close()
time.sleep(0.3)
out(holding=len(socks))  # the scenario registers a box from the neighbour meanwhile
sys.stdin.readline()
for s in socks:  # the ones the agent kept open (not closed at once past its cap)
    try:
        d = s.recv(1)
        if d == b"":
            continue
    except BlockingIOError:
        accepted_open += 1
    except OSError:
        pass
# the node's own legitimate registration still goes through meanwhile? (capped per node)
try:
    r = request({"op": "unregister", "name": "does-not-exist"})
    legit = r.get("error")
except (OSError, EOFError) as e:
    legit = "no answer: " + err(e)
for s in socks:
    s.close()
out(opened=len(socks), failed=failed, kept_open_by_agent=accepted_open,
    own_request_during_flood=legit, effect=False)
'''

MEMFDS = r'''
import mmap
res = {}
box = box_bytes("evil")
size = len(box)
def reg(name, fd, kind="sensorbox"):
    try:
        r = request({"op": "register", "kind": kind, "name": name}, [fd])
        return "ACCEPTED" if r.get("ok") else r.get("error")
    except (OSError, EOFError) as e:
        return "no answer: " + err(e)
S = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
res["huge_1TiB_sealed"] = reg("huge", memfd(1 << 40, S, box))
res["huge_64MiB_sealed"] = reg("big", memfd(64 << 20, S, box))
res["unsealed"] = reg("unsealed", memfd(size, 0, box))
res["grow_seal_only"] = reg("growonly", memfd(size, fcntl.F_SEAL_GROW, box))
res["empty_sealed"] = reg("empty", memfd(0, S))
res["garbage_sealed"] = reg("garbage", memfd(size, S, os.urandom(size)))
# a regular file, a pipe, a socket, /dev/zero instead of a memfd
os.makedirs("/tmp/h", exist_ok=True)
f = os.open("/tmp/h/regular", os.O_RDWR | os.O_CREAT, 0o600); os.pwrite(f, box, 0)
res["regular_file"] = reg("regular", f)
r, w = os.pipe()
res["pipe"] = reg("pipe", r)
res["dev_zero"] = reg("zero", os.open("/dev/zero", os.O_RDONLY))
os.unlink("/tmp/h/regular"); os.rmdir("/tmp/h")
# a memfd that shrinks after registration: sealed with F_SEAL_SHRINK (else refused above),
# registered, then shrunk; and then its pages punched out (reads see zeros, never SIGBUS)
fd = memfd(size, S, box)
res["shrinkable_registered"] = reg("shrinker", fd)
try:
    os.ftruncate(fd, 0); res["shrink_after"] = "SHRUNK"
except OSError as e:
    res["shrink_after"] = err(e)
try:
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0)
    libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(size))  # PUNCH_HOLE|KEEP_SIZE
    res["punch_hole_after"] = "punched" if ctypes.get_errno() == 0 else errno.errorcode.get(ctypes.get_errno())
except OSError as e:
    res["punch_hole_after"] = err(e)
# the content changes under the agent: a torn header, then an odd generation forever
m = mmap.mmap(fd, size)
m[:8] = b"\xff" * 8
res["rewritten"] = "the header overwritten"
bad = [k for k in ("huge_1TiB_sealed", "huge_64MiB_sealed", "unsealed", "grow_seal_only",
                   "empty_sealed", "garbage_sealed", "regular_file", "pipe", "dev_zero")
       if res[k] == "ACCEPTED"]
out(results=res, wrongly_accepted=bad, effect=bool(bad) or res["shrink_after"] == "SHRUNK")
'''

OTHER_NODE = r'''
res = {}
box = box_bytes(ARG["victim_box"])
S = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
fd = memfd(len(box), S, box)
for label, req in (("extra node field", {"op": "register", "kind": "sensorbox",
                                         "name": ARG["victim_box"], "node": ARG["victim"]}),
                   ("node-like name", {"op": "register", "kind": "sensorbox",
                                       "name": ARG["victim"] + "/" + ARG["victim_box"]}),
                   ("unregister victim's box", {"op": "unregister", "name": ARG["victim_box"]}),
                   ("release victim's session", {"op": "release", "name": ARG["victim_session"]}),
                   ("kernel box name", {"op": "register", "kind": "sensorbox", "name": "kernel"})):
    try:
        r = request(req, [fd] if req["op"] == "register" else [])
        res[label] = "ACCEPTED" if r.get("ok") else r.get("error")
    except (OSError, EOFError) as e:
        res[label] = "no answer: " + err(e)
# the victim's socket: not in this node's file system
vs = ARG["victim_socket"]
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(2); s.connect(vs)
    res["victim_socket"] = "connected"
except OSError as e:
    res["victim_socket"] = err(e)
# the same name in its own node is fine (names are per node): it must stay n0's
try:
    r = request({"op": "register", "kind": "sensorbox", "name": ARG["victim_box"]}, [fd])
    res["same name in own node"] = "accepted (as n0's)" if r.get("ok") else r.get("error")
except (OSError, EOFError) as e:
    res["same name in own node"] = err(e)
bad = [k for k in ("extra node field", "node-like name", "unregister victim's box",
                   "release victim's session", "kernel box name") if res[k] == "ACCEPTED"]
out(results=res, effect=bool(bad) or res["victim_socket"] == "connected")
'''

DESCRIPTORS = r'''
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
res = {}
box = box_bytes("fdx")
S = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
# 250 descriptors on one frame (the agent takes 64 at most: 32 boxes of an attach)
fds = [memfd(len(box), S, box) for _ in range(250)]
try:
    r = request({"op": "register", "kind": "sensorbox", "name": "many"}, fds)
    res["250_fds_one_frame"] = "ACCEPTED" if r.get("ok") else r.get("error")
except (OSError, EOFError) as e:
    res["250_fds_one_frame"] = "dropped: " + err(e)
# as many regions as the agent keeps (its cap), each with its own descriptor
kept, refused = 0, None
s = connect()
for i in range(ARG["regions"]):
    try:
        r = request({"op": "register", "kind": "sensorbox", "name": f"r{i}"}, [fds[i % 250]], s)
    except (OSError, EOFError) as e:
        refused = "dropped: " + err(e); break
    if r.get("ok"):
        kept += 1
    else:
        refused = r.get("error"); break
res["regions_kept"], res["then"] = kept, refused
# held sessions: connected TCP sockets in the node, handed over one by one (capped)
lsn = socket.socket(); lsn.bind(("127.0.0.1", 0)); lsn.listen(4096)
held, why = 0, None
for i in range(ARG["sessions"]):
    c = socket.create_connection(lsn.getsockname())
    a, _ = lsn.accept()
    try:
        r = request({"op": "hold_socket", "name": f"cb-x{i}"}, [c.fileno()], s)
    except (OSError, EOFError) as e:
        why = "dropped: " + err(e); break
    c.close(); a.close()
    if r.get("ok"):
        held += 1
    else:
        why = r.get("error"); break
res["sockets_held"], res["sockets_then"] = held, why
# and release them again (the agent closes its duplicates)
for i in range(held):
    request({"op": "release", "name": f"cb-x{i}"}, (), s)
for i in range(kept):
    request({"op": "unregister", "name": f"r{i}"}, (), s)
s.close()
out(results=res, effect=res["250_fds_one_frame"] == "ACCEPTED")
'''

FILL = r'''
import signal, threading
limit = ARG["bytes"]
dirs = {}
def fill(d):
    n, why = 0, "limit reached"
    path = os.path.join(d, ".hostile-fill")
    try:
        with open(path, "wb", buffering=0) as f:
            chunk = b"\xab" * (1 << 20)
            while n < limit:
                n += f.write(chunk)
    except OSError as e:
        why = err(e)
    st = os.statvfs(d)
    dirs[d] = {"written_mib": n >> 20, "stopped_by": why, "dev": os.stat(d).st_dev,
               "fs_free_mib": st.f_bavail * st.f_frsize >> 20}
    try:
        os.unlink(path)
    except OSError:
        pass
# the memory hog in a child: the node's OOM killer may take it (not this reporter)
hog = os.fork()
if hog == 0:
    got = []
    try:
        while len(got) < ARG["memory_mib"]:
            got.append(bytearray(b"\xcd") * (1 << 20))
    except MemoryError:
        pass
    time.sleep(1.0)
    os._exit(0)
writable = [d for d in ARG["dirs"] if os.path.isdir(d) and os.access(d, os.W_OK)]
threads = [threading.Thread(target=fill, args=(d,)) for d in writable]
for t in threads:
    t.start()
for t in threads:
    t.join()
_, status = os.waitpid(hog, 0)
memory = (f"killed by signal {os.WTERMSIG(status)} (the node's memory limit)"
          if os.WIFSIGNALED(status) else "held all it asked for")
out(writable=writable, dirs=dirs, memory_hog=memory, effect=False)
'''

SOCKET_BUFFERS = r'''
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * ARG["connections"] + 64), hard))
# kernel memory outside the node's own pages: data queued in loopback TCP connections it
# never reads (the host's one pool, net.ipv4.tcp_mem, unless its cgroup counts them)
lsn = socket.socket(); lsn.bind(("127.0.0.1", 0)); lsn.listen(1024)
pairs, queued, why = [], 0, "asked bytes queued"
chunk = b"\xee" * 65536
end = time.monotonic() + 20
while queued < ARG["bytes"]:
    if len(pairs) >= ARG["connections"] or time.monotonic() > end:
        why = f"no more room after {len(pairs)} connections"
        break
    try:
        c = socket.create_connection(lsn.getsockname(), timeout=2); a, _ = lsn.accept()
    except OSError as e:
        why = "connect: " + err(e); break
    c.setblocking(False)
    try:
        while queued < ARG["bytes"]:
            queued += c.send(chunk)
    except BlockingIOError:
        pass
    except OSError as e:
        why = "send: " + err(e)
    pairs.append((c, a))
# the kernel lets every socket queue a little even past its cgroup's limit (tcp_wmem[0])
bound = ARG["limit"] + len(pairs) * ARG["per_connection"]
out(queued_mib=queued >> 20, connections=len(pairs), stopped_by=why,
    limit_mib=ARG["limit"] >> 20, bound_mib=bound >> 20, effect=queued > bound)
'''

PROGRAMS = {"signal-all": SIGNAL_ALL, "ptrace-and-mem": PTRACE, "cgroupfs": CGROUPFS,
            "cgroup-reads": CGROUP_READS, "priority": PRIORITY, "private-network": NETWORK,
            "registration-malformed-flood": MALFORMED, "registration-connection-flood": CONNECTIONS,
            "registration-bad-memfds": MEMFDS, "registration-other-node": OTHER_NODE,
            "descriptor-exhaustion": DESCRIPTORS, "fill-disk-and-memory": FILL,
            "socket-buffers": SOCKET_BUFFERS}


# ---- the host side -----------------------------------------------------------------------

@dataclass
class Attack:
    name: str
    succeeded: bool
    detail: str

    def to_dict(self) -> dict:
        return {"name": self.name, "succeeded": self.succeeded, "detail": self.detail}


_libc = ctypes.CDLL(None, use_errno=True)
#: (ioprio_set, ioprio_get) syscall numbers (no libc wrapper)
IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31)}.get(os.uname().machine, (251, 252))


def _proc_facts(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/oom_score_adj") as f:
            oom = int(f.read())
    except OSError:
        return {"alive": False}
    state = fields[0]  # running and sleeping alternate; stopped, traced or dead must not happen
    return {"alive": True, "state": {"T": "stopped", "t": "traced", "Z": "zombie", "X": "dead"}
            .get(state, "running"), "nice": int(fields[16]), "oom_score_adj": oom,
            "ioprio": _libc.syscall(IOPRIO_SYSCALLS[1], 1, pid),  # IOPRIO_WHO_PROCESS
            "policy": os.sched_getscheduler(pid), "affinity": sorted(os.sched_getaffinity(pid))}


@dataclass
class Reader:
    """Authenticated reads of the neighbour's sensors every READ_EVERY_S, in a thread."""

    hostile: "Hostile"
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    progress: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile-reader", daemon=True)

    def start(self) -> Reader:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        h = self.hostile
        client = h.lab.agent_client(h.host, timeout=READ_TIMEOUT_S)
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    reply = client.sensors(NEIGHBOUR)
                    self.latencies.append((time.monotonic() - t0) * 1000)
                    value = _progress(reply.boxes, h.stream_box)
                    if value is not None:
                        self.progress.append((time.monotonic(), value))
                except (BackdoorsError, OSError) as e:
                    self.errors.append(f"{time.strftime('%H:%M:%S')} {e}")
                    client.close()
                    client = h.lab.agent_client(h.host, timeout=READ_TIMEOUT_S)
                self._stop.wait(max(0.0, READ_EVERY_S - (time.monotonic() - t0)))
        finally:
            client.close()

    def p99(self) -> float | None:
        if not self.latencies:
            return None
        s = sorted(self.latencies)
        return round(s[min(len(s) - 1, int(len(s) * 0.99))], 2)


def _progress(boxes: dict[str, bytes], box: str) -> float | None:
    raw = boxes.get(box)
    if raw is None:
        return None
    sensor = next((s for s in parse_box(raw).sensors if s.name == "progress"), None)
    return None if sensor is None else sensor.value


class Hostile:
    """The running lab of the scenario: n0 hostile, n1 serving two recoverable sessions
    to clients; `run(attack)` runs one attack and judges it. A context manager."""

    def __init__(self, name: str | None = None):
        self.name = name or unique_name("x")
        self.alab = AgentLab(self.name, hosts=1, nodes=2, memory_limit=NODE_MEMORY)
        self.lab = self.alab.lab
        self.host = self.lab.plan.node(HOSTILE).host
        self.stream_box = f"rsvc-{NEIGHBOUR}"
        self.clients: StreamClients | None = None
        self.reader: Reader | None = None

    def __enter__(self) -> Hostile:
        self.alab.up()
        try:
            self.lab.start_service(NEIGHBOUR, recoverable=True)
            self.alab.wait_registered(NEIGHBOUR)
            self.clients = StreamClients(self.lab, self.lab.plan.node(NEIGHBOUR).vip,
                                         topology.RECOVERABLE_PORT, SESSIONS)
            self.clients.__enter__()
            wait_until(lambda: len(self.neighbour_sessions()) == SESSIONS, 20,
                       f"{SESSIONS} sessions of {NEIGHBOUR} held by the agent")
            wait_until(lambda: self.progress() is not None, 10, "the stream service's box")
            self.agent = self.lab.agent_pid(self.host)
            if self.agent is None:
                raise LabError(f"the agent of host {self.host} has no pid (started without "
                               "its keeper?)")
            self.keeper = self.lab.state.agents[self.host]
            self.reader = Reader(self).start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.reader is not None:
            self.reader.stop()
        if self.clients is not None:
            self.clients.close()
        self.alab.down()

    # -- what the node must not change ---------------------------------------------------

    def neighbour_sessions(self) -> list:
        with self.lab.agent_client(self.host, timeout=5.0) as c:
            return c.call("sessions", node=NEIGHBOUR)

    def progress(self) -> float | None:
        with self.lab.agent_client(self.host, timeout=5.0) as c:
            return _progress(c.sensors(NEIGHBOUR).boxes, self.stream_box)

    def cgroup_files(self) -> dict[str, str]:
        layout = detect()
        out = {}
        for rel in (self.lab.plan.host(self.host).agent_cgroup,
                    self.lab.plan.node(NEIGHBOUR).cgroup):
            for path in Cgroup(rel, layout).paths.values():
                for name in CGROUP_FILES:
                    p = path / name
                    try:
                        out[str(p)] = p.read_text().strip()
                    except OSError:
                        pass
        return out

    def fingerprint(self) -> dict:
        with self.lab.agent_client(self.host, timeout=5.0) as c:
            regions = sorted(r.name for r in c.regions(NEIGHBOUR))
            sessions = sorted(str(s) for s in c.call("sessions", node=NEIGHBOUR))
        return {"agent_pid": self.lab.agent_pid(self.host), "agent": _proc_facts(self.agent),
                "keeper": _proc_facts(self.keeper), "cgroups": self.cgroup_files(),
                f"{NEIGHBOUR}_regions": regions, f"{NEIGHBOUR}_sessions": sessions,
                f"{NEIGHBOUR}_service_alive": self.lab.service(NEIGHBOUR).pid is not None
                and os.path.exists(f"/proc/{self.lab.service(NEIGHBOUR).pid}")}

    # -- attacks -------------------------------------------------------------------------

    def node_program(self, code: str, arg: dict, timeout: float = 30.0,
                     during: Callable[[], dict] | None = None) -> tuple[dict | None, str]:
        """Run `code` (after PRELUDE) in the hostile node as its root; (its JSON, stderr).
        `during`: the program prints a first line and waits for one on stdin; `during()`
        runs in between, its result lands under "during" in the program's."""
        proc = self.lab.run_in_node(HOSTILE, [PY, "-c", PRELUDE + code, json.dumps(arg)],
                                    root=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.PIPE if during else subprocess.DEVNULL)
        meanwhile = None
        try:
            if during is not None:
                first = proc.stdout.readline()  # bounded by the program's own steps
                meanwhile = during() if first else {"error": "the program did not get there"}
                proc.stdin.write(b"\n")
                proc.stdin.flush()
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=5)
            return None, f"timed out after {timeout:g} s; {err.decode(errors='replace')[-300:]}"
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
        if not lines:
            return None, f"exit {proc.returncode}; {err.decode(errors='replace')[-500:]}"
        result = json.loads(lines[-1])
        if meanwhile is not None:
            result["during"] = meanwhile
            result["effect"] = result.get("effect") or bool(meanwhile.get("effect"))
        return result, err.decode(errors="replace")[-300:]

    def neighbour_registers(self) -> dict:
        """A new Sensor Box registered from inside the neighbour, as its services do;
        {"neighbour_registration": reply or error, "effect": refused}."""
        code = ("import json\nfrom backdoors.sensors import SensorBox\n"
                "from backdoors.common.runtime import register_box, unregister\n"
                "b = SensorBox.create('hostile-probe')\n"
                "try:\n    r = register_box(b, timeout=5.0); ok = True\n"
                "    unregister('hostile-probe', timeout=5.0)\n"
                "except Exception as e:\n    r, ok = str(e), False\n"
                "print(json.dumps({'reply': str(r), 'ok': ok}))\n")
        proc = self.lab.run_in_node(NEIGHBOUR, [PY, "-c", code], stdout=subprocess.PIPE)
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)
            return {"neighbour_registration": "timed out", "effect": True}
        try:
            r = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"neighbour_registration": f"no answer (exit {proc.returncode})", "effect": True}
        return {"neighbour_registration": "accepted" if r["ok"] else r["reply"],
                "effect": not r["ok"]}

    def run(self, name: str) -> Attack:
        """Run attack `name` and judge it (see the module docstring)."""
        before, p0 = self.fingerprint(), self.progress()
        errors_before = len(self.reader.errors) if self.reader else 0
        t0 = time.monotonic()
        during = self.neighbour_registers if name == "registration-connection-flood" else None
        result, err = self.node_program(PROGRAMS[name], self.argument(name), during=during)
        elapsed = time.monotonic() - t0
        # the neighbour's progress must have moved during the attack (it ticks every 10 ms)
        p1 = self._progressed(p0)
        after = self.fingerprint()
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        if "cgroups" in changed:
            b, a = changed["cgroups"]
            changed["cgroups"] = {k: (b.get(k), a.get(k)) for k in set(b) | set(a)
                                  if b.get(k) != a.get(k)}
        reader_errors = (self.reader.errors[errors_before:] if self.reader else [])
        effects = []
        if result is None:
            effects.append(f"the attack program gave no result ({err.strip()})")
        elif name == "fill-disk-and-memory":
            effects += self._on_host_fs(result)
        elif result.get("effect"):
            effects.append("the program reports an effect")
        if changed:
            effects.append(f"changed: {changed}")
        if p1 is None:
            effects.append(f"{NEIGHBOUR}'s progress sensor did not move")
        if reader_errors:
            effects.append(f"the agent failed {len(reader_errors)} reads: {reader_errors[:3]}")
        report = dict(result or {})
        report.pop("effect", None)
        detail = (f"{'; '.join(effects) + ' -- ' if effects else 'no effect -- '}"
                  f"{json.dumps(report, sort_keys=True)} ({elapsed:.1f} s)")
        return Attack(name, bool(effects), detail)

    def _on_host_fs(self, result: dict) -> list[str]:
        """Fill writes that landed on a file system of the host (not private to the node,
        so not bounded by its memory limit): a node could fill the host's disk."""
        host_devs = {os.stat(p).st_dev for p in ("/", "/tmp", str(self.lab.plan.run_dir))}
        shared = [f"{d} ({r['written_mib']} MiB)" for d, r in result.get("dirs", {}).items()
                  if r.get("written_mib") and r.get("dev") in host_devs]
        return [f"writes landed on the host's file system: {', '.join(shared)}"] if shared else []

    def _progressed(self, p0: float | None) -> float | None:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            p = self.progress()
            if p is not None and p0 is not None and p > p0:
                return p
            time.sleep(0.02)
        return None

    def argument(self, name: str) -> dict:
        plan = self.lab.plan
        pids = [self.agent, self.keeper]
        if name == "priority":
            return {"pids": pids, "ioprio_set": IOPRIO_SYSCALLS[0]}
        if name in ("signal-all", "ptrace-and-mem"):
            return {"pids": pids}
        if name == "cgroupfs":
            layout = detect()
            writes = []
            for rel in (plan.host(self.host).agent_cgroup, plan.node(NEIGHBOUR).cgroup):
                for path in Cgroup(rel, layout).paths.values():
                    for f, value in (("cgroup.freeze", "1"), ("freezer.state", "FROZEN"),
                                     ("cgroup.procs", "1"), ("memory.max", "4096"),
                                     ("pids.max", "1"), ("cpu.max", "1000 100000")):
                        writes.append([str(path / f), value])
            foreign = [plan.host(self.host).agent_cgroup.rsplit("/", 1)[-1],
                       plan.node(NEIGHBOUR).cgroup.rsplit("/", 1)[-1]]
            return {"writes": writes, "foreign": foreign}
        if name == "cgroup-reads":
            layout = detect()
            paths = [str(path / f)
                     for rel in (plan.host(self.host).agent_cgroup, plan.node(NEIGHBOUR).cgroup)
                     for path in Cgroup(rel, layout).paths.values()
                     for f in ("cpu.pressure", "memory.pressure", "io.pressure", "memory.current",
                               "memory.usage_in_bytes", "pids.current", "cgroup.procs")
                     if (path / f).exists()]
            return {"paths": paths, "seconds": 1.0}
        if name == "private-network":
            h = plan.host(self.host)
            targets = [[h.address, topology.AGENT_PORT], [topology.MONITOR_ADDR, topology.AGENT_PORT]]
            targets += [[h.address, p] for p in OTHER_PORTS]
            return {"targets": targets}
        if name == "registration-malformed-flood":
            return {"count": 10_000}
        if name == "registration-connection-flood":
            return {"count": 3000}
        if name == "registration-other-node":
            sessions = self.neighbour_sessions()
            victim_session = sessions[0]["name"] if sessions and isinstance(sessions[0], dict) \
                else "cb-0"
            return {"victim": NEIGHBOUR, "victim_box": self.stream_box,
                    "victim_session": victim_session,
                    "victim_socket": str(plan.run_dir / "nodes" / NEIGHBOUR / "agent.sock")}
        if name == "descriptor-exhaustion":
            return {"regions": 200, "sessions": 600}
        if name == "socket-buffers":
            return {"bytes": NODE_MEMORY + (128 << 20), "limit": NODE_MEMORY,
                    "connections": 256, "per_connection": 64 << 10}
        if name == "fill-disk-and-memory":
            node_run = str(self.lab.node_run_dir(HOSTILE))
            return {"dirs": ["/tmp", "/dev/shm", "/var/tmp", node_run, "/"],
                    "bytes": 128 << 20, "memory_mib": (NODE_MEMORY >> 20) + 64}
        return {}

    def neighbour_healthy(self) -> tuple[bool, dict]:
        sessions = self.neighbour_sessions()
        report = self.clients.report(0.0) if self.clients else {}
        gaps = [b[0] - a[0] for a, b in zip(self.reader.progress, self.reader.progress[1:])
                if b[1] > a[1]] if self.reader else []
        moved = bool(self.reader and len(self.reader.progress) > 1
                     and self.reader.progress[-1][1] > self.reader.progress[0][1])
        facts = {"sessions_held": len(sessions), "progress_moved": moved,
                 "progress_samples": len(self.reader.progress) if self.reader else 0,
                 "max_progress_gap_ms": round(max(gaps, default=0) * 1000, 1),
                 "client_sessions_ok": report.get("sessions_ok"),
                 "broken_connections": report.get("broken_connections")}
        ok = (len(sessions) == SESSIONS and moved and report.get("broken_connections") == 0)
        return ok, facts


ATTACKS: dict[str, Callable[[Hostile], Attack]] = {
    name: (lambda h, n=name: h.run(n)) for name in PROGRAMS}


def hostile_node(name: str | None = None) -> dict:
    """Run every attack from the hostile node; the facts (see the module docstring)."""
    t0 = time.monotonic()
    with Hostile(name) as h:
        attacks = [ATTACKS[n](h) for n in ATTACKS]
        h.reader.stop()
        healthy, facts = h.neighbour_healthy()
        reader = h.reader
    return {"attacks": [a.to_dict() for a in attacks],
            "succeeded": sum(a.succeeded for a in attacks),
            "agent_answered_throughout": not reader.errors and bool(reader.latencies),
            "agent_reads": len(reader.latencies), "agent_read_errors": reader.errors[:10],
            "agent_read_p99_ms": reader.p99(),
            "other_node_healthy": healthy, "other_node": facts,
            "duration_s": round(time.monotonic() - t0, 1)}
