"""Kernel integrity of a VM node (issue 15 §3): a baseline from the kernel image, a checker
that covers it a slice per tick, the `rootkit` fault through QEMU's gdbstub, and healing
with the vCPUs stopped -- on a real guest (TCG)."""

import contextlib
import struct
import time

import pytest

from backdoors.errors import VmError
from backdoors.vm.image import KernelImage
from backdoors.vm.kernel import GuestKernel

from conftest import unavailable
from test_vm import _eventually, _memfds, _qemus, qemu  # noqa: F401 - the fixture


@pytest.fixture(scope="module")
def image() -> KernelImage:
    try:
        return KernelImage(GuestKernel.find())
    except VmError as e:
        unavailable(str(e))


def test_image_relocations_slide_pointers_like_the_boot_decompressor(image):
    k = image.kernel
    relocs = image.relocations
    assert relocs["32"] and relocs["32neg"] and relocs["64"]
    table = k.symbol("sys_call_table")
    slide = 0x1E00_0000
    at_link = struct.unpack("<4Q", image.bytes_at(table, 32))
    slid = struct.unpack("<4Q", image.bytes_at(table, 32, slide))
    assert at_link[0] == k.symbol("__x64_sys_read")  # the table as linked
    assert [b - a for a, b in zip(at_link, slid)] == [slide] * 4
    with pytest.raises(VmError, match="no loaded segment holds"):
        image.bytes_at(0x7000_0000_0000, 16)


def test_patch_sites_come_from_the_images_own_tables(image):
    from backdoors.vm.integrity import patch_sites
    sites, jumps = patch_sites(image)
    k = image.kernel
    # static-key sites in the kernel's text (the rest are in init code, freed after boot)
    assert sum(k.symbol("_text") <= c < k.symbol("_etext") for c in jumps) > 1000
    # a function's ftrace site (its first bytes, after any ENDBR) is patchable at boot;
    # its body is not
    fn = k.symbol("__x64_sys_newuname")
    assert sites.covers(fn, fn + 5) or sites.covers(fn + 4, fn + 9)
    assert not sites.covers(fn + 5, fn + 6)  # mov 0x70(%rdi),%rdi


def test_diff_runs():
    from backdoors.vm.integrity import diff_runs
    assert diff_runs(b"abcdef", b"abcdef") == []
    assert diff_runs(b"abcdef", b"xbcdyz") == [(0, 1), (4, 6)]


def test_static_key_flips_are_told_from_other_changes():
    from backdoors.vm.integrity import diff_runs, site_change
    link = 0xFFFF_FFFF_8100_0000
    # two adjacent 2-byte sites (jmp +0x0b, jmp +0x17) and a 5-byte one (a NOP)
    clean = bytes.fromhex("4889f3" "eb0b" "eb17" "4889df" "0f1f440000" "c3")
    jumps = {link + 3: link + 0x10, link + 5: link + 0x1E, link + 10: link + 0x100}

    def change(live):
        kinds = {site_change(link, clean, live, s, e, jumps) for s, e in diff_runs(clean, live)}
        return None if None in kinds else "poke" if "poke" in kinds else "flip"

    assert change(bytes.fromhex("4889f3" "6690" "6690" "4889df" "0f1f440000" "c3")) == "flip"  # both off
    assert change(bytes.fromhex("4889f3" "eb0b" "eb17" "4889df" "e9f1000000" "c3")) == "flip"  # on: its target
    assert change(bytes.fromhex("4889f3" "eb0c" "eb17" "4889df" "0f1f440000" "c3")) is None  # elsewhere
    assert change(bytes.fromhex("4889f3" "eb0b" "eb17" "4889df" "e9f2000000" "c3")) is None
    assert change(bytes.fromhex("4889f3" "6690" "eb17" "4889d0" "0f1f440000" "c3")) is None  # not a site
    # a flip under way: an int3 over the first byte, the tail old or new
    assert change(bytes.fromhex("4889f3" "cc0b" "eb17" "4889df" "0f1f440000" "c3")) == "poke"
    assert change(bytes.fromhex("4889f3" "cc90" "eb17" "4889df" "cc1f440000" "c3")) == "poke"
    assert change(bytes.fromhex("4889f3" "6690" "eb17" "4889df" "ccf1000000" "c3")) == "poke"
    assert change(bytes.fromhex("4889f3" "cc0c" "eb17" "4889df" "0f1f440000" "c3")) is None  # a tail of neither
    assert change(bytes.fromhex("4889f3" "eb0b" "eb17" "4889df" "ccf2000000" "c3")) is None
    assert change(bytes.fromhex("cc89f3" "eb0b" "eb17" "4889df" "0f1f440000" "c3")) is None  # an int3 off a site


