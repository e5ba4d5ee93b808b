"""`backdoors demo --scenario vm`: the VM backdoor in the live view.

A lab of one host with a container node (n0) and a VM node (v0: a QEMU guest whose
kernel the agent reads from its RAM, with no agent inside), an agent and a monitor
running the packaged "default" ruleset (the guest rules are in every ruleset; a guest
hang is recorded here, not fenced). In turn, with the guest's web server (httpd)
answering throughout:

- guest-rootkit: a rootkit in the guest kernel -- a system call table entry redirected,
  uname's kernel function patched, a process unlinked from the task list and from its
  parent's children -- found by the agent's integrity guard, healed by the monitor's
  `kernel-integrity` rule (the clean bytes and the links written back with the vCPUs
  stopped); uname works again, the process is listed again.
- guest-hog: a process in the guest eating its memory; the agent's Orion foresees the
  guest running out from its kernel's counters; the `guest-unstable` rule kills the
  process from outside (SIGKILL written into the guest kernel) before it does.
- guest-fork-bomb: a fork bomb in the guest, foreseen the same way; its whole tree is
  killed from its root, with no child slipping out.
- guest-runaways: CPU-bound processes piling up on the guest's run queue (the livelock of
  a starved service, the kernel still ticking), foreseen before the run queue's ceiling
  and killed the same way.

Needs the guest kernel (`make vm-kernel`); docs/vm-backdoor.md.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import LabError
from ..lab import Lab
from ..scenarios.recovery import monitor_for
from ..scenarios.vm import adopted_process, guest_get
from ..sensors import GUEST_BOX, parse_box
from ..vm import rootkit
from .steps import TIMEOUT_S, Step, _note_incident, _wait

VM = "v0"
#: the fork bomb's depth: 2^(N+1) - 1 processes if nothing stops it
BOMB_DEPTH = 9
#: CPU-bound workers started one by one: how many, one every how many ms
RUNAWAYS = "64,100"


class GuestWorld:
    """The VM demo's world: the lab and its monitor, torn down by `close()`."""

    def __init__(self, name: str, out_dir: Path, *, say=print):
        self.lab = Lab(name, hosts=1, nodes=1, agents=True, services=False, vm_nodes=1)
        self.out_dir, self.say = out_dir, say
        self.session_node = None  # no client sessions move in this demo
        self.progress_boxes = ()
        self.note = lambda text: None  # a line for the view's timeline (set by the runner)
        self.monitor = None
        self.served = 0  # the guest service's answers to the demo's checks

    def up(self) -> GuestWorld:
        self.say("building the lab: one host, a container node n0 and a VM node v0 "
                 "(a QEMU guest with its own kernel), an agent, a monitor")
        self.lab.up()
        boot = self.lab.state.vm_boots.get(VM, {})
        self.say(f"v0 booted in {boot.get('boot_s')} s ({boot.get('accel')}); the agent "
                 "takes its kernel's clean baseline from the kernel image on the host")
        with self.lab.agent_client("h0", timeout=10.0) as c:
            if not _wait(lambda: (r := c.kernel_integrity(VM)).ready and r.sweeps >= 1, 180):
                raise LabError(f"the agent took no clean baseline of {VM}'s kernel and swept "
                               "it once within 180 s")
        self.monitor = monitor_for(self.lab, incidents_dir=str(self.out_dir / "incidents"),
                                   rulesets=("default",))
        self.monitor.start()
        self.monitor.wait_ready(timeout=15)
        return self

    def watch(self, fn) -> None:
        """Call `fn(event, incident)` on the monitor's incidents."""
        self.monitor.subscribe(fn)

    def get(self, path: str) -> str:
        """GET `path` from the guest's httpd (counted: the service answered)."""
        body = guest_get(self.lab, VM, path, timeout=30.0)
        self.served += 1
        return body

    def guest(self) -> dict[str, float]:
        """The guest box's levels, as the agent reads them from the guest's memory."""
        with self.lab.agent_client("h0", timeout=10.0) as c:
            return {s.name: s.value for s in parse_box(c.sensors(VM).boxes[GUEST_BOX]).sensors}

    def summary(self) -> str:
        return (f"the guest's httpd on {self.lab.plan.vm(VM).vip}: answered {self.served} "
                "requests of the demo's")

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        self.lab.down()


