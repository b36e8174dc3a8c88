"""`ray-elastic run`'s flags held to torchrun's own parser (torch.distributed.run.get_args_parser)."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import pytest
import torch
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.api import Std

from ray_elastic import cli_args
from ray_elastic.cli import build_parser, describe_failure, local_nproc, plan_launch, write_error_file
from ray_elastic.cli_args import OWN_FLAGS, TORCHRUN_FLAGS
from ray_elastic.cli_output import OutputSpec
from ray_elastic.cli_ray import cluster_nproc
from ray_elastic.errors import ConfigError, FailureInfo, TrainingFailedError

pytestmark = pytest.mark.timeout(60)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Optional actions by dest (help excluded)."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def _run_parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = build_parser(env or {})
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def test_every_torchrun_flag_is_accepted_with_torchruns_spellings():
    """Fails when torchrun gains (or changes) a flag that ray-elastic run does not handle."""
    theirs = _options(torchrun.get_args_parser())
    ours = _options(_run_parser())
    listed = {flag.dest: flag for flag in TORCHRUN_FLAGS}
    assert set(listed) == set(theirs), f"TORCHRUN_FLAGS differs from torchrun's flags: {set(listed) ^ set(theirs)}"
    for dest, action in theirs.items():
        mine = ours[dest]
        assert set(mine.option_strings) == set(action.option_strings), dest
        assert (mine.nargs == 0) == (action.nargs == 0), f"{dest}: a switch in one parser, a value in the other"
        assert (tuple(mine.choices) if mine.choices else None) == (tuple(action.choices) if action.choices
                                                                    else None), dest
        if action.nargs != 0 and not isinstance(action.default, list):
            assert str(mine.default) == str(action.default), f"{dest}: default {mine.default!r}"
        assert listed[dest].help or listed[dest].ignored, f"{dest}: say what it does or why it is ignored"
    own = {flag.dest for flag in OWN_FLAGS}
    assert not own & set(theirs), "our own flags must not shadow torchrun's"


SAMPLES = {  # a valid PET_<FLAG> value for every torchrun value flag
    "nnodes": "1:2", "nproc_per_node": "4", "rdzv_backend": "c10d", "rdzv_endpoint": "localhost:1",
    "rdzv_id": "abc", "rdzv_conf": "join_timeout=5", "max_restarts": "3", "monitor_interval": "2.5",
    "start_method": "fork", "event_log_handler": "console", "role": "trainer", "log_dir": "/tmp/x",
    "redirects": "3", "tee": "0:1,1:2", "local_ranks_filter": "0,1", "duplicate_stdout_filters": "a,b",
    "duplicate_stderr_filters": "c", "node_rank": "1", "master_addr": "10.0.0.1", "master_port": "1234",
    "local_addr": "10.0.0.2", "signals_to_handle": "SIGTERM,SIGUSR1", "shutdown_timeout": "7",
}


@pytest.mark.parametrize("flag", [f for f in TORCHRUN_FLAGS if f.dest not in ("logs_specs", "numa_binding")],
                         ids=lambda f: f.dest)
def test_pet_variables_set_flags_as_torchruns_do(flag, monkeypatch):
    """PET_<FLAG> gives the flag's value (switches: a non-zero integer); a flag on the command line wins."""
    theirs_dest = _options(torchrun.get_args_parser())[flag.dest]
    monkeypatch.setenv(flag.env_name, "1" if flag.switch else SAMPLES[flag.dest])
    from os import environ

    theirs = torchrun.get_args_parser().parse_args(["script.py"])
    ours = build_parser(dict(environ)).parse_args(["run", "script.py"])
    if flag.switch:
        assert getattr(ours, flag.dest) is True and getattr(theirs, flag.dest) is True
        monkeypatch.setenv(flag.env_name, "0")
        assert build_parser(dict(environ)).parse_args(["run", "script.py"]).__dict__[flag.dest] is False
        return
    expected = getattr(theirs, flag.dest)
    got = getattr(ours, flag.dest)
    if isinstance(expected, list):  # duplicate filters: torch splits at parse time, we when planning
        assert list(cli_args.parse_filters(got)) == expected
    else:
        assert str(got) == str(expected)
    value = flag.choices[-1] if flag.choices else "9"
    on_line = build_parser(dict(environ)).parse_args(["run", f"{theirs_dest.option_strings[-1]}={value}", "script.py"])
    assert getattr(on_line, flag.dest) == value, "the command line wins over PET_"


