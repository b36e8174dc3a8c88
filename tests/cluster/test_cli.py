"""`ray-elastic run` on a simulated cluster: real scripts, real kills, compared with real torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from ray_elastic.cli import main
from ray_elastic.testing.ports import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(480)]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "torchrun_script.py"
TORCHRUN_KEYS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS",
)
ENV_SCRIPT = f"""
import json, os, sys
import torch, torch.distributed as dist
init = sys.argv[2] if len(sys.argv) > 2 else "env://"  # e.g. tcp://127.0.0.1:PORT (issue 19)
dist.init_process_group("gloo", init_method=init, rank=int(os.environ["RANK"]),
                        world_size=int(os.environ["WORLD_SIZE"]))
total = torch.ones(1)
dist.all_reduce(total)
env = {{k: os.environ.get(k) for k in {TORCHRUN_KEYS!r}}}
env["all_reduce"] = int(total.item())
env["pid"] = os.getpid()
with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".json"), "w") as fp:
    json.dump(env, fp)
dist.destroy_process_group()
"""
FAILING_SCRIPT = """
import os, sys
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

@record
def main():
    dist.init_process_group("gloo", init_method="env://")
    with open(os.path.join(sys.argv[2], "pid" + os.environ["RANK"]), "w") as fp:
        fp.write(str(os.getpid()))
    if dist.get_rank() == 1:
        if sys.argv[1] == "raise":
            raise ValueError("bad shard 17")
        print("giving up with exit code 7", file=sys.stderr, flush=True)
        sys.exit(7)
    dist.barrier()  # rank 0 waits for the peer that fails

main()
"""


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _wait_for(condition, timeout_s: float, what: str, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if not alive():
            raise AssertionError(f"the run ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _assert_pids_gone(pids, timeout_s: float = 10.0) -> None:
    def gone() -> bool:
        return not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

    _wait_for(gone, timeout_s, f"script processes {sorted(pids)} to exit")


def _kill_rank1_once_training(snap: Path, alive) -> int:
    """SIGKILL rank 1's script once rank 0 has completed a few steps; its pid."""
    starts = snap / "starts.jsonl"
    _wait_for(lambda: len(_read_jsonl(snap / "steps.jsonl")) >= 3 and len(_read_jsonl(starts)) >= 4,
              300, "the script to train a few steps", alive)
    victim = next(s["pid"] for s in _read_jsonl(starts) if s["rank"] == 1 and s["restart_count"] == 0)
    os.kill(victim, signal.SIGKILL)
    return victim


def _check_resumed(snap: Path, steps: int, world_size: int) -> list[int]:
    """Every rank restarted once from the snapshot and training finished; the script pids."""
    starts = _read_jsonl(snap / "starts.jsonl")
    first = [s for s in starts if s["restart_count"] == 0]
    again = [s for s in starts if s["restart_count"] == 1]
    assert len(first) == world_size and len(again) == world_size, starts
    assert sorted(s["rank"] for s in again) == list(range(world_size))
    assert all(s["resumed_step"] >= 3 for s in again), f"restarted scripts did not resume their snapshot: {again}"
    assert len({s["resumed_step"] for s in again}) == 1
    logged = [r["step"] for r in _read_jsonl(snap / "steps.jsonl")]
    assert logged[-1] == steps and sorted(set(logged)) == logged, logged
    return [s["pid"] for s in starts]


def example_wrapper(tmp_path: Path, pace_while: str, on_sigterm_exit_0: bool = False) -> Path:
    """The example, run unchanged by a wrapper whose `time.sleep` (the per-step pacing, 0.1 s or more) sleeps only
    while the Python expression `pace_while` is true (the example's short wait at exit always sleeps);
    optionally exiting 0 on SIGTERM (a common pattern for preemption)."""
    wrapper = tmp_path / "example_wrapper.py"
    graceful = "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))" if on_sigterm_exit_0 else ""
    wrapper.write_text(f"""
import os, runpy, signal, sys, time
{graceful}
_sleep = time.sleep
time.sleep = lambda s: _sleep(s) if s < 0.1 or ({pace_while}) else None
runpy.run_path({str(EXAMPLE)!r}, run_name="__main__")
""")
    return wrapper


def paced_until_restart(tmp_path: Path) -> Path:
    """The example, its per-step sleep skipped once restarted: the faults come in the first attempt."""
    return example_wrapper(tmp_path, 'os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"')


