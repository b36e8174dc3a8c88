"""The CLI's argument handling and the launcher's process handling, without Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import ray

from ray_elastic.cli import build_parser, failure_exit_code, main, parse_nnodes, plan_launch
from ray_elastic.errors import ConfigError, FailureInfo
from ray_elastic.launcher import ScriptProcess, exit_code_of, script_failure

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text("print('hi')\n")
    return path


def plan(*argv: str):
    return plan_launch(build_parser({}).parse_args(["run", *argv]), {})


@pytest.mark.parametrize("text, expected", [("2", (2, 2)), ("1:4", (1, 4)), ("3:3", (3, 3))])
def test_nnodes_accepts_torchrun_forms(text, expected):
    assert parse_nnodes(text) == expected


@pytest.mark.parametrize("text, message", [
    ("3:2", "write --nnodes=2:3"), ("0", ">= 1"), ("a:b", "integer"), ("1:2:3", "N or MIN:MAX"), ("", "integer"),
])
def test_nnodes_rejects_bad_ranges(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_nnodes(text)


def test_both_flag_spellings_and_script_args(script):
    for argv in (
        ["--nnodes=1:3", "--nproc_per_node=2", "--max_restarts=4", "--rdzv_id=abc"],
        ["--nnodes", "1:3", "--nproc-per-node", "2", "--max-restarts", "4", "--rdzv-id", "abc"],
    ):
        p = plan(*argv, str(script), "--lr", "0.1", "--nnodes=9")
        assert (p.min_nodes, p.max_nodes, p.nproc_per_node, p.max_restarts, p.run_id) == (1, 3, 2, 4, "abc")
        assert p.script.command == (str(script.resolve()), "--lr", "0.1", "--nnodes=9"), "args after the script are its"


def test_defaults_follow_torchrun(script):
    p = plan(str(script))
    assert (p.min_nodes, p.max_nodes, p.nproc_per_node, p.max_restarts) == (1, 1, 1, 0)
    assert p.run_id.startswith("ray-elastic-") and p.script.cwd == os.getcwd() and p.script.log_dir is None


def test_module_standalone_and_rdzv_conf():
    p = plan("--standalone", "--nproc-per-node=3", "--rdzv-conf", "join_timeout=30", "-m", "pkg.train", "--x")
    assert p.standalone and (p.min_nodes, p.max_nodes, p.nproc_per_node) == (1, 1, 3)
    assert p.script.command == ("-m", "pkg.train", "--x") and p.wait_for_nodes_timeout_s == 30
    assert p.script.argv()[:4] == [sys.executable, "-u", "-m", "pkg.train"]


def test_log_dir_is_created_and_absolute(script, tmp_path):
    p = plan("--log-dir", str(tmp_path / "a" / "b"), str(script))
    assert p.script.log_dir == str((tmp_path / "a" / "b").resolve()) and Path(p.script.log_dir).is_dir()


@pytest.mark.parametrize("argv, message", [
    (["--nproc-per-node=0"], "--nproc-per-node=0 must be >= 1"),
    (["--nproc-per-node=many"], "must be a number, or auto, cpu, gpu or xpu"),
    (["--max-restarts=-2"], "--max-restarts=-2 must be >= -1"),
    (["--standalone", "--nnodes=2"], "--standalone runs one node"),
    (["--standalone", "--address=auto"], "drop --address"),
    (["--rdzv-id=a/b"], "may only hold"),
    (["--rdzv-conf=join_timeout"], "key=value"),
    (["-m", "--no-python"], "cannot be combined"),
])
def test_bad_arguments_say_what_to_change(argv, message, script):
    with pytest.raises(ConfigError, match=message):
        plan(*argv, str(script))


def test_main_rejects_bad_input_with_exit_2_before_ray_starts(tmp_path, script, capsys, ray_disconnected):
    assert not ray.is_initialized()
    assert main(["run", "--nnodes=3:2", str(script)]) == 2
    assert "write --nnodes=2:3" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.py")]) == 2
    err = capsys.readouterr().err
    assert "training script" in err and "not found" in err
    assert main(["run", "--no-such-flag", str(script)]) == 2
    assert main(["run"]) == 2, "the script is required"
    assert not ray.is_initialized(), "nothing was started"


def test_exit_codes_from_failures():
    def failure(message: str, kind: str = "exception") -> FailureInfo:
        return FailureInfo(kind=kind, rank=1, node_id="n" * 16, round_id=0, message=message)

    assert exit_code_of("ScriptFailedError: script exited with code 3: ValueError: x") == 3
    assert failure_exit_code(failure("ScriptFailedError: script exited with code 3: boom")) == 3
    assert failure_exit_code(failure("ScriptFailedError: script exited with code -9: killed by SIGKILL")) == 137
    assert failure_exit_code(failure("worker process died", kind="died")) == 1
    assert failure_exit_code(None) == 1


def test_recorded_traceback_is_read_from_the_error_file(tmp_path):
    error_file = tmp_path / "error.json"
    script = tmp_path / "boom.py"
    script.write_text(textwrap.dedent("""
        from torch.distributed.elastic.multiprocessing.errors import record

        @record
        def main():
            raise KeyError("missing column")

        main()
    """))
    proc = subprocess.run([sys.executable, str(script)], env={**os.environ, "TORCHELASTIC_ERROR_FILE": str(error_file)},
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 1
    err = script_failure(proc.returncode, str(error_file), ["unrelated stderr"])
    assert err.exit_code == 1 and "KeyError: 'missing column'" in str(err)
    assert 'raise KeyError("missing column")' in err.remote_traceback
    # Without an error file: the tail of stderr; killed by a signal: named.
    tail = script_failure(-9, str(tmp_path / "none.json"), ["Traceback ...", "OSError: disk full", ""])
    assert str(tail) == "script exited with code -9: killed by SIGKILL" and "disk full" in tail.remote_traceback


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(pids, timeout_s=10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)], "processes outlived their launcher"


TREE = "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); print('started', flush=True); time.sleep(60)"


def test_interrupt_kills_the_whole_tree_children_first(tmp_path):
    proc = ScriptProcess([sys.executable, "-c", TREE], dict(os.environ), None, "[rank0]:", tmp_path, kill_grace_s=0.5)
    assert proc.start()
    deadline = time.monotonic() + 30
    stdout = tmp_path / "stdout.log"  # created by the output pump, which may not have run yet
    while not (stdout.exists() and "started" in stdout.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) == 2
    proc.interrupt("abort")
    assert proc.wait() == -signal.SIGTERM
    _wait_gone(tree)
    assert proc.interrupted == "abort" and not proc.start(), "never restarted once interrupted"


def test_leftover_grandchildren_are_killed_after_a_clean_exit(tmp_path):
    leaker = "import subprocess; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True)"
    proc = ScriptProcess([sys.executable, "-c", leaker], dict(os.environ), None, "", tmp_path, kill_grace_s=0.5)
    assert proc.start() and proc.wait() == 0
    _wait_gone([int((tmp_path / "stdout.log").read_text().split()[0])])


def test_script_dies_with_its_launcher_process(tmp_path):
    """PR_SET_PDEATHSIG: a SIGKILLed worker (here, a stand-in process) takes its script along."""
    pid_file = tmp_path / "pid"
    launcher = textwrap.dedent(f"""
        import os, sys, time
        from ray_elastic.launcher import ScriptProcess
        proc = ScriptProcess(["sleep", "60"], dict(os.environ), None, "", None, 1.0)
        proc.start()
        open({str(pid_file)!r}, "w").write(str(proc.pid))
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert _alive(child)
    parent.kill()
    parent.wait()
    _wait_gone([child], timeout_s=5)