def test_a_pet_switch_that_is_not_a_number_is_a_clear_error():
    with pytest.raises(ConfigError, match="PET_NO_PYTHON='yes' must be 0 or 1"):
        build_parser({"PET_NO_PYTHON": "yes"})


@pytest.mark.parametrize("text", ["0", "1", "2", "3", "0:1,1:2", "0:3", "3:0,1:1,2:2"])
def test_std_specs_read_as_torchrun_reads_them(text):
    theirs = Std.from_str(text)
    ours = cli_args.parse_std("--tee", text)
    assert (ours == int(theirs)) if isinstance(ours, int) else ours == {k: int(v) for k, v in theirs.items()}


@pytest.mark.parametrize("text", ["4", "a", "0:4", "0:1,", ":1"])
def test_bad_std_specs_are_rejected(text):
    with pytest.raises(ValueError):
        Std.from_str(text)
    with pytest.raises(ConfigError, match="1 stdout, 2 stderr"):
        cli_args.parse_std("--redirects", text)


def test_console_routing_follows_torchruns_rules():
    """redirect: file only; tee: file and console; --local-ranks-filter: only those local ranks on the console."""
    out = OutputSpec(redirects={0: 3, 1: 1}, tee={1: 1}, local_ranks_filter=frozenset({0, 1}))
    assert not out.shown(0, 1) and not out.shown(0, 2), "local rank 0: both redirected"
    assert out.shown(1, 1) and out.shown(1, 2), "local rank 1: stdout redirected but tee'd, stderr untouched"
    assert not out.shown(2, 1), "local rank 2 is filtered out"
    assert OutputSpec(prefix_template="[${role_name}${local_rank}|${rank}]").prefix(5, 1, "trainer") == "[trainer1|5]"
    assert OutputSpec().prefix(3, 1, "x") == "[rank3]:"


def _plan(tmp_path: Path, *argv: str, env: dict[str, str] | None = None):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    args = build_parser(env or {}).parse_args(["run", *argv, str(script)])
    return plan_launch(args, env or {})


@pytest.mark.parametrize("run_id", ["..", ".", "a/b", "../../etc", ""])
def test_run_ids_cannot_leave_the_log_dir(run_id, tmp_path):
    with pytest.raises(ConfigError, match="--rdzv-id"):
        _plan(tmp_path, f"--rdzv-id={run_id}", f"--log-dir={tmp_path}")


def test_where_a_run_goes(tmp_path):
    assert _plan(tmp_path).local, "no address: this machine, no Ray"
    assert not _plan(tmp_path, env={"RAY_ADDRESS": "10.0.0.1:6379"}).local, "RAY_ADDRESS: that cluster"
    assert _plan(tmp_path, "--standalone", env={"RAY_ADDRESS": "10.0.0.1:6379"}).local, "--standalone: here"
    with pytest.raises(ConfigError, match="--address=ADDRESS or RAY_ADDRESS"):
        _plan(tmp_path, "--nnodes=2")
    assert _plan(tmp_path, "--nnodes=1:2").max_nodes == 2, "an elastic range starts with this machine"


