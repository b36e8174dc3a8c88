"""torchrun's own launcher scenarios, each run through real torchrun and through `ray-elastic run`
with identical arguments: both must pass (issue 15).

The scenarios follow torch's launcher tests (test/distributed/launcher/test_run.py); the user
scripts are ours (tests/cli/scripts): one checks every torchrun variable and touches a file named
after its RANK, one does the same in bash (--no-python), and one fails on rank 1 under @record.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ray_elastic.testing.ports import free_port
from tests.cli.conftest import LAUNCHERS, SCRIPTS, Launched, launch_both

pytestmark = pytest.mark.timeout(150)

PY = str(SCRIPTS / "check_env.py")
SH = str(SCRIPTS / "check_env.sh")
COMMON = ["--monitor-interval=1", "--start-method=spawn"]


def _this_machine_nproc_auto() -> int:
    import torch

    if torch.accelerator.is_available():
        return torch.accelerator.device_count()
    return len(os.sched_getaffinity(0))


@dataclass
class Scenario:
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ranks: int | Callable[[], int] | None = 4  # files touched (None: the launch must fail)
    check: Callable[[Launched, Path], None] | None = None


def _root_cause(result: Launched, tmp: Path) -> None:
    """torchrun's failure shape: exit 1, the Root Cause block naming rank 1, its error file copied."""
    assert result.returncode == 1, result.stderr[-3000:]
    root = result.stderr[result.stderr.index("Root Cause (first observed failure):"):]
    assert "rank      : 1 (local_rank: 1)" in root and "exitcode  : 1 (pid: " in root, root
    error = json.loads((tmp / "launcher_error.json").read_text())["message"]
    assert error["errorCode"] == 1 and "rank 1 fails on purpose" in error["message"], error
    assert 'raise RuntimeError("rank 1 fails on purpose (--fail)")' in error["extraInfo"]["py_callstack"]


def _prefixed(result: Launched, tmp: Path) -> None:
    """TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE with --role and --tee: every console line carries it."""
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        assert f"[trainer/{rank}/{rank}]:rank {rank} checked" in result.stdout, result.stdout


def _redirected(result: Launched, tmp: Path) -> None:
    """-r 1: stdout goes to the log files only; --local-ranks-filter=1: rank 0's stderr is not shown."""
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checked" not in result.stdout, result.stdout
    logged = "".join(p.read_text() for p in (tmp / "logs").rglob("stdout.log"))
    assert "rank 0 checked" in logged and "rank 1 checked" in logged, logged