def _guest_incident(w: GuestWorld, rule: str, action: str, since: float):
    """The incident of `rule` on VM since `since` whose `action` is done, or that failed
    or gave up (a response that found nothing to act on yet is not the repair)."""
    def acted(i) -> bool:
        runs = [a.status for a in i.actions if a.kind == action]
        return bool(runs) and ("done" in runs or i.state in ("failed", "unresolved"))
    return w.monitor.wait_for(lambda i: i.node == VM and i.rule == rule and
                              i.detected >= since and acted(i), TIMEOUT_S * 2)


def _cleared(w: GuestWorld, inc) -> bool:
    return w.monitor.wait_for(lambda i: i.id == inc.id and i.closed is not None,
                              TIMEOUT_S) is not None


def _healed(w: GuestWorld, since: float) -> set[tuple[str, str]]:
    """(kind, where) of every finding of VM healed by the monitor since `since`."""
    return {(f["kind"], f["where"].split("+")[0]) for i in w.monitor.incidents()
            if i.node == VM and i.detected >= since for a in i.actions
            if a.kind == "heal_kernel" for f in a.detail.get("healed", [])}


def guest_rootkit(w: GuestWorld) -> dict:
    step = Step("guest-rootkit", "guest kernel rootkit: found and healed", "repair", VM)
    vm = w.lab.vm(VM)
    uname = w.get("/cgi-bin/uname").strip()
    pid = adopted_process(w.lab, VM)
    tampers = {("syscall", f"sys_call_table[{rootkit.NR_UNAME}]"),
               ("text", "__x64_sys_newuname"), ("process", f"pid {pid}")}
    t0 = time.time()
    # one after the other, as a rootkit installs its hooks: each write stops the vCPUs,
    # and so does each heal; back to back on a loaded host they would hold the guest
    # past its jiffies deadline (a hang, recorded)
    for tamper in (lambda: rootkit.redirect_syscall(vm, rootkit.NR_UNAME, "__x64_sys_ni_syscall"),
                   lambda: rootkit.patch_function(vm, "__x64_sys_newuname"),
                   lambda: rootkit.hide_process(vm, pid, deep=True)):
        tamper()
        time.sleep(0.2)
    w.note(f"rootkit in {VM}'s kernel: sys_call_table[{rootkit.NR_UNAME}] redirected, "
           f"__x64_sys_newuname patched, process {pid} hidden")
    inc = _guest_incident(w, "kernel-integrity", "heal_kernel", t0)
    if not step.check("found and healed", inc is not None, "" if inc else "no incident"):
        return step.done("the rootkit was NOT healed")
    _note_incident(step, inc, t0, "heal_kernel")
    # each tamper is found when the guard's sweep reaches it, and healed then
    healed = _wait(lambda: tampers <= _healed(w, t0), TIMEOUT_S * 2)
    all_ms = round((time.time() - t0) * 1000)
    step.check("every tamper found and healed", healed,
               f"healed: {sorted(_healed(w, t0))}; tampered: {sorted(tampers)}")
    with w.lab.agent_client("h0", timeout=10.0) as c:
        left = [f"{f.kind} {f.where}" for f in c.kernel_integrity(VM).findings]
    step.check("no finding open after", not left, "; ".join(left))
    again = w.get("/cgi-bin/uname").strip()
    step.check("uname works again", again == uname, f"{again!r}, was {uname!r}")
    step.check(f"the hidden process {pid} is on the task list again",
               pid in dict(vm.memory().tasks()))
    step.check("the guest's service answered throughout", w.get("/").startswith("vm "))
    return step.done(f"3 tampers (system call table, kernel text, task list): the first "
                     f"found {step.record['detect_ms']:.0f} ms after the rootkit, all healed "
                     f"within {all_ms} ms; the guest ran on")


def _foreseen(inc) -> str:
    """What Orion foresaw, from the agent's push (or the poll that saw it first)."""
    e = inc.event or {}
    fired = sorted({v.sensor for h in inc.detectors for v in h.violations})
    eta = f" {e['eta_s']:.1f} s before its bound" if "eta_s" in e else ""
    return f"foreseen{eta} ({e.get('predicted') or ', '.join(fired)})"


