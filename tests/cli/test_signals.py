"""--signals-to-handle and --shutdown-timeout, under torchrun and `ray-elastic run` side by side: the
launcher forwards the signal it gets to every script, and SIGKILLs those still running after the timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.cli.conftest import LAUNCHERS, SCRIPTS, _env

pytestmark = pytest.mark.timeout(120)


def _start_all(tmp_path: Path, extra: list[str]) -> dict[str, tuple[subprocess.Popen, Path]]:
    started = {}
    for name in LAUNCHERS:
        out = tmp_path / name
        out.mkdir()
        args = ["--standalone", "--nproc-per-node=2", *extra, str(SCRIPTS / "signals.py"), str(out)]
        started[name] = (subprocess.Popen([*LAUNCHERS[name], *args], cwd=out, env=_env({}), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True), out)
    deadline = time.monotonic() + 60
    while not all((out / "0-up").exists() and (out / "1-up").exists() for _, out in started.values()):
        assert time.monotonic() < deadline, "the scripts did not start"
        time.sleep(0.05)
    return started


def _scripts(proc: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "signals.py" in " ".join(p.cmdline())]


def test_a_handled_signal_is_forwarded_to_every_script(tmp_path):
    started = _start_all(tmp_path, ["--signals-to-handle=SIGTERM,SIGUSR1"])
    for proc, _ in started.values():
        proc.send_signal(signal.SIGUSR1)
    for name, (proc, out) in started.items():
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, f"{name}: a stopped run is not a success"
        assert (out / "0-SIGUSR1").exists() and (out / "1-SIGUSR1").exists(), f"{name}: {os.listdir(out)}\n{err}"


def test_scripts_that_ignore_the_signal_are_killed_after_the_shutdown_timeout(tmp_path):
    started = _start_all(tmp_path, ["--shutdown-timeout=2"])
    scripts = {name: _scripts(proc) for name, (proc, _) in started.items()}
    sent = time.monotonic()
    for proc, _ in started.values():
        proc.send_signal(signal.SIGTERM)
    for name, (proc, out) in started.items():
        proc.communicate(timeout=60)
        took = time.monotonic() - sent
        assert proc.returncode != 0
        assert (out / "0-SIGTERM").exists() and (out / "1-SIGTERM").exists(), f"{name}: {os.listdir(out)}"
        assert 2 <= took < 30, f"{name}: exited {took:.1f}s after SIGTERM with --shutdown-timeout=2"
        _, alive = psutil.wait_procs(scripts[name], timeout=5)
        assert not alive, f"{name}: scripts outlived the launcher"