PORT = "{port}"
SCENARIOS: dict[str, Scenario] = {
    "user_script": Scenario(["--nnodes=1", "--nproc-per-node=4", "--rdzv-id={run_id}", *COMMON,
                             PY, "--touch-file-dir={dir}"]),
    "caffe2_bc": Scenario(["--nnodes=1", "--nproc-per-node=4", *COMMON, "--master-addr=localhost",
                           f"--master-port={PORT}", "--node-rank=0", PY, "--touch-file-dir={dir}"]),
    "bash_no_python": Scenario(["--nnodes=1", "--nproc-per-node=4", "--rdzv-id={run_id}", *COMMON, "--no-python",
                                SH, "{dir}"]),
    "bash_with_module": Scenario(["--nnodes=1", "--nproc-per-node=4", *COMMON, "--no-python", "--module",
                                  SH, "{dir}"], ranks=None),
    "default_nproc": Scenario(["--nnodes=1", "--rdzv-id={run_id}", *COMMON, "--no-python", SH, "{dir}"], ranks=1),
    "pet_env": Scenario([SH, "{dir}"], env={
        "PET_NNODES": "1", "PET_NPROC_PER_NODE": "4", "PET_RDZV_ID": "{run_id}", "PET_MONITOR_INTERVAL": "1",
        "PET_START_METHOD": "spawn", "PET_NO_PYTHON": "1", "PET_MODULE": "0"}),
    "pet_env_module": Scenario([SH, "{dir}"], env={
        "PET_NNODES": "1", "PET_NPROC_PER_NODE": "4", "PET_NO_PYTHON": "1", "PET_MODULE": "1"}, ranks=None),
    "nproc_auto": Scenario(["--nnodes=1", "--nproc-per-node=auto", "--rdzv-id={run_id}", *COMMON, "--no-python",
                            SH, "{dir}"], ranks=_this_machine_nproc_auto),
    "nproc_unknown": Scenario(["--nnodes=1", "--nproc-per-node=unknown", *COMMON, "--no-python", SH, "{dir}"],
                              ranks=None),
    "elastic_c10d": Scenario(["--nnodes=1:2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                              f"--rdzv-endpoint=localhost:{PORT}",
                              "--rdzv-conf='join_timeout=5,last_call_timeout=1,timeout=5'", "--rdzv-id={run_id}",
                              *COMMON, PY, "--touch-file-dir={dir}"]),
    "failing_worker": Scenario(["--nnodes=1:2", "--nproc-per-node=4", "--rdzv-backend=c10d",
                                f"--rdzv-endpoint=localhost:{PORT}",
                                "--rdzv-conf='join_timeout=5,last_call_timeout=1,timeout=5'", "--rdzv-id={run_id}",
                                "--max-restarts=0", *COMMON, PY, "--fail"],
                               env={"TORCHELASTIC_ERROR_FILE": "{tmp}/launcher_error.json"}, ranks=0,
                               check=_root_cause),
    "standalone": Scenario(["--nnodes=1", "--nproc-per-node=4", "--standalone", *COMMON,
                            PY, "--touch-file-dir={dir}"]),
    "run_path": Scenario(["--run-path", "--nnodes=1", "--nproc-per-node=4", *COMMON, PY, "--touch-file-dir={dir}"]),
    # issue 19: a script that names the store in tcp://localhost:PORT, launched with --master-port=PORT
    "tcp_init_method": Scenario(["--nnodes=1", "--nproc-per-node=2", f"--master-port={PORT}", *COMMON,
                                 PY, "--touch-file-dir={dir}", f"--init-method=tcp://localhost:{PORT}"], ranks=2),
    "role_tee_prefix": Scenario(["--standalone", "--nproc-per-node=2", "--role=trainer", "--tee=3",
                                 PY, "--role=trainer"],
                                env={"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[${role_name}/${rank}/${local_rank}]:"},
                                ranks=0, check=_prefixed),
    "redirects_filter": Scenario(["--standalone", "--nproc-per-node=2", "--redirects=1", "--local-ranks-filter=1",
                                  "--log-dir={tmp}/logs", PY], ranks=0, check=_redirected),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_passes_under_both_launchers(name: str, tmp_path: Path) -> None:
    """The same scenario through torchrun and ray-elastic run, side by side (each in its own directory)."""
    scenario = SCENARIOS[name]
    runs, dirs = {}, {}
    for launcher in LAUNCHERS:
        tmp = tmp_path / launcher
        (tmp / "touched").mkdir(parents=True)
        values = {"dir": str(tmp / "touched"), "tmp": str(tmp), "port": str(free_port()),
                  "run_id": uuid.uuid4().hex}

        def fill(text: str, values: dict[str, str] = values) -> str:
            for key, value in values.items():
                text = text.replace("{" + key + "}", value)
            return text

        runs[launcher] = ([fill(a) for a in scenario.args], tmp, {k: fill(v) for k, v in scenario.env.items()})
        dirs[launcher] = tmp
    for launcher, result in launch_both(runs).items():
        check(scenario, launcher, result, dirs[launcher])


def check(scenario: Scenario, launcher: str, result: Launched, tmp: Path) -> None:
    files = sorted(os.listdir(tmp / "touched"))
    where = f"{launcher}: rc={result.returncode}\n{result.stderr[-3000:]}"
    if scenario.check is not None:
        scenario.check(result, tmp)
    if scenario.ranks is None:
        assert result.returncode != 0 and not files, where
        return
    expected = scenario.ranks() if callable(scenario.ranks) else scenario.ranks
    if scenario.check is None:
        assert result.returncode == 0, where
    assert files == sorted(str(r) for r in range(expected)), (files, where)
