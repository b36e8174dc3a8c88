"""README's "ray job submit" section, walked as a new user would, and joining a token-protected cluster.

A fresh HOME (no ~/.ray): the README's set-up runs the quickstart (a local `ray.init()`,
which writes ~/.ray/auth_token; its output is checked as a new user reads it), then the
job-submit section's commands run as written, in one shell. Only what keeps this cluster
from meeting others on the machine is added: the quickstart runs with RAY_ADDRESS=local,
`ray start` gets its own ports, temp dir and node IP, and the dashboard port in the submit
address follows. The same head (token authentication on, as the README leaves it) then
serves the checks of `run()` and `ray-elastic run --address` with no token, a wrong one
and the right one. Teardown kills exactly the processes that carry this HOME in their
environment, never `ray stop` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from ray_elastic.testing.ports import free_port
from ray_elastic.testing.procs import kill_and_name, marked_processes, still_running

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _fresh_machine_env() -> dict[str, str]:
    """This environment without Ray's settings (a machine that never ran Ray), keeping the suite's session marker
    (RAY_ELASTIC_TEST_SESSION) so that scripts/test.sh can kill what a test that did not finish left running."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_ELASTIC_TEST_SESSION"}


def readme_commands(section: str) -> list[str]:
    """The first ```bash block under README heading `section`, one command per line, comments dropped."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S)
    assert block, f"README section {section!r} has no bash block"
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


class ReadmeMachine:
    """A fresh HOME on this machine; every command runs with it, and teardown finds its processes by it."""

    def __init__(self, root: Path):
        self.root = root
        self.quickstart_output = ""
        self.home = root / "home"
        self.home.mkdir()
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.commands = readme_commands("ray job submit")
        self.env = _fresh_machine_env()
        self.env.update(
            HOME=str(self.home),
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `ray` and `python` are this venv's
            OMP_NUM_THREADS="1",
            RAY_DEDUP_LOGS="0",
            PYTHONUNBUFFERED="1",
        )

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def isolate(self, command: str) -> str:
        """Keep the README's command as written, plus what stops it meeting other clusters here."""
        if command.startswith("ray start"):
            command += (f" --port={self.gcs_port} --dashboard-port={self.dashboard_port}"
                        f" --temp-dir={self.root / 'ray'} --node-ip-address=127.0.0.1"
                        f" --dashboard-agent-listen-port={free_port()} --disable-usage-stats")
        return command.replace("127.0.0.1:8265", f"127.0.0.1:{self.dashboard_port}")

    def shell(self, script: str, timeout_s: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env or self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout_s, start_new_session=True)

    def processes(self) -> list[psutil.Process]:
        return marked_processes("HOME", self.env["HOME"])


    def stop(self) -> list[str]:
        """Terminate, then kill, every process carrying this HOME; return what survived."""
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


@pytest.fixture(scope="module")
def readme_head(clusters) -> Iterator[ReadmeMachine]:
    """The README's path up to (not including) `ray job submit`: quickstart in a fresh HOME, then the head."""
    clusters.close_shared()
    root = Path(tempfile.mkdtemp(prefix="rejs", dir="/tmp"))  # short: Ray's socket paths must fit
    machine = ReadmeMachine(root)
    try:
        # RAY_ADDRESS=local: a fresh local Ray, as on the reader's machine, not whichever cluster another
        # test on this shared machine started last (ray.init() joins that one otherwise).
        quick = machine.shell("python examples/quickstart.py 2>&1", timeout_s=240,
                              env=dict(machine.env, RAY_ADDRESS="local"))
        assert quick.returncode == 0, quick.stdout[-4000:]
        machine.quickstart_output = quick.stdout
        left = kill_and_name(still_running(machine.processes, wait_s=15))
        assert not left, f"the quickstart left processes behind: {left}"
        assert (machine.home / ".ray" / "auth_token").is_file(), "the quickstart's ray.init() writes the token"
        setup = [c for c in machine.commands if not c.startswith("ray job submit")]
        head = machine.shell("\n".join(machine.isolate(c) for c in setup), timeout_s=180)
        assert head.returncode == 0, (head.stdout + head.stderr)[-4000:]
        yield machine
    finally:
        survivors = machine.stop()
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"Ray processes left behind: {survivors}"


def test_quickstart_output_reads_right_from_the_first_line(readme_head, no_shared_cluster):
    """The README's quickstart on a machine that never ran Ray (issue 14): no warning lines, no wait for
    nodes that exist, and the first line about the failure names its cause (rank 1 raised InjectedFault),
    not the collective error it caused."""
    out = readme_head.quickstart_output
    lines = out.splitlines()
    assert not [line for line in lines if "warn" in line.lower()], out[-6000:]
    assert not [line for line in lines if "waiting" in line], out[-6000:]
    failure = next(line for line in lines if re.search(r"fail|died|lost", line))
    assert "InjectedFault" in failure and "rank 1" in failure, out[-6000:]
    assert failure.index("InjectedFault") < failure.find("consequence") or "consequence" not in failure
    assert "restarts spent: 1" in lines[-1], out[-6000:]