def _killed(w: GuestWorld, step: Step, path: str, says) -> tuple | None:
    """Start a fault in the guest (GET `path`; `says(answer)` is its timeline line) and
    wait for the `guest-unstable` rule's kill: (the CGI's answer, the incident, the kill's
    culprit), or None if there was none (the step's check says so)."""
    t0 = time.time()
    answer = w.get(path).strip()
    w.note(says(answer))
    inc = _guest_incident(w, "guest-unstable", "kill_guest_culprit", t0)
    if not step.check("foreseen and repaired", inc is not None, "" if inc else "no incident"):
        return None
    _note_incident(step, inc, t0, "kill_guest_culprit")
    act = [a for a in inc.actions if a.kind == "kill_guest_culprit"][-1]  # the last attempt
    step.record["culprit"] = culprit = {**act.detail.get("culprit", {}), "status": act.status}
    return answer, inc, culprit


def _tree_killed(step: Step, what: str, culprit: dict, root: str) -> None:
    step.check(what, culprit["status"] == "done" and
               (culprit.get("pid"), culprit.get("by")) == (int(root), "lineage"), str(culprit))


def _after(w: GuestWorld, step: Step, inc) -> None:
    step.check("the guest's service answered throughout", w.get("/").startswith("vm "))
    step.check("the incident closed", _cleared(w, inc))


def guest_hog(w: GuestWorld) -> dict:
    step = Step("guest-hog", "guest memory hog: foreseen and killed", "repair", VM)
    available = w.guest()["available_mb"]
    got = _killed(w, step, f"/cgi-bin/grow?{int(available) - 16}",
                  lambda pid: f"a process in {VM} ({pid}) grows 20 MiB/s towards the "
                              f"{available:.0f} MiB left")
    if got is None:
        return step.done("the hog was NOT stopped")
    pid, inc, culprit = got
    step.check("the hog was the process killed", culprit["status"] == "done" and
               culprit.get("pid") == int(pid), str(culprit))
    back = _wait(lambda: w.guest()["available_mb"] > available - 16, 10.0)
    step.check("the guest's memory is back", back, f"{w.guest()['available_mb']:.0f} MiB")
    _after(w, step, inc)
    return step.done(f"{_foreseen(inc)}; the hog killed {step.record['repair_ms']:.0f} ms "
                     "after, from outside")


def guest_fork_bomb(w: GuestWorld) -> dict:
    step = Step("guest-fork-bomb", "guest fork bomb: foreseen and killed", "repair", VM)
    threads = w.guest()["threads"]
    got = _killed(w, step, f"/cgi-bin/breed?{BOMB_DEPTH}",
                  lambda root: f"a fork bomb in {VM} (root {root}), doubling each level")
    if got is None:
        return step.done("the fork bomb was NOT stopped")
    root, inc, culprit = got
    _tree_killed(step, "the bomb's tree was killed from its root", culprit, root)
    calm = _wait(lambda: w.guest()["threads"] <= threads + 8, 10.0)
    step.check("no process of the bomb is left", calm,
               f"{w.guest()['threads']:.0f} threads, {threads:.0f} before")
    step.check("the guest forks again (a CGI answers)", w.get("/cgi-bin/uname").strip() != "")
    _after(w, step, inc)
    return step.done(f"{_foreseen(inc)}; {culprit.get('processes')} processes killed "
                     f"{step.record['repair_ms']:.0f} ms after detection; the service ran on")


def guest_runaways(w: GuestWorld) -> dict:
    step = Step("guest-runaways", "guest CPU runaways: foreseen and killed", "repair", VM)
    got = _killed(w, step, f"/cgi-bin/workers?{RUNAWAYS}",
                  lambda root: f"CPU-bound workers started one by one in {VM} (parent "
                               f"{root}) pile up on its run queue")
    if got is None:
        return step.done("the runaways were NOT stopped")
    root, inc, culprit = got
    _tree_killed(step, "the workers were killed with their parent", culprit, root)
    idle = _wait(lambda: w.guest()["running"] <= 2, 10.0)
    step.check("the run queue is back to idle", idle, f"{w.guest()['running']:.0f} runnable")
    _after(w, step, inc)
    return step.done(f"{_foreseen(inc)}; {culprit.get('processes')} runaways killed "
                     f"{step.record['repair_ms']:.0f} ms after detection; the service ran on")


PLAYS = {"guest-rootkit": guest_rootkit, "guest-hog": guest_hog,
         "guest-fork-bomb": guest_fork_bomb, "guest-runaways": guest_runaways}

