"""VM nodes: the guest kernel's profile, the initramfs, a QEMU guest in the lab whose
service answers on the node's address, and its kernel read from its RAM alone."""

import os
import shutil
import time
from pathlib import Path

import psutil
import pytest

from backdoors.errors import VmError
from backdoors.net import netns
from backdoors.vm import initramfs
from backdoors.vm.kernel import GuestKernel

from conftest import unavailable
from leftovers import PREFIX


@pytest.fixture(scope="module")
def kernel() -> GuestKernel:
    try:
        return GuestKernel.find()
    except VmError as e:
        unavailable(str(e))


@pytest.fixture
def qemu(root):
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("busybox", "busybox-static")):
        if shutil.which(tool) is None:
            unavailable(f"{tool} missing: make system-deps installs {package}")


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc archive, read back independently of the writer."""
    out, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data[pos:pos + size])
        pos = (pos + size + 3) & ~3


def test_cpio_archive_reads_back():
    a = initramfs.Archive()
    a.directory("bin")
    a.file("bin/x", b"abcde", 0o755)
    a.file("init", b"#!/bin/sh\n", 0o700)
    entries = read_cpio(a.close())
    assert entries["bin/x"] == (0o100755, b"abcde")
    assert entries["init"] == (0o100700, b"#!/bin/sh\n")
    assert entries["bin"][0] == 0o040755


def test_foreign_or_truncated_images_are_refused_clearly(kernel):
    from backdoors.vm import btf, kallsyms
    with pytest.raises(VmError, match="not an x86 bzImage"):
        kallsyms.extract_vmlinux(b"\0" * 4096, "junk")
    image = kernel.image.read_bytes()
    with pytest.raises(VmError, match="truncated bzImage|payload|not an ELF|corrupt"):
        kallsyms.extract_vmlinux(image[:0x4000], "cut")
    with pytest.raises(VmError, match="no kallsyms token table"):
        kallsyms.symbols(b"\x7fELF" + b"\0" * 100_000, "empty")
    with pytest.raises(VmError, match="not BTF|truncated"):
        btf.Btf(b"\0" * 64)


def test_profile_from_the_image_alone(kernel):
    syms = kernel.symbols
    assert len(syms) > 50_000
    assert syms["_text"] == 0xFFFF_FFFF_8100_0000  # x86-64 link address of the image
    assert syms["jiffies"] == syms["jiffies_64"]  # the linker script aliases them
    for name in ("init_task", "sys_call_table", "linux_banner", "phys_base", "init_top_pgt"):
        assert syms[name] > syms["_text"]
    assert kernel.member("list_head", "next") == 0
    assert 0 < kernel.member("task_struct", "tasks") < kernel.member("task_struct", "comm")
    with pytest.raises(VmError, match="no offset of task_struct.nothing"):
        kernel.member("task_struct", "nothing")
    # the vmstat arrays' indexes, from the BTF's enums (they move between builds)
    assert kernel.enum("zone_stat_item", "NR_FREE_PAGES") == 0
    assert 0 < kernel.enum("node_stat_item", "NR_FILE_PAGES") < kernel.enum("node_stat_item", "NR_SHMEM")
    with pytest.raises(VmError, match="no value of node_stat_item.NOTHING"):
        kernel.enum("node_stat_item", "NOTHING")
    assert GuestKernel.find().symbol("jiffies") == syms["jiffies"]  # the cached profile
    with pytest.raises(VmError, match="no symbol 'no_such_symbol'"):
        kernel.symbol("no_such_symbol")


def _crafted_ram(kernel, text: int, slide: int, size: int = 96 << 20):
    """A guest RAM memfd holding the kernel at physical `text` with KASLR offset `slide`,
    as far as locating it reads (its banner, phys_base and the pages checked, relocated
    from the image), the rest a hole; and `put(phys, data)`."""
    from backdoors.vm.image import KernelImage
    from backdoors.vm.kernel import START_KERNEL_MAP
    from backdoors.vm.memory import PAGE
    fd = os.memfd_create(f"{PREFIX}crafted-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    put = lambda phys, data: os.pwrite(fd, data, phys)  # noqa: E731
    image, link = KernelImage(kernel), kernel.symbol("_text")
    for name in ("_text", "sys_call_table", "linux_banner"):  # (memory.CHECKED, the banner)
        at = kernel.symbol(name) - kernel.symbol(name) % PAGE
        put(text + at - link, image.bytes_at(at, 2 * PAGE, slide))
    phys_base = (text - (link + slide - START_KERNEL_MAP)) % (1 << 64)
    put(text + kernel.image_offset("phys_base"), phys_base.to_bytes(8, "little"))
    return fd, put


def test_a_forged_banner_in_guest_memory_is_not_taken_for_the_kernel(kernel):
    """Outside review: the first 2 MiB boundary whose 36-byte banner prefix matched was
    the kernel: any process could write one below the real one. A candidate holds the
    kernel only if its phys_base gives an offset KASLR chooses and the image's bytes,
    relocated for it, are there."""
    from backdoors.vm.kernel import START_KERNEL_MAP
    from backdoors.vm.memory import GuestMemory
    text, slide = 32 << 20, 6 << 20
    fd, put = _crafted_ram(kernel, text, slide)
    try:
        banner = f"Linux version {kernel.version} (".encode()
        distance = kernel.image_offset("linux_banner")
        put((2 << 20) + distance, banner)  # a banner alone (phys_base 0: an offset < 0)
        forged = 4 << 20  # a banner and a phys_base giving offset 0: no kernel bytes there
        put(forged + distance, banner)
        put(forged + kernel.image_offset("phys_base"),
            ((forged - (kernel.symbol("_text") - START_KERNEL_MAP)) % (1 << 64)).to_bytes(8, "little"))
        with GuestMemory(fd, kernel, where="crafted") as memory:
            assert memory.text_phys == text and memory.kaslr_offset == slide
        put(text + distance, bytes(len(banner)))  # the real one gone: none is the kernel
        with GuestMemory(fd, kernel, where="crafted") as memory:
            with pytest.raises(VmError, match="not found in memory.*refused at 0x200000.*0x400000"):
                memory.text_phys  # noqa: B018
    finally:
        os.close(fd)


def test_the_kaslr_offset_is_found_once_at_attach(kernel):
    """Outside review: phys_base was read from guest memory at every virt(): a guest
    that rewrote it moved every address the reader computes."""
    from backdoors.vm.memory import GuestMemory
    text, slide = 32 << 20, 6 << 20
    fd, put = _crafted_ram(kernel, text, slide)
    try:
        with GuestMemory(fd, kernel, where="crafted") as memory:
            where = memory.virt("sys_call_table")
            assert where == kernel.symbol("sys_call_table") + slide
            put(text + kernel.image_offset("phys_base"), (1 << 20).to_bytes(8, "little"))
            assert memory.kaslr_offset == slide and memory.virt("sys_call_table") == where
    finally:
        os.close(fd)


def test_initramfs_modules_dependencies_first(kernel):
    names = [p.name for p in initramfs.module_paths(kernel, initramfs.NIC_MODULES)]
    assert names[-1] == "virtio_net.ko"
    for dep, user in (("virtio.ko", "virtio_pci.ko"), ("net_failover.ko", "virtio_net.ko"),
                      ("failover.ko", "net_failover.ko")):
        assert names.index(dep) < names.index(user)
    entries = read_cpio(initramfs.build(kernel).read_bytes())
    assert entries["init"][0] & 0o111 and "bin/busybox" in entries
    assert entries["etc/modules"][1].decode().split() == names


def _qemus(prefix: str) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(a.startswith(prefix) for a in (p.info["cmdline"] or []))
            and "qemu" in (p.info["cmdline"] or [""])[0]]


def _memfds(prefix: str) -> list[str]:
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd).startswith(f"/memfd:{prefix}"):
                        found.append(str(fd))
                except OSError:
                    pass
        except OSError:
            pass
    return found


def _advances(read, limit: float = 30.0) -> bool:
    first, began = read(), time.monotonic()
    while time.monotonic() - began < limit:
        if read() > first:
            return True
        time.sleep(0.05)
    return False


def _eventually(check, limit: float = 30.0) -> bool:
    began = time.monotonic()
    while time.monotonic() - began < limit:
        if check():
            return True
        time.sleep(0.02)
    return False


def _http_get(lab, address: str) -> bytes:
    from backdoors.lab.topology import SERVICE_PORT
    with lab.client_socket() as s:
        s.settimeout(10)
        s.connect((address, SERVICE_PORT))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    return reply


@pytest.mark.slow
def test_vm_node_serves_and_its_kernel_is_read_from_ram(qemu, kernel, unique):
    from backdoors.lab import Lab
    name = f"v{unique}"
    prefix = f"bd-{name}-"
    with Lab(name, hosts=1, nodes=1, services=False, vm_nodes=2) as lab:
        vm = lab.vm("v0")
        plan = lab.plan.vm("v0")
        print(f"VM boot {vm.boot_s:.1f}s with {vm.accel}")
        # the guest answers on the node's address and VIP, from the lab's client namespace
        for address in (plan.address, plan.vip):
            reply = _http_get(lab, address)
            assert reply.startswith(b"HTTP/1.") and reply.endswith(b"vm bd-%s-v0\n" % name.encode())
        status = lab.status()["vms"][0]
        assert status["qemu_pid"] == vm.pid and status["accel"] == vm.accel in ("tcg", "kvm")
        # jiffies, read from the guest's RAM without its help: ticks, freezes, resumes
        memory = vm.memory()
        assert memory.text_phys % (2 << 20) == 0
        # the kernel's page tables agree: jiffies by its running virtual address, and the
        # direct map (page_offset_base, randomised by KASLR too) maps physical 0 up
        assert memory.translate(memory.virt("jiffies_64")) == memory.phys("jiffies_64")
        direct = memory.read_u64("page_offset_base")
        assert memory.translate(direct + memory.text_phys + 0x1234) == memory.text_phys + 0x1234
        banner = memory.read_virt(memory.virt("linux_banner"), 64)
        assert banner.startswith(f"Linux version {kernel.version} ".encode())
        # the process table, walked from init_task.tasks with offsets from the kernel's BTF
        tasks = dict(memory.tasks())
        assert tasks[0] == "swapper/0" and tasks[1] == "init" and tasks[2] == "kthreadd"
        assert "httpd" in tasks.values()  # the guest's service
        # the kernel's counters (Orion's readings): a 16 MiB file written to the guest's
        # tmpfs root shows as shmem and leaves that much less available; its CGI forked
        from backdoors.scenarios.vm import guest_get
        before = memory.readings()
        assert 0 < before.free < 256 << 20 and before.shmem <= before.file
        assert before.threads >= len(tasks) - 8 and before.forks >= len(tasks)
        assert guest_get(lab, "v0", "/cgi-bin/stream?1").strip() == "done"
        after = memory.readings()
        assert after.shmem - before.shmem >= 15 << 20, (before, after)
        assert before.available - after.available >= 12 << 20, (before, after)
        assert after.forks > before.forks and after.jiffies > before.jiffies
        # the process table (state, resident memory) and the load, as the guest's own
        # /proc shows them: init, idle, reads the same; the load is one of those read
        # around the guest's reading (avenrun moves every 5 s)
        loads = [memory.load()]
        table = {t.pid: t for t in memory.process_table()}
        inside = guest_get(lab, "v0", "/cgi-bin/proc").splitlines()
        loads.append(memory.load())
        stat = {int(line.split(" ", 1)[0]): line.rsplit(")", 1)[1].split()
                for line in inside[1:] if ")" in line}
        # (init sleeps, but wakes to reap the CGI's orphans: R at times, in either read)
        assert table[1].comm == "init" and {table[1].state, stat[1][0]} <= {"R", "S"}
        assert table[1].rss == int(stat[1][21]) * 4096 > 0
        assert table[2].comm == "kthreadd" and table[2].rss == 0 and stat[2][21] == "0"
        assert {t.state for t in table.values()} <= set("RSDTtXZPI")
        assert tuple(float(x) for x in inside[0].split()[:3]) in loads, (inside[0], loads)
        # any process (an agent) maps the same RAM through QEMU's descriptor
        from backdoors.lab import vms
        with vms.memory(lab.plan, "v0", lab.state.vms["v0"]) as other:
            assert other.text_phys == memory.text_phys
            assert _advances(other.jiffies)
        assert _advances(memory.jiffies)
        vm.lock()
        assert not vm.running()
        frozen = memory.jiffies()
        time.sleep(0.3)
        assert memory.jiffies() == frozen
        vm.unlock()
        assert vm.running()
        assert _advances(memory.jiffies)
        # the guest kernel's box: its jiffies sensor stalls past its deadline while the
        # vCPUs are stopped (a hung guest kernel, seen without an agent inside) and not after
        from backdoors.sensors import SensorBoxReader
        from backdoors.vm.sensors import GuestSampler, GuestSensors
        box = GuestSensors("v0", memory, jiffies_deadline=0.5)
        with GuestSampler(box, period=0.02), SensorBoxReader(box.box.fd) as reader:
            assert _advances(lambda: reader.snapshot().get("jiffies").value)
            assert not reader.snapshot().get("jiffies").violated
            assert _eventually(lambda: reader.snapshot().get("tasks").value == len(memory.tasks()))
            assert not reader.snapshot().get("tasks").violated
            snap = reader.snapshot()  # the kernel's own counters, as Orion reads them
            assert 0 < snap.get("available_mb").value < 256 and snap.get("threads").value >= 1
            assert snap.get("load1").value >= 0 and snap.get("blocked").value >= 0
            assert 0 < snap.get("top_rss_mb").value < 256
            assert snap.get("running").value >= 0 and snap.get("refault_rate").value == 0
            # (a pass over the kernel's data pages takes ~30 samples; the second one says)
            assert _eventually(lambda: reader.snapshot().get("data_churn_pct").value > 0)
            vm.lock()
            locked_at = time.monotonic()
            assert _eventually(lambda: reader.snapshot().get("jiffies").violated)
            print(f"guest hang detected {1000 * (time.monotonic() - locked_at):.0f} ms "
                  "after QMP stop (deadline 500 ms)")
            vm.unlock()
            assert _eventually(lambda: not reader.snapshot().get("jiffies").violated)
        box.close()
        # Orion's other inputs: the run queues' runnable tasks (3 spinning processes);
        # page-cache churn as the guest's /proc/vmstat counts it (0 here: no disk, no swap);
        # which kernel data pages change (jiffies' page does, at every tick)
        from backdoors.vm.churn import DataChurn
        from backdoors.vm.kill import kill
        root = int(guest_get(lab, "v0", "/cgi-bin/spin?1").strip())
        try:
            assert _eventually(lambda: memory.readings().running >= 3)
        finally:
            kill(vm, root, tree=True)
        assert _eventually(lambda: memory.readings().running <= 1)
        vmstat = dict(line.split() for line in guest_get(lab, "v0", "/cgi-bin/vmstat").splitlines())
        assert memory.readings().refaults == int(vmstat["workingset_refault_anon"]) + \
            int(vmstat["workingset_refault_file"])
        churn = DataChurn(memory, per_visit=256)
        while churn.passes < 3:
            churn.visit()
            time.sleep(0.02)
        assert 0 < churn.share < 1, churn.share
        assert dict(churn.hot(len(churn.pages)))[memory.phys("jiffies_64") & ~0xFFF] >= 1
        assert sorted(_qemus(prefix)) == sorted(lab.state.vms.values())
        assert _http_get(lab, lab.plan.vm("v1").vip).endswith(b"vm bd-%s-v1\n" % name.encode())
        assert _memfds(prefix)
        assert netns.exists(plan.netns)
    # teardown leaves nothing: no QEMU, no RAM memfd, no namespace (with it the tap)
    assert _qemus(prefix) == []
    assert _memfds(prefix) == []
    assert not netns.exists(plan.netns)
    assert not lab.plan.run_dir.exists()


@pytest.mark.slow
def test_vm_without_kaslr_and_a_killed_owner_reaped(qemu, kernel, unique, tmp_path):
    """nokaslr: the kernel sits at its link address (KASLR offset 0); a guest whose owner
    forgot it is found and killed by its name prefix, and with it its RAM."""
    from backdoors.vm.machine import Vm, VmSpec, reap
    prefix = f"{PREFIX}x{unique}-"  # the tests' prefix: a killed run's is reaped (leftovers)
    vm = Vm.start(VmSpec(f"{prefix}v0", tmp_path, kaslr=False))
    try:
        memory = vm.memory()
        assert memory.kaslr_offset == 0
        assert memory.text_phys == 0x100_0000  # CONFIG_PHYSICAL_START
        assert memory.virt("_text") == 0xFFFF_FFFF_8100_0000
        assert memory.translate(0xFFFF_FFFF_8100_0000) == 0x100_0000
        assert _advances(memory.jiffies)
        memory.close()
        vm._memory = None
        os.close(vm.ram_fd)  # as if its owner died: only QEMU holds the RAM now
        vm.ram_fd = -1
        assert reap(prefix) == [vm.pid]
        assert _qemus(prefix) == [] and _memfds(prefix) == []
    finally:
        vm.stop()


def test_vm_bad_spec_says_what_and_leaves_nothing(tmp_path):
    from backdoors.vm.machine import Vm, VmSpec
    with pytest.raises(VmError, match="memory_mb must be 64..2048, got 8"):
        Vm.start(VmSpec("bd-bad-v0", tmp_path / "run", memory_mb=8))
    with pytest.raises(VmError, match="accel must be tcg, kvm or auto"):
        Vm.start(VmSpec("bd-bad-v0", tmp_path / "run", accel="hvf"))
    assert not (tmp_path / "run").exists()


def test_a_boot_failure_quotes_the_end_of_its_log(tmp_path):
    """The run directory goes with the lab: the error carries what the log said."""
    from backdoors.common.logs import log_tail
    log = tmp_path / "qemu.log"
    log.write_text("".join(f"line {i}\n" for i in range(20)) + "qemu: could not load kernel\n")
    assert log_tail(log) == f"{log} ends: line 16 | line 17 | line 18 | line 19 | " \
                         "qemu: could not load kernel"
    log.write_text("")
    assert log_tail(log) == f"{log} is empty"
    assert log_tail(tmp_path / "none") == f"{tmp_path / 'none'} is missing"


@pytest.mark.slow
def test_a_vm_lab_whose_owner_was_killed_is_reaped_qemu_and_all(qemu, kernel, unique):
    """A run killed mid-test (SIGKILL: no teardown) left its VM lab: namespaces, the
    cgroups of its nodes and agent keeper, and the VM's QEMU, which its owner's death
    does not end. The next lab's start reaps all of it."""
    import signal
    import subprocess
    import sys

    from backdoors.lab import Lab
    from backdoors.lab.lab import running_labs
    from test_lab import leftovers

    name = f"k{unique}"
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom backdoors.lab import Lab\n"
         f"lab = Lab({name!r}, hosts=1, nodes=1, services=False, agents=True, vm_nodes=1).up()\n"
         "print(lab.vm('v0').pid, flush=True)\ntime.sleep(600)\n"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()
        assert line.strip().isdigit(), owner.stderr.read() if owner.poll() is not None else line
        qemu_pid = int(line)
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert psutil.pid_exists(qemu_pid) and leftovers(name)  # left behind ...
        with Lab(f"r{unique}", hosts=1, nodes=1, services=False):  # ... until a lab starts
            assert name not in running_labs() and leftovers(name) == []
            assert not psutil.pid_exists(qemu_pid) or psutil.Process(qemu_pid).status() == "zombie"
    finally:
        owner.kill()
        if name in running_labs():
            subprocess.run([sys.executable, "-m", "backdoors", "lab", "down", "--name", name],
                           capture_output=True)