def test_readme_job_submit_works_as_written_after_the_quickstart(readme_head, no_shared_cluster):
    commands = readme_head.commands
    assert any(c.startswith("ray start --head") for c in commands), commands
    submit = [c for c in commands if c.startswith("ray job submit")]
    assert len(submit) == 1, commands
    # Every `export` of the section holds in the shell that submits, as it would in the reader's.
    exports = [c for c in commands if c.startswith("export ")]
    job = readme_head.shell("\n".join([*exports, readme_head.isolate(submit[0])]), timeout_s=240)
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs[-6000:]
    assert "final loss" in logs and "after 40 steps" in logs and "restarts spent: 1" in logs, logs[-6000:]
    assert "[ray_elastic] run finished after 1 restart(s)" in logs, "progress shows as plain lines in the job's logs"


def test_readme_token_command_makes_a_token_where_there_is_none(tmp_path):
    """The section's first command is what makes the rest work on a machine that never ran Ray."""
    first = readme_commands("ray job submit")[0]
    assert first.startswith("ray get-auth-token --generate"), first
    env = _fresh_machine_env()
    env.update(HOME=str(tmp_path), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    made = subprocess.run(["bash", "-c", first], env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    token = (tmp_path / ".ray" / "auth_token").read_text()
    again = subprocess.run(["bash", "-c", first], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and (tmp_path / ".ray" / "auth_token").read_text() == token, "kept, not replaced"


_RUN = textwrap.dedent(
    """
    import sys, time
    import ray_elastic
    from ray_elastic.errors import ConfigError

    def train_fn():
        return ray_elastic.get_context().world_size

    started = time.monotonic()
    try:
        result = ray_elastic.run(train_fn, ray_address=sys.argv[1], progress="none", warmup_modules=())
    except ConfigError as exc:
        print(f"CONFIG_ERROR after {time.monotonic() - started:.1f}s: {exc}")
        sys.exit(3)
    print("RAN", result.return_values)
    """
)


def _client_env(machine: ReadmeMachine, **auth: str) -> dict[str, str]:
    env = dict(machine.env, HOME=str(machine.root / "client"), **auth)  # a client machine: no ~/.ray of its own
    (machine.root / "client").mkdir(exist_ok=True)
    return env


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({}, "requires token authentication, and this process sends no token"),
        ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}, "rejected the token read from the RAY_AUTH_TOKEN"),
    ],
    ids=["no-token", "wrong-token"],
)
def test_run_against_a_token_head_without_the_token_is_a_config_error(readme_head, no_shared_cluster, auth,
                                                                       expected):
    env = _client_env(readme_head, **auth)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _RUN, readme_head.gcs_address], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3 and "CONFIG_ERROR" in proc.stdout, out[-3000:]
    assert expected in proc.stdout and "RAY_AUTH_MODE=token" in proc.stdout, proc.stdout
    assert "ray get-auth-token" in proc.stdout, "says where the right token comes from"
    assert time.monotonic() - started < 60, "before Ray's 20 s of retries, and before anything starts"
    assert "ray.exceptions" not in out and "Traceback" not in out, out[-3000:]


def test_cli_against_a_token_head_needs_the_token_and_runs_with_it(readme_head, no_shared_cluster, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(
        """
        import torch, torch.distributed as dist
        dist.init_process_group("gloo")
        t = torch.ones(1); dist.all_reduce(t)
        print(f"SUM {t.item()} WORLD {dist.get_world_size()}")
        dist.destroy_process_group()
        """
    ))
    cli = [str(BIN / "ray-elastic"), "run", "--address", readme_head.gcs_address, "--nproc-per-node=1", str(script)]
    refused = subprocess.run(cli, env=_client_env(readme_head), cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2, (refused.stdout + refused.stderr)[-3000:]
    assert "requires token authentication" in refused.stderr and "RAY_AUTH_MODE=token" in refused.stderr
    token = (readme_head.home / ".ray" / "auth_token").read_text()
    ran = subprocess.run(cli, env=_client_env(readme_head, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token),
                         cwd=tmp_path, capture_output=True, text=True, timeout=240)
    logs = ran.stdout + ran.stderr
    assert ran.returncode == 0, logs[-6000:]
    assert "SUM 1.0 WORLD 1" in logs and "succeeded" in logs, logs[-6000:]
