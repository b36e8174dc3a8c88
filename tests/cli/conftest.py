"""Launching scripts through torchrun and `ray-elastic run` with the same arguments (no Ray: local runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent / "scripts"
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],
    "ray-elastic": [sys.executable, "-m", "ray_elastic", "run"],
}


@dataclass
class Launched:
    returncode: int
    stdout: str
    stderr: str


def launch(launcher: str, args: list[str], cwd: Path, env: dict[str, str] | None = None,
           timeout_s: float = 120) -> Launched:
    """Run a launcher to its end, with a clean environment: no PET_ variables, no Ray address."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PET_") and k != "RAY_ADDRESS"}
    base["LAUNCHER_TEST_SENTINEL"] = "parent"  # every script checks it reached them
    proc = subprocess.run([*LAUNCHERS[launcher], *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout_s)
    return Launched(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(params=sorted(LAUNCHERS))
def launcher(request: pytest.FixtureRequest) -> str:
    return request.param
