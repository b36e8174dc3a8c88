"""`ray job submit` against a real multi-raylet cluster started with the `ray start` CLI.

The cluster is this test's own: its own ports, temp dir and auth token, and every
`ray start` runs in a new session so that teardown kills exactly the processes it
started (never `ray stop`, which would take down other clusters on the machine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CliCluster:
    """A head (no CPUs, dashboard on) and worker raylets, each started by `ray start` in its own session."""

    def __init__(self, root: Path):
        self.root = root
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in the entrypoint is this venv's
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token),
            OMP_NUM_THREADS="1",
            RAY_DEDUP_LOGS="0",
            PYTHONUNBUFFERED="1",
        )
        self.sessions: list[int] = []

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, *args: str) -> None:
        common = [
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.root / 'ray'}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--disable-usage-stats",
        ]
        proc = subprocess.Popen(
            [RAY, "start", *args, *common],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.sessions.append(proc.pid)
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{out[-4000:]}")

    def start(self, worker_cpus: tuple[int, ...]) -> None:
        self._ray_start(
            "--head", f"--port={self.gcs_port}", "--num-cpus=0", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
        )
        for cpus in worker_cpus:
            self._ray_start(f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={cpus}")

    def _is_ours(self, proc: psutil.Process) -> bool:
        if os.getsid(proc.pid) in self.sessions:
            return True
        # Workers (and anything they spawn) inherit the environment, token path included.
        return proc.environ().get("RAY_AUTH_TOKEN_PATH") == self.env["RAY_AUTH_TOKEN_PATH"]

    def processes(self) -> list[psutil.Process]:
        """Every live process this cluster started: its sessions, its environment, their descendants."""
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if proc.pid not in found and self._is_ours(proc):
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found[child.pid] = child
        return list(found.values())

    def stop(self) -> list[str]:
        """Terminate, then kill, everything this cluster started; return what survived."""
        procs = self.processes()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(sig)
            _, procs = psutil.wait_procs(procs, timeout=5)
            procs += [p for p in self.processes() if p not in procs]
            if not procs:
                break
        return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in procs if p.is_running()]


@pytest.fixture
def cli_cluster(no_shared_cluster: None) -> Iterator[CliCluster]:
    root = Path(tempfile.mkdtemp(prefix="rejs", dir="/tmp"))  # short: Ray's socket paths must fit
    cluster = CliCluster(root)
    try:
        yield cluster
    finally:
        survivors = cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"Ray processes left behind: {survivors}"


def test_quickstart_runs_under_ray_job_submit(cli_cluster):
    cli_cluster.start(worker_cpus=(2,))
    job = subprocess.run(
        [RAY, "job", "submit", "--address", cli_cluster.dashboard_url, "--working-dir", str(REPO / "examples"),
         "--", "python", "quickstart.py"],
        env=cli_cluster.env, cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs[-6000:]
    assert "final loss" in logs and "after 40 steps" in logs and "restarts spent: 1" in logs, logs[-6000:]
    assert "[ray_elastic] run finished after 1 restart(s)" in logs, "progress shows as plain lines in the job's logs"
    assert "succeeded" in logs.lower(), logs[-6000:]