# In-process `main([...])` is covered by the other tests here; this one goes through `python -m`.
@pytest.mark.parametrize("mode", ["subprocess"])
def test_example_script_survives_sigkill_and_resumes_from_its_snapshot(mode, cluster, no_leaks, tmp_path):
    cluster.resize(2)
    snap, logs, steps = tmp_path / "snap", tmp_path / "logs", 30
    argv = ["run", "--nnodes=2", "--nproc_per_node=2", "--max-restarts=2", "--rdzv-id", f"cli-{mode}",
            "--log-dir", str(logs), str(paced_until_restart(tmp_path)), "--snapshot-dir", str(snap), "--steps",
            str(steps), "--sleep", "0.2"]
    box: dict = {}
    if mode == "in_process":
        thread = threading.Thread(target=lambda: box.update(rc=main(argv)))
        thread.start()
        _kill_rank1_once_training(snap, thread.is_alive)
        thread.join(400)
        assert box.get("rc") == 0
    else:
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO)}
        out_path, err_path = tmp_path / "cli.out", tmp_path / "cli.err"
        with open(out_path, "w") as out_file, open(err_path, "w") as err_file:  # files: a full pipe never blocks
            proc = subprocess.Popen([sys.executable, "-m", "ray_elastic", *argv], env=env, cwd=tmp_path,
                                    stdout=out_file, stderr=err_file)
            try:
                _kill_rank1_once_training(snap, lambda: proc.poll() is None)
                proc.wait(timeout=400)
            finally:
                if proc.poll() is None:
                    proc.kill()
        out, err = out_path.read_text(), err_path.read_text()
        assert proc.returncode == 0, err[-4000:]
        assert "[rank0]:step 1 loss" in out, out[-2000:]
        assert "succeeded" in err and "round 1: 2 node(s), world size 4 (restart)" in err
    script_pids = _check_resumed(snap, steps, world_size=4)
    for rank in range(4):
        assert (logs / f"cli-{mode}" / "attempt_0" / str(rank) / "stderr.log").exists()
    rank0_out = (logs / f"cli-{mode}" / "attempt_1" / "0" / "stdout.log").read_text()
    assert f"step {steps} loss" in rank0_out
    no_leaks(script_pids)  # no actor, placement group, worker or script process left


def _torchrun_env(tmp_path: Path, script: Path, run_id: str) -> dict[int, dict]:
    """What real torchrun gives the same world: 2 agents (nodes) × 2 processes, c10d rendezvous."""
    out = tmp_path / "torchrun"
    out.mkdir()
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2", "--max-restarts=3",
             "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}", str(script), str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    for agent in agents:
        _, err = agent.communicate(timeout=240)
        assert agent.returncode == 0, err[-3000:]
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)}


def test_script_env_matches_torchrun(cluster, no_leaks, tmp_path):
    cluster.resize(2)
    script = tmp_path / "dump_env.py"
    script.write_text(ENV_SCRIPT)
    out = tmp_path / "ours"
    out.mkdir()
    port = free_port()  # --master-port binds the store there: a script naming it in tcp:// works (issue 19)
    argv = ["run", "--nnodes=2:2", "--nproc-per-node=2", "--max_restarts=3", "--rdzv_id=envcheck",
            f"--master-port={port}", str(script), str(out), f"tcp://127.0.0.1:{port}"]
    assert main(argv) == 0
    ours = {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)}
    no_leaks([env["pid"] for env in ours.values()])
    theirs = _torchrun_env(tmp_path, script, "envcheck")

    node_specific = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE", "pid")
    for rank in range(4):
        assert ours[rank]["all_reduce"] == 4, "init_process_group('env://') formed the whole world"
        assert {k: v for k, v in ours[rank].items() if k not in node_specific} == {
            k: v for k, v in theirs[rank].items() if k not in node_specific
        }, f"rank {rank}"
        assert ours[rank]["TORCHELASTIC_USE_AGENT_STORE"] == "True"
        assert ours[rank]["GROUP_RANK"] == str(rank // 2) and ours[rank]["LOCAL_RANK"] == str(rank % 2)
        assert ours[rank]["TORCHELASTIC_ERROR_FILE"], "each rank has an error file"
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in ours.values()}) == 1
    assert ours[0]["MASTER_PORT"] == str(port)
    assert len({e["TORCHELASTIC_ERROR_FILE"] for e in ours.values()}) == 4


