"""The examples run as a user would run them: `python examples/NAME.py`, each in a fresh process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ray_elastic.testing.procs import kill_and_name, still_running

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.cluster


def run_example(name: str, timeout_s: float) -> str:
    """Run an example in its own session; return its output. Fails if it fails or leaves a process behind."""
    # "local": a fresh local Ray. Unset, ray.init() would join the newest cluster started on this machine.
    env = {**os.environ, "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / name)], cwd=EXAMPLES.parent, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        leftovers = kill_and_name(still_running(lambda: _in_session(proc.pid), wait_s=15))
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{out[-6000:]}"
    assert not leftovers, f"{name} left processes behind: {leftovers}"
    return out


def _in_session(session: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(proc.pid) == session and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


# examples/quickstart.py runs in tests/cluster/test_job_submit.py, as the README's set-up, in a fresh HOME.
@pytest.mark.timeout(420)
def test_elastic_sampler_shrinks_grows_and_rescales_lr(no_shared_cluster):
    out = run_example("elastic_sampler.py", timeout_s=360)
    assert "after the node loss: world size 2; after the node joined: world size 3" in out, out[-3000:]
    assert "restarts spent: 1; lr by world size: [(2, 0.04), (3, 0.06)]" in out, out[-3000:]
    assert "trained 4 epochs" in out, out[-3000:]
