"""How a script's part in a round ends when the round is stopped or aborted while it runs (issue 18, item 2).

Real subprocesses and real signals, driven through a worker's session without Ray.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ray_elastic.context import Session, TrainContext, set_session
from ray_elastic.launcher import RoundInterrupted, ScriptProcess, ScriptSpec, run_script
from ray_elastic.snapshot import SnapshotHolder
from ray_elastic.state import MembershipChange

pytestmark = pytest.mark.timeout(60)

GRACEFUL = """
import signal, sys, time
def save_and_exit(*_):
    print("saved", flush=True)
    sys.exit(0)  # the common "save and exit 0 on SIGTERM" pattern
signal.signal(signal.SIGTERM, save_and_exit)
open(sys.argv[1], "w").write("up")
time.sleep(60)
"""


def _session() -> Session:
    context = TrainContext(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0, num_nodes=1,
                           restart_count=0, round_id=0, run_id="script-end", node_id="node",
                           device=torch.device("cpu"))
    return Session(context, SnapshotHolder("copy"))


@pytest.mark.parametrize("reason, expected", [("stop", MembershipChange), ("abort", RoundInterrupted)])
def test_a_script_that_exits_0_on_sigterm_is_restarted_not_a_success(reason, expected, tmp_path: Path):
    script, ready = tmp_path / "graceful.py", tmp_path / "ready"
    script.write_text(GRACEFUL)
    session = _session()
    box: dict = {}

    def train() -> None:
        set_session(session)
        try:
            box["returned"] = run_script(ScriptSpec(command=(str(script), str(ready)), kill_grace_s=5.0))
        except BaseException as exc:  # noqa: BLE001 - what the worker would see
            box["raised"] = exc
        finally:
            set_session(None)

    thread = threading.Thread(target=train)
    thread.start()
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the script did not start"
    session.interrupt(reason)  # what the coordinator's request_stop / abort does
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(box.get("raised"), expected), f"the round must re-form, not end as succeeded: {box}"


def test_a_script_that_had_already_exited_keeps_its_result(tmp_path: Path):
    """A stop that arrives after the script finished on its own does not undo its success."""
    proc = ScriptProcess([sys.executable, "-c", "pass"], {}, None, "", tmp_path, kill_grace_s=1.0)
    assert proc.start()
    deadline = time.monotonic() + 30
    while not proc._exited() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.interrupt("stop")
    assert proc.wait() == 0 and proc.interrupted is None
