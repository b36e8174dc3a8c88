"""scripts/test.sh's cleanup kills only the processes its own test session started (never `ray stop`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "kill_session_procs.py"


def test_cleanup_kills_marked_processes_only() -> None:
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    marked = subprocess.Popen(sleep, env={**os.environ, "RAY_ELASTIC_TEST_SESSION": "mine"})
    other = subprocess.Popen(sleep, env={**os.environ, "RAY_ELASTIC_TEST_SESSION": "someone-else"})
    unmarked = subprocess.Popen(sleep, env={k: v for k, v in os.environ.items() if k != "RAY_ELASTIC_TEST_SESSION"})
    try:
        subprocess.run([sys.executable, str(SCRIPT), "mine"], check=True, timeout=30)
        assert marked.wait(timeout=10) != 0
        assert other.poll() is None and unmarked.poll() is None
    finally:
        for proc in (marked, other, unmarked):
            proc.kill()
            proc.wait()


def test_test_command_never_stops_every_ray() -> None:
    text = (SCRIPT.parent / "test.sh").read_text()
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("ray stop" in line for line in code)