@pytest.mark.slow
def _parent(memory, pid: int) -> int | None:
    with contextlib.suppress(VmError):  # a walk that a fork or an exit broke
        return next(t.ppid for t in memory.process_table() if t.pid == pid)
    return None


def test_rootkit_detected_by_symbol_and_healed_guest_keeps_running(qemu, unique):
    from backdoors.lab import Lab
    from backdoors.scenarios.vm import guest_get
    from backdoors.vm import rootkit
    from backdoors.vm.integrity import Baseline, Checker, Healer
    name = f"i{unique}"
    with Lab(name, hosts=1, nodes=1, services=False, vm_nodes=1) as lab:
        vm = lab.vm("v0")
        memory = vm.memory()
        baseline = Baseline.take(memory)
        # every byte the kernel patched at boot lies in a site its image declares
        assert baseline.unexplained == [] and baseline.idt_unexplained == []
        assert baseline.sources["text.image"] > 0 and baseline.sources["rodata.image"] > 1000
        checker = Checker(baseline, pages_per_tick=256)
        assert checker.sweep() == []
        ticks = 0
        while checker.sweeps < 2:
            assert checker.tick() == [], "a clean guest shows no finding"
            ticks += 1
        assert ticks >= 2 * len(baseline.pages) // 256  # bounded work per tick
        uname = guest_get(lab, "v0", "/cgi-bin/uname").strip()
        assert uname == GuestKernel.find().version
        pid = int(guest_get(lab, "v0", "/cgi-bin/spawn").strip())
        deep = int(guest_get(lab, "v0", "/cgi-bin/spawn").strip())
        assert {pid, deep} <= set(dict(memory.tasks())) and pid in memory.pid_table()
        assert _eventually(lambda: _parent(memory, deep) == 1)  # its CGI's shell has exited

        # the three tampers, through QEMU's gdbstub
        was = rootkit.redirect_syscall(vm, rootkit.NR_UNAME, "__x64_sys_ni_syscall")
        assert was == memory.virt("__x64_sys_newuname")
        rootkit.patch_function(vm, "__x64_sys_newuname")
        assert guest_get(lab, "v0", "/cgi-bin/uname").strip() != uname  # hijacked: fails
        task = rootkit.hide_process(vm, pid)
        deep_task = rootkit.hide_process(vm, deep, deep=True)  # off the process tree too
        assert not {pid, deep} & set(dict(memory.tasks()))
        assert deep not in [p for p, _c, _t in memory.process_tree()]
        assert memory.pid_table()[deep] == deep_task  # the kernel still finds it by its pid
        found = {}
        for _ in range(len(baseline.pages) // 256 + 3):
            for f in checker.tick():
                found[f.key] = f
        began = time.monotonic()  # a hidden task counts once seen twice with the guest run between
        while not {("process", f"pid {p}") for p in (pid, deep)} <= set(found) \
                and time.monotonic() - began < 30:
            time.sleep(0.01)
            for f in checker.tick():
                found[f.key] = f
        syscall = found[("syscall", f"sys_call_table[{rootkit.NR_UNAME}]")]
        assert "__x64_sys_ni_syscall" in syscall.detail and "__x64_sys_newuname" in syscall.detail
        patched = [f for f in found.values() if f.kind == "text"]
        assert [f.where for f in patched] == ["__x64_sys_newuname+0x0"]
        hidden = found[("process", f"pid {pid}")]
        assert hidden.virt == task and "sleep" in hidden.detail
        assert found[("process", f"pid {deep}")].virt == deep_task
        assert ("rodata", "sys_call_table+0x1f8") in found  # the table's page, too
        # static keys the guest flipped meanwhile (DO_ONCE in the net code) were followed
        assert checker.benign_flips >= 0

        # healing: clean bytes back with the vCPUs stopped, verified; the guest runs on
        assert Healer(vm).heal(list(found.values())) == []
        assert vm.running()
        assert checker.sweep() == []
        assert guest_get(lab, "v0", "/cgi-bin/uname").strip() == uname
        assert {pid, deep} <= set(dict(memory.tasks()))
        assert deep in [p for p, _c, _t in memory.process_tree()]  # back with its parent
        assert memory.hidden_tasks() == []
        assert guest_get(lab, "v0", "/").strip() == f"vm bd-{name}-v0"

        # an int3 over a jump-label site (of code this guest never runs): a static key
        # flip under way when first seen; still there after the guest ran, a finding
        site = min(s for s in baseline.jumps
                   if baseline.symbols.name(s).startswith("suspend_devices_and_enter+"))
        page = baseline.page_of(site)
        with vm.debug() as stub:
            clean = stub.read_phys(page.phys + site - page.link, 1)
            stub.write_phys(page.phys + site - page.link, b"\xcc")
        jiffies = memory.jiffies()
        assert checker.sweep() == []
        while memory.jiffies() == jiffies:
            time.sleep(0.01)
        (int3,) = checker.sweep()
        assert (int3.kind, int3.where, int3.clean[:1]) == \
            ("text", baseline.symbols.name(site), clean), int3
        assert "int3" in int3.detail
        assert Healer(vm).heal([int3]) == [] and checker.sweep() == []
        # a pid that is not there is refused, nothing written
        with pytest.raises(VmError, match="no process 99999 to hide"):
            rootkit.hide_process(vm, 99999)
        assert vm.running()
    assert _qemus(f"bd-{name}-") == [] and _memfds(f"bd-{name}-") == []


@pytest.mark.slow
def test_vm_scenario_reports_every_figure(qemu):
    """`backdoors scenario vm` in small: a short benign run, a short overhead measure."""
    from backdoors.scenarios import SCENARIOS
    r = SCENARIOS["vm"](benign_s=10, overhead_pairs=2, stream_n=1 << 18, stream_times=5,
                         tamper_rounds=2)
    print({k: r[k] for k in ("boot_s", "accel", "guest_hang_detect_ms", "tamper_detect_ms",
                             "false_positives", "overhead_pct", "scan_cpu_pct")})
    for key in ("boot_s", "guest_hang_detect_ms", "benign_minutes", "overhead_pct"):
        assert isinstance(r[key], (int, float))
    assert r["accel"] in ("tcg", "kvm")
    stream = r["stream"]  # the guest's STREAM, with the scan paused and running
    assert len(stream["runs_without"]) == len(stream["runs_with"]) == 2
    assert all(run["triad_mb_s"] > 0 and run["copy_us"] > 0 for run in stream["runs_with"])
    assert set(r["tamper_detect_ms"]) == {"p50", "p99"}
    assert [t["name"] for t in r["tampers"]] == ["syscall-table", "function-patch", "hidden-process"] * 2
    assert all(t["detected"] and t["healed"] for t in r["tampers"]), r["tampers"]
    assert r["tampers"][1]["uname_hijacked"] and not r["tampers"][2]["on_task_list_while_hidden"]
    assert not r["tampers"][2]["in_process_tree_while_hidden"]  # found by the pid map
    assert r["tamper_healed"] and r["hidden_process_found"]
    assert r["false_positives"] == 0, r["false_positive_findings"]
    assert r["baseline"]["unexplained_at_attach"] == []
    # Orion: both faults reach their bound; a steady leak is predicted before it does
    assert isinstance(r["prediction_false_alarms"], int)
    leak, bomb, runaways = r["prediction"]["faults"]
    assert leak["bound_crossed"] and bomb["bound_crossed"], r["prediction"]
    assert runaways["bound_crossed"], r["prediction"]
    assert leak["alarm"] is not None and leak["lead_ms"] > 0, r["prediction"]
    assert set(r["prediction_lead_ms"]) == {"memory-leak", "fork-bomb", "runaways"}
    # Orion's other inputs in each phase: the bomb fills the run queues; data pages move
    inputs = r["prediction"]["inputs"]
    assert set(inputs) == {"benign", "memory-leak", "fork-bomb", "runaways"}, inputs
    assert inputs["fork-bomb"]["running_max"] > inputs["benign"]["running_p50"], inputs
    assert inputs["runaways"]["running_max"] > inputs["benign"]["running_p50"], inputs
    assert all(i["refaults_per_s"] >= 0 for i in inputs.values()), inputs
    # (a fault's phase may end before a full pass over the kernel's data pages)
    assert all(0 < i["data_churn_pct_p50"] < 100 for i in inputs.values()
               if "passes" in i) and "passes" in inputs["benign"], inputs
    # the report's timeline: every tamper written, detected and healed, on one clock
    events = r["timeline"]["events"]
    for lane in ("syscall-table", "function-patch", "hidden-process"):
        kinds = [e["kind"] for e in events if e["lane"] == lane]
        assert kinds == ["tamper", "detected", "healed"] * 2, (lane, kinds)
    assert [e["kind"] for e in events if e["lane"] == "memory-leak"] == ["fault", "alarm"]
    assert all(e["t"] >= 0 for e in events)


def test_a_kernel_tampered_before_attach_is_reported_at_attach_and_healed_to_the_image(
        qemu, image, unique, tmp_path):
    """Outside review: what differed from the image at attach became the clean baseline
    and was never reported; put right later, the clean value was reported as the tamper
    and healing wrote the rootkit's back. Now: open findings from attach (level, event,
    kernel_integrity's list), healed to the image's bytes (an ftrace site to its boot
    NOP); an IDT gate with no clean value known is reported, not healed, until it is put
    right."""
    from backdoors.vm import rootkit
    from backdoors.vm.guard import GuestWatch
    from backdoors.vm.integrity import patch_sites
    from backdoors.vm.machine import Vm, VmSpec
    from backdoors.vm.memory import GuestMemory
    from leftovers import PREFIX
    vm = Vm.start(VmSpec(f"{PREFIX}a{unique}-v0", tmp_path))
    try:
        memory, k = vm.memory(), vm.kernel
        slide = memory.kaslr_offset
        from backdoors.vm.memory import WALK_LIMIT
        assert 20 < memory._tasks_bound(None) < WALK_LIMIT  # the guest's threads-max bounds walks
        sites, _ = patch_sites(image)
        # 4 bytes of code the guest never runs, in no patch site: int3s over them
        start = k.symbol("suspend_devices_and_enter")
        link = next(a for a in range(start, start + 256)
                    if not any(sites.covers(b, b + 1) for b in range(a - 8, a + 12)))
        clean = image.bytes_at(link, 4, slide)
        text = memory.phys("_text") + link - k.symbol("_text")
        assert memory.read(text, 4) == clean
        with vm.debug() as stub:
            stub.write_phys(text, b"\xcc" * 4)
        was = rootkit.redirect_syscall(vm, rootkit.NR_UNAME, "__x64_sys_ni_syscall")
        # over a function's first bytes: its ftrace site (the NOP the kernel wrote at boot)
        # and past it
        uname = rootkit.patch_function(vm, "__x64_sys_newuname")
        # IDT vector 4 (#OF: INTO is invalid in 64-bit mode, never raised) -> elsewhere
        gate_at = memory.phys("idt_table") + 16 * 4
        gate = memory.read(gate_at, 16)
        to = memory.virt("__x64_sys_ni_syscall")
        forged = bytearray(gate)
        struct.pack_into("<H", forged, 0, to & 0xFFFF)
        struct.pack_into("<HI", forged, 6, to >> 16 & 0xFFFF, to >> 32)
        with vm.debug() as stub:
            stub.write_phys(gate_at, bytes(forged))

        # an agent attaches now
        events = []
        agent = GuestMemory(vm.ram_fd, k, where="agent")
        watch = GuestWatch("v0", agent, on_change=lambda *a: events.append(a))
        try:
            guard = watch.integrity
            guard.step()  # the baseline
            assert guard.checker is not None
            found = {f.key: f for f in guard.findings()}
            name = guard.checker.baseline.symbols.name(link)
            assert found[("text", name)].clean == clean
            syscall = found[("syscall", f"sys_call_table[{rootkit.NR_UNAME}]")]
            assert syscall.clean == struct.pack("<Q", was) and "at attach" in syscall.detail
            assert ("rodata", f"sys_call_table+{8 * rootkit.NR_UNAME:#x}") in found
            idt = found[("idt", "idt_table[4]")]
            assert idt.clean == b"" and "not healable" in idt.detail
            patched = found[("text", "__x64_sys_newuname+0x0")]
            assert patched.clean == uname and "8 bytes differ" in patched.detail
            assert set(found) == {("text", name), syscall.key, idt.key, patched.key,
                                  ("rodata", f"sys_call_table+{8 * rootkit.NR_UNAME:#x}")}
            assert watch.sensors.tampered.value == len(found) == 5
            assert [(v, n) for v, _new, n in events] == [(True, 5)]
            assert {f.key for f in events[0][1]} == set(found)
            for _ in range(len(guard.checker.baseline.pages) // guard.pages_per_tick + 2):
                guard.step()  # a whole sweep: the same four, told once
            assert {f.key for f in guard.findings()} == set(found) and len(events) == 1

            # healing writes the image's bytes, never the readings at attach
            healed, failed, left = guard.heal(vm)
            assert [f.key for f in failed] == [idt.key] and left == 0
            assert memory.read(text, 4) == clean
            assert memory.read(memory.phys("__x64_sys_newuname"), len(uname)) == uname
            entry = memory.phys("sys_call_table") + 8 * rootkit.NR_UNAME
            assert memory.read(entry, 8) == struct.pack("<Q", was)
            assert memory.read(gate_at, 16) == bytes(forged)  # not written
            assert [f.key for f in guard.findings()] == [idt.key]
            # the gate put right: its finding closes, that reading its clean value now
            with vm.debug() as stub:
                stub.write_phys(gate_at, gate)
            guard.step()
            assert guard.findings() == [] and guard.checker.sweep() == []
            assert guard.checker.baseline.idt[16 * 4:16 * 5] == gate
            assert vm.running()
        finally:
            watch.close()
            agent.close()
        # a banner any process could write, at a 2 MiB boundary below the kernel: not it
        banner = f"Linux version {k.version} (".encode()
        distance = k.image_offset("linux_banner")
        at = next(b + distance for b in range(0, memory.text_phys, 2 << 20)
                  if memory.read((b + distance) & ~0xFFF, 0x2000) == bytes(0x2000))
        with vm.debug() as stub:
            stub.write_phys(at, banner)
        with GuestMemory(vm.ram_fd, k, where="fresh") as fresh:
            assert fresh.text_phys == memory.text_phys and fresh.kaslr_offset == slide
        with vm.debug() as stub:
            stub.write_phys(at, bytes(len(banner)))
    finally:
        vm.stop()
    assert _qemus(f"{PREFIX}a{unique}-") == [] and _memfds(f"{PREFIX}a{unique}-") == []
