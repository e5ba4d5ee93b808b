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
