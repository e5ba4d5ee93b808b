"""The test runs' reaper (tests/leftovers.py): a run starting while another is live
reaps nothing of it."""

import os
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.root

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_a_run_starting_beside_a_live_one_reaps_none_of_its_objects(root):
    """This run holds the runs' lock (conftest); another run's start, here a child
    taking the lock as conftest does, must leave this run's `bdt-` folder in place."""
    mine = tempfile.mkdtemp(prefix="bdt-live-")
    try:
        subprocess.run([sys.executable, "-c", "import leftovers; leftovers.hold_runs_lock()"],
                       cwd=TESTS, check=True, timeout=60)
        assert os.path.isdir(mine)
    finally:
        os.rmdir(mine)


INNER = '''
import time
import pytest
from backdoors.net import netns

@pytest.fixture
def held():
    netns.create(NAME + "-fx")
    yield
    netns.remove(NAME + "-fx")

def test_held(held):
    netns.create(NAME)
    try:
        open(READY, "w").close()
        time.sleep(600)
    finally:
        netns.remove(NAME)
'''


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_run_terminated_tears_its_test_down(root, unique, tmp_path, sig):
    """A run sent SIGTERM (a CI timeout) or SIGHUP stops as on Ctrl-C: the running test's
    finally blocks and its fixtures' teardown run. Before, the run died at once and left
    what the test held (a killed run's VM test left its lab's namespaces, cgroups and
    QEMU until the next run reaped them)."""
    import signal
    import time

    from backdoors.net import netns

    name, ready = f"bdt-{unique}-term", tmp_path / "ready"
    (tmp_path / "test_inner.py").write_text(
        f"NAME = {name!r}\nREADY = {str(ready)!r}\n" + INNER)
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "conftest",
                            "-p", "no:cacheprovider", str(tmp_path / "test_inner.py")],
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": TESTS},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()
            time.sleep(0.05)
        assert netns.exists(name) and netns.exists(name + "-fx")
        run.send_signal(getattr(signal, sig))
        out = run.communicate(timeout=60)[0].decode()
        assert run.returncode == 2, out  # pytest's "interrupted"
        assert not netns.exists(name) and not netns.exists(name + "-fx"), out
    finally:
        run.kill()
        run.wait()
        for n in (name, name + "-fx"):
            if netns.exists(n):
                netns.remove(n)
