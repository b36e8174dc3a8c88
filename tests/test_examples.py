"""The examples run as a user would run them: `python examples/NAME.py`, each in a fresh process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

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
        leftovers = _session_processes(proc.pid, wait_s=15)
        for leftover in leftovers:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{out[-6000:]}"
    assert not leftovers, f"{name} left processes behind: {[p.pid for p in leftovers]}"
    return out


def _session_processes(session: int, wait_s: float) -> list[psutil.Process]:
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getsid(proc.pid) == session and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


# examples/quickstart.py runs in tests/cluster/test_job_submit.py, as the README's set-up, in a fresh HOME.
@pytest.mark.timeout(420)
def test_elastic_sampler_shrinks_grows_and_rescales_lr(no_shared_cluster):
    out = run_example("elastic_sampler.py", timeout_s=360)
    assert "after the node loss: world size 2; after the node joined: world size 3" in out, out[-3000:]
    assert "restarts spent: 1; lr by world size: [(2, 0.04), (3, 0.06)]" in out, out[-3000:]
    assert "trained 4 epochs" in out, out[-3000:]