def test_plan_carries_torchruns_settings(tmp_path):
    p = _plan(tmp_path, "--role=trainer", "--run-path", "--no-python", "--virtual-local-rank", "--tee=0:3",
              "--local-ranks-filter=0", "--duplicate-stdout-filters=loss,,acc,step", "--shutdown-timeout=3",
              "--signals-to-handle=SIGTERM,SIGUSR1", "--local-addr=10.1.1.1",
              env={"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "<${rank}>"})
    s = p.script
    assert s.role == "trainer" and s.run_path and not s.no_python, "--run-path wins over --no-python"
    assert s.argv()[:3] == [s.argv()[0], "-u", "-c"] and s.virtual_local_rank and s.kill_grace_s == 3
    assert s.output.tee == {0: 3} and s.output.local_ranks_filter == {0}
    assert s.output.duplicate_stdout_filters == ("loss,acc", "step") and s.output.prefix(2, 0, "r") == "<2>"
    assert s.log_dir is not None and Path(s.log_dir).is_dir(), "tee without --log-dir: a log dir, as torchrun"
    assert p.signals == (15, 10) and p.store_host == "10.1.1.1" and p.abort_timeout_s == 8
    assert _plan(tmp_path, env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "4"}).script.kill_grace_s == 4
    assert _plan(tmp_path).script.kill_grace_s == 30, "torchrun's default grace"


def test_master_port_in_use_is_rejected_up_front(tmp_path):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--master-port={port} cannot be used"):
            _plan(tmp_path, f"--master-port={port}")
    assert _plan(tmp_path, f"--master-port={port}").store_port == port


@pytest.mark.parametrize("spec", ["cpu", "auto", "3"])
def test_nproc_counts_this_machine_as_torchrun_does(spec, monkeypatch):
    assert local_nproc(spec) == torchrun.determine_local_world_size(spec)


def test_nproc_gpu_without_gpus_says_what_to_do():
    if torch.cuda.is_available():
        assert local_nproc("gpu") == torch.cuda.device_count()
        return
    with pytest.raises(ConfigError, match="no GPU; give a number"):
        local_nproc("gpu")


def test_nproc_counted_on_a_clusters_nodes():
    def node(cpu: float, gpu: float = 0, alive: bool = True) -> dict:
        return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}

    cpu_only = [node(8), node(4), node(0), node(2, alive=False)]
    assert cluster_nproc("cpu", cpu_only) == (4, False) and cluster_nproc("auto", cpu_only) == (4, False)
    mixed = [node(0), node(16, 8), node(16, 4)]
    assert cluster_nproc("gpu", mixed) == (4, True) and cluster_nproc("auto", mixed) == (4, True)
    with pytest.raises(ConfigError, match="no node of the Ray cluster has a GPU"):
        cluster_nproc("gpu", cpu_only)


def test_failure_report_and_error_file_keep_torchruns_shape(tmp_path):
    root = FailureInfo(kind="exception", rank=3, node_id="n" * 16, round_id=1,
                       message="ScriptFailedError: script exited with code 7 (pid 4242): ValueError: bad shard",
                       traceback="Traceback (most recent call last):\n  ...\nValueError: bad shard")
    other = FailureInfo(kind="died", rank=0, node_id="m" * 16, round_id=2, message="worker process died")
    error = TrainingFailedError("restart budget exhausted", root, (root, other), 2, 1)
    report = describe_failure(error, "train.py", nproc=2, hosts={"n" * 16: "host-a"})
    assert "train.py FAILED" in report and report.index("Failures:") < report.index("Root Cause")
    cause = report[report.index("Root Cause (first observed failure):"):]
    assert "[0]:" in cause and "host      : host-a" in cause and "rank      : 3 (local_rank: 1)" in cause
    assert "exitcode  : 7 (pid: 4242" in cause and "    ValueError: bad shard" in cause
    assert "rank      : 0 (local_rank: 0)" in report[:report.index("Root Cause")]
    path = tmp_path / "sub" / "error.json"
    write_error_file(str(path), root)
    data = json.loads(path.read_text())["message"]
    assert data["message"] == "ValueError: bad shard" and data["errorCode"] == 7
    assert data["extraInfo"]["py_callstack"].endswith("ValueError: bad shard") and data["extraInfo"]["timestamp"]


def test_script_env_role_signals_and_virtual_local_rank():
    from ray_elastic.launcher import RankPlace, ScriptSpec, script_env

    place = RankPlace("run", 0, rank=3, local_rank=1, num_nodes=2)
    spec = ScriptSpec(command=("x.py",), role="trainer", signals_to_handle="SIGTERM,SIGUSR1", virtual_local_rank=True)
    env = script_env({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5"}, spec, place, "/tmp/e.json")
    assert (env["ROLE_NAME"], env["TORCHELASTIC_SIGNALS_TO_HANDLE"], env["GROUP_WORLD_SIZE"]) == (
        "trainer", "SIGTERM,SIGUSR1", "2")
    assert (env["LOCAL_RANK"], env["CUDA_VISIBLE_DEVICES"]) == ("0", "5"), "its own GPU as device 0, as torchrun"
    assert script_env({"LOCAL_RANK": "1"}, spec, place, "e")["CUDA_VISIBLE_DEVICES"] == "1"
    plain = script_env({"LOCAL_RANK": "1"}, ScriptSpec(command=("x.py",)), place, "e")
    assert plain["LOCAL_RANK"] == "1" and "CUDA_VISIBLE_DEVICES" not in plain and plain["ROLE_NAME"] == "default"
