"""`ray-elastic run` on Ray: every script line reaches the CLI's console (issue 19), and a Ray the CLI
starts on one machine runs more scripts than it has CPUs, as torchrun does (issue 15)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.conftest import LINES, SCRIPTS, expected_lines, lines_of

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PET_") and k != "RAY_ADDRESS"}
    return {**env, "PYTHONPATH": str(REPO), "LAUNCHER_TEST_SENTINEL": "parent", **extra}


def test_every_line_of_every_rank_reaches_the_console_across_a_restart(cluster, no_leaks, tmp_path):
    """2 nodes x 2 scripts print 300 lines each; rank 3 fails after its lines, all restart: both
    attempts' lines are on the CLI's console, in order per rank (carried by the CLI's own channel)."""
    cluster.resize(2)
    done = tmp_path / "done"
    done.mkdir()
    argv = ["run", "--nnodes=2", "--nproc-per-node=2", "--max-restarts=1", str(SCRIPTS / "lines.py"), str(LINES),
            str(done), "--fail-rank", "3"]
    env = _env(RAY_ADDRESS=cluster.address, TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE="<${rank}/${local_rank}> ")
    proc = subprocess.run([sys.executable, "-m", "ray_elastic", *argv], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "round 1: 2 node(s), world size 4 (restart)" in proc.stderr
    for rank in range(4):
        prefix = f"<{rank}/{rank % 2}> "
        for stream, text in (("out", proc.stdout), ("err", proc.stderr)):
            want = expected_lines(stream, rank, 0) + expected_lines(stream, rank, 1)
            got = lines_of(text, prefix)
            assert got == want, f"rank {rank} std{stream}: {len(got)} of {len(want)} lines"
    assert "(ElasticWorker pid=" not in proc.stdout, "script lines come through the CLI, not Ray's log forwarding"
    no_leaks()


def test_a_ray_started_by_the_cli_runs_more_scripts_than_cpus(no_shared_cluster, tmp_path):
    """--address=local: the CLI's own Ray on this machine places 2 scripts per CPU (torchrun would)."""
    nproc = 2 * (os.cpu_count() or 1)
    touched = tmp_path / "touched"
    touched.mkdir()
    proc = subprocess.run([sys.executable, "-m", "ray_elastic", "run", "--address=local", f"--nproc-per-node={nproc}",
                           "--no-python", str(SCRIPTS / "check_env.sh"), str(touched)],
                          env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(os.listdir(touched), key=int) == [str(r) for r in range(nproc)]


def test_a_signal_to_the_cli_reaches_every_script_on_a_cluster(cluster, no_leaks, tmp_path):
    """--signals-to-handle on Ray: the run is aborted, every script gets SIGTERM and --shutdown-timeout
    to leave (these ignore it: SIGKILL after 2 s); the CLI exits 128+N."""
    import signal
    import time

    cluster.resize(1)
    out = tmp_path / "out"
    out.mkdir()
    argv = ["run", "--nproc-per-node=2", "--signals-to-handle=SIGTERM,SIGUSR1", "--shutdown-timeout=2",
            str(SCRIPTS / "signals.py"), str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "ray_elastic", *argv], env=_env(RAY_ADDRESS=cluster.address),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "0-up").exists() and (out / "1-up").exists()):
            assert proc.poll() is None and time.monotonic() < deadline, "the scripts did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    assert (out / "0-SIGTERM").exists() and (out / "1-SIGTERM").exists(), sorted(p.name for p in out.iterdir())
    no_leaks()
