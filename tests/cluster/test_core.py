"""Core runtime on a simulated cluster: what is not a fault-matrix row (those are in tests/faults/).

Here: interrupting the driver tears everything down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

_INTERRUPTED_DRIVER = """
import sys
import ray_elastic
from tests.workloads import ddp_train
try:
    ray_elastic.run(ddp_train, config={"steps": 100000, "sleep_s": 0.05}, min_nodes=2, progress="log")
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_in_the_driver_tears_everything_down(cluster, no_leaks):
    cluster.resize(2)
    env = dict(os.environ, RAY_ADDRESS=cluster.address, PYTHONPATH=os.getcwd())
    # As from a terminal: SIGINT not ignored, even where the suite was started in the background (`nohup ... &`
    # ignores it, and Python then installs no KeyboardInterrupt handler in what it starts).
    driver = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_DRIVER], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        lines = []
        while time.monotonic() < deadline:
            line = driver.stdout.readline()
            lines.append(line)
            if "round 0:" in line:
                break
        assert any("round 0:" in line for line in lines), "".join(lines)
        time.sleep(1.0)
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130 and "INTERRUPTED" in out
    assert "run aborted" in out
    no_leaks()


def _threads(_config):
    import torch

    return {"env": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads()}


def test_workers_take_the_drivers_omp_num_threads_without_a_runtime_env(cluster, no_leaks, monkeypatch):
    """The nodes' processes have OMP_NUM_THREADS=1 (conftest); the driver's 2 reaches train_fn and torch."""
    import ray_elastic

    cluster.resize(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    result = ray_elastic.run(_threads, min_nodes=1, progress="none")
    assert result.return_values == [{"env": "2", "torch": 2}]
    no_leaks(result.worker_pids)
