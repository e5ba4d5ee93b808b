"""The descriptor table grown ahead of need (common.fdtable), seen in /proc's FDSize."""

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import os, resource, sys
    from backdoors.common import fdtable

    def fdsize():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("FDSize:"))

    soft = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    r, w = os.pipe()
    before, opened = fdsize(), sorted(os.listdir("/proc/self/fd"))
    got = fdtable.reserve(int(sys.argv[2]))
    os.write(w, b"still open")
    print(before, got, fdsize(), sorted(os.listdir("/proc/self/fd")) == opened,
          os.read(r, 10) == b"still open")
""")


def probe(soft: int, slots: int) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(soft), str(slots)], check=True,
                         capture_output=True, text=True)
    return out.stdout.split()


def test_the_table_grows_to_the_slots_asked_and_no_descriptor_changes():
    before, got, after, same, still = probe(4096, 3000)
    assert int(before) < 3000 and got == "3000" and int(after) >= 3000
    assert same == still == "True"


def test_the_table_grows_no_further_than_the_soft_limit():
    _, got, after, same, _ = probe(700, 16384)
    assert got == "700" and 700 <= int(after) < 16384 and same == "True"


def test_raise_limit_lifts_the_soft_limit_to_the_hard_one():
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import resource
        from backdoors.common import fdtable
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        print(fdtable.raise_limit() == hard, resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))
    """)], check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"]


def test_the_session_limit_is_what_the_descriptors_allow_however_few():
    """Under 128 descriptors the limit was 64 sessions anyway: clients past what the
    descriptors held stalled in the accept queue instead of being refused (outside
    review)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import resource
        from backdoors.common import fdtable
        resource.setrlimit(resource.RLIMIT_NOFILE, (1280, 1280))
        print(fdtable.session_limit(6))
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
        print(fdtable.session_limit(6))
    """)], check=True, capture_output=True, text=True)
    assert out.stdout.split() == [str((1280 - 256) // 12), "1"]
