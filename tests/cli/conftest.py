"""Launching scripts through torchrun and `ray-elastic run` with the same arguments (no Ray: local runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "scripts"
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
    "ray-elastic": [sys.executable, "-m", "ray_elastic", "run"],
}


LINES = 300  # lines scripts/lines.py prints per rank and attempt in the output tests


def expected_lines(stream: str, rank: int, attempt: int) -> list[str]:
    """What scripts/lines.py prints on one stream ("out" or "err") for one rank and attempt, in order."""
    numbered = range(LINES) if stream == "out" else range(0, LINES, 10)
    return [f"{stream} r{rank} a{attempt} {i}" for i in numbered] + [f"{stream} r{rank} a{attempt} last"]


def lines_of(text: str, prefix: str) -> list[str]:
    """The lines of `text` that carry `prefix`, without it."""
    return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]


@dataclass
class Launched:
    returncode: int
    stdout: str
    stderr: str


def _env(env: dict[str, str] | None) -> dict[str, str]:
    """A clean environment: no PET_ variables, no Ray address; a sentinel every script checks."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PET_") and k != "RAY_ADDRESS"}
    base["LAUNCHER_TEST_SENTINEL"] = "parent"
    return {**base, **(env or {})}


def launch(launcher: str, args: list[str], cwd: Path, env: dict[str, str] | None = None,
           timeout_s: float = 120) -> Launched:
    """Run a launcher to its end."""
    proc = subprocess.run([*LAUNCHERS[launcher], *args], cwd=cwd, env=_env(env), capture_output=True, text=True,
                          timeout=timeout_s)
    return Launched(proc.returncode, proc.stdout, proc.stderr)


def launch_both(runs: dict[str, tuple[list[str], Path, dict[str, str]]], timeout_s: float = 120) -> dict[str, Launched]:
    """Run several launchers at the same time (each with its own arguments, directory and environment)."""
    procs = {}
    for name, (args, cwd, env) in runs.items():
        procs[name] = subprocess.Popen([*LAUNCHERS[name], *args], cwd=cwd, env=_env(env), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=timeout_s)
            results[name] = Launched(proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results