def test_failing_script_reports_root_cause_as_torchrun_does(cluster, no_leaks, tmp_path, capsys):
    cluster.resize(1)
    script = tmp_path / "fail.py"
    script.write_text(FAILING_SCRIPT)

    pids = tmp_path / "raised"
    pids.mkdir()
    rc = main(["run", "--nproc-per-node=2", "--max-restarts=0", str(script), "raise", str(pids)])
    report = capsys.readouterr().err
    assert rc == 1, report  # an uncaught exception under @record exits 1
    root = report[report.index("Root Cause"):]
    assert "rank      : 1 " in root and "exitcode  : 1" in root
    assert "ValueError: bad shard 17" in root
    assert 'raise ValueError("bad shard 17")' in root, "the script's own traceback, from its @record error file"
    assert "ScriptFailedError" not in root.split("traceback :")[1], "not the launcher's traceback"

    exited = tmp_path / "exited"
    exited.mkdir()
    rc = main(["run", "--nproc-per-node=2", "--max-restarts=0", str(script), "exit", str(exited)])
    report = capsys.readouterr().err
    assert rc == 1, report  # torchrun's exit code; the script's own is in the report
    root = report[report.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in root and "exitcode  : 7 (pid: " in root
    assert "giving up with exit code 7" in root, "the tail of the script's stderr"
    no_leaks([int(p.read_text()) for d in (pids, exited) for p in d.iterdir()])


def test_killing_a_worker_actor_kills_its_script(cluster, no_leaks, tmp_path):
    cluster.resize(2)
    snap = tmp_path / "snap"
    argv = ["run", "--nnodes=2", "--max-restarts=2", str(paced_until_restart(tmp_path)), "--snapshot-dir", str(snap),
            "--steps", "25", "--sleep", "0.2"]
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(rc=main(argv)))
    thread.start()
    _wait_for(lambda: len(_read_jsonl(snap / "steps.jsonl")) >= 3, 300, "the script to train a few steps")
    script_pid = next(s["pid"] for s in _read_jsonl(snap / "starts.jsonl") if s["rank"] == 1)
    actor = psutil.Process(script_pid).parent()
    assert "ElasticWorker" in " ".join(actor.cmdline())
    actor.kill()
    _assert_pids_gone([script_pid], timeout_s=5)
    thread.join(400)
    assert box.get("rc") == 0
    starts = _read_jsonl(snap / "starts.jsonl")
    assert [s["resumed_step"] > 0 for s in starts if s["restart_count"] == 1] == [True, True], starts
    no_leaks([s["pid"] for s in starts])


def test_bad_arguments_fail_before_anything_starts(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "127.0.0.1:1"}  # never contacted
    for args, expected in (
        (["--nnodes=3:2", str(EXAMPLE)], "write --nnodes=2:3"),
        ([str(tmp_path / "missing.py")], "not found"),
    ):
        proc = subprocess.run([sys.executable, "-m", "ray_elastic", "run", *args], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr
        assert "Ray instance" not in proc.stderr and "Traceback" not in proc.stderr


def test_scripts_restart_with_the_new_world_when_a_node_joins(cluster, no_leaks, tmp_path):
    """Even scripts that exit 0 on the SIGTERM of the scale-up: the run goes on (issue 18, item 2)."""
    cluster.resize(1)
    snap = tmp_path / "snap"
    fast = tmp_path / "fast"  # its per-step sleep ends once this exists
    graceful = example_wrapper(tmp_path, f"not os.path.exists({str(fast)!r})", on_sigterm_exit_0=True)
    argv = ["run", "--nnodes=1:2", "--nproc-per-node=2", "--max-restarts=0", str(graceful),
            "--snapshot-dir", str(snap), "--steps", "70", "--sleep", "0.3"]  # long enough for a node to start
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(rc=main(argv)))
    thread.start()
    _wait_for(lambda: len(_read_jsonl(snap / "steps.jsonl")) >= 3, 300, "the script to train a few steps",
              thread.is_alive)
    cluster.add_node()  # from the main thread: Cluster.add_node installs a signal handler
    # Once all four ranks of the grown world have started, the remaining steps need no pacing.
    _wait_for(lambda: sum(s["world_size"] == 4 for s in _read_jsonl(snap / "starts.jsonl")) == 4, 300,
              "the grown world to start", thread.is_alive)
    fast.touch()
    thread.join(400)
    assert box.get("rc") == 0, "a scale-up spends no restart (max-restarts=0)"
    starts = _read_jsonl(snap / "starts.jsonl")
    assert sorted(s["world_size"] for s in starts) == [2, 2, 4, 4, 4, 4], starts
    grown = [s for s in starts if s["world_size"] == 4]
    assert all(s["resumed_step"] >= 3 and s["restart_count"] == 0 for s in grown), grown
    assert [r["step"] for r in _read_jsonl(snap / "steps.jsonl")][-1] == 70
    no_leaks([s["pid"] for s in starts])
