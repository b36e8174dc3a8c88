"""Durable checkpoints without Ray: atomic writes, pruning, manifests, crashes mid-write, bad storage."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray
import torch

import ray_elastic
from ray_elastic.checkpoint import CRASH_ENV, MANIFEST, STATE_FILE, Checkpointer
from ray_elastic.config import RunConfig
from ray_elastic.context import TrainContext
from ray_elastic.errors import ConfigError, RunNameInUseError
from ray_elastic.state import SnapshotHolder

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]


def _config(storage: Path, name: str = "job", resume: bool = False, every: int = 1, keep: int = 2) -> RunConfig:
    return RunConfig(run_id=name, storage_path=str(storage), resume=resume, checkpoint_every=every,
                     keep_checkpoints=keep)


def _context(rank: int = 0) -> TrainContext:
    return TrainContext(rank=rank, local_rank=0, world_size=2, local_world_size=1, node_rank=rank, num_nodes=2,
                        restart_count=0, round_id=0, run_id="job", node_id="node", device=torch.device("cpu"))


def _commit(holder: SnapshotHolder) -> None:
    """What State.commit does to the holder: reuse the buffers, bump the commit id."""
    holder.commit_id += 1
    weight = holder.items.setdefault("model", {"weight": torch.zeros(4, 3, dtype=torch.float64)})["weight"]
    weight.fill_(float(holder.commit_id))
    holder.attrs = {"step": holder.commit_id + 1, "log": list(range(1, holder.commit_id + 2))}
    holder.world_size = 2


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir())


def test_save_is_a_durable_copy_of_the_commit(tmp_path):
    ckpt = Checkpointer.for_run(_config(tmp_path))
    holder = SnapshotHolder()
    _commit(holder)
    path = ckpt.maybe_save(holder, _context())
    assert path == tmp_path / "job" / "checkpoint_000000000"
    holder.items["model"]["weight"].fill_(-7.0)  # the next commit reuses the buffer
    loaded = ckpt.load_latest()
    assert loaded["commit_id"] == 0 and loaded["world_size"] == 2
    assert torch.equal(loaded["items"]["model"]["weight"], torch.zeros(4, 3, dtype=torch.float64))
    assert loaded["attrs"] == {"step": 1, "log": [1]}
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["commit_id"] == 0 and manifest["step"] == 1 and manifest["world_size"] == 2
    assert manifest["files"][STATE_FILE]["size"] == (path / STATE_FILE).stat().st_size
    assert len(manifest["files"][STATE_FILE]["sha256"]) == 64 and manifest["time"] > 0
    assert _names(tmp_path / "job") == ["checkpoint_000000000"], "no temporary files are left behind"


def test_writes_every_n_commits_on_rank_zero_only(tmp_path):
    ckpt = Checkpointer.for_run(_config(tmp_path, every=3, keep=10))
    rank0, rank1 = SnapshotHolder(), SnapshotHolder()
    for _ in range(7):
        _commit(rank0)
        _commit(rank1)
        assert ckpt.maybe_save(rank1, _context(rank=1)) is None
        ckpt.maybe_save(rank0, _context(rank=0))
    assert _names(tmp_path / "job") == ["checkpoint_000000002", "checkpoint_000000005"]
    assert ckpt.load_latest()["attrs"]["step"] == 6


def test_prunes_to_the_newest_k_complete_checkpoints(tmp_path):
    ckpt = Checkpointer.for_run(_config(tmp_path, keep=3))
    holder = SnapshotHolder()
    for _ in range(8):
        _commit(holder)
        ckpt.maybe_save(holder, _context())
    assert _names(tmp_path / "job") == [f"checkpoint_00000000{i}" for i in (5, 6, 7)]
    assert ckpt.load_latest()["commit_id"] == 7


def _three_checkpoints(tmp_path: Path) -> tuple[Checkpointer, Path]:
    ckpt = Checkpointer.for_run(_config(tmp_path, keep=3))
    holder = SnapshotHolder()
    for _ in range(3):
        _commit(holder)
        ckpt.maybe_save(holder, _context())
    return ckpt, tmp_path / "job" / "checkpoint_000000002"


def test_checkpoint_without_manifest_is_ignored(tmp_path):
    ckpt, newest = _three_checkpoints(tmp_path)
    (newest / MANIFEST).unlink()
    assert ckpt.load_latest()["commit_id"] == 1


def test_checkpoint_failing_its_checksum_falls_back_to_the_previous(tmp_path):
    ckpt, newest = _three_checkpoints(tmp_path)
    data = bytearray((newest / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    (newest / STATE_FILE).write_bytes(bytes(data))
    assert ckpt.load_latest()["commit_id"] == 1


def test_truncated_state_file_is_not_complete(tmp_path):
    ckpt, newest = _three_checkpoints(tmp_path)
    with open(newest / STATE_FILE, "r+b") as file:
        file.truncate(10)
    assert [p.name for p in ckpt.complete_checkpoints()] == ["checkpoint_000000000", "checkpoint_000000001"]
    assert ckpt.load_latest()["commit_id"] == 1


def test_manifest_naming_another_commit_is_ignored(tmp_path):
    ckpt, newest = _three_checkpoints(tmp_path)
    manifest = json.loads((newest / MANIFEST).read_text())
    manifest["commit_id"] = 9
    (newest / MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.load_latest()["commit_id"] == 1


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from ray_elastic.checkpoint import Checkpointer
    from ray_elastic.state import SnapshotHolder
    from tests.unit.test_checkpoint import _commit, _context
    ckpt = Checkpointer(sys.argv[1], every=1, keep=5)
    holder = SnapshotHolder()
    for _ in range(6):
        _commit(holder)
        ckpt.maybe_save(holder, _context())
    """
)


@pytest.mark.parametrize("point", ["before_rename", "before_manifest"])
def test_crash_mid_write_never_yields_a_partial_checkpoint(tmp_path, point):
    """A real writer process SIGKILLed at commit 3 between temp write and rename (or before its manifest)."""
    ckpt = Checkpointer.for_run(_config(tmp_path, keep=5))
    env = {**os.environ, CRASH_ENV: f"{point}:3", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(ckpt.run_dir)], env=env, cwd=REPO,
                          capture_output=True, timeout=90)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = _names(ckpt.run_dir)
    if point == "before_rename":
        assert any(n.startswith(".tmp-checkpoint_000000003") for n in leftovers), leftovers
        assert "checkpoint_000000003" not in leftovers
    else:
        assert "checkpoint_000000003" in leftovers
        assert not (ckpt.run_dir / "checkpoint_000000003" / MANIFEST).exists()
    loaded = ckpt.load_latest()
    assert loaded["commit_id"] == 2, "the previous complete checkpoint is restored"
    assert torch.equal(loaded["items"]["model"]["weight"], torch.full((4, 3), 2.0, dtype=torch.float64))
    # Resuming writes commit 3 again over the leftovers and cleans them up.
    resumed = Checkpointer.for_run(_config(tmp_path, resume=True, keep=5))
    holder = SnapshotHolder()
    holder.load_payload(loaded)
    _commit(holder)
    resumed.maybe_save(holder, _context())
    assert resumed.load_latest()["commit_id"] == 3
    assert _names(ckpt.run_dir) == [f"checkpoint_00000000{i}" for i in range(4)]


def test_unwritable_storage_path_is_rejected(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="storage_path .* is not writable.*Pass a directory you can write to"):
        Checkpointer.for_run(_config(blocker))


def test_name_in_use_needs_resume(tmp_path):
    _three_checkpoints(tmp_path)
    with pytest.raises(RunNameInUseError, match="pass resume=True to continue it or choose another name") as info:
        Checkpointer.for_run(_config(tmp_path))
    assert "'job'" in str(info.value) and "checkpoint_000000002" in str(info.value)
    assert Checkpointer.for_run(_config(tmp_path, resume=True)).load_latest()["commit_id"] == 2
    assert Checkpointer.for_run(_config(tmp_path, name="other")).load_latest() is None


def test_resume_without_checkpoints_starts_fresh(tmp_path):
    ckpt = Checkpointer.for_run(_config(tmp_path, resume=True))
    assert ckpt.load_latest() is None
    # A run directory holding no complete checkpoint is not "in use".
    (ckpt.run_dir / "checkpoint_000000004").mkdir()
    assert Checkpointer.for_run(_config(tmp_path)).load_latest() is None


@pytest.mark.parametrize(
    ("storage", "name", "message"),
    [
        ("s3://bucket/runs", "job", "looks like a URI"),
        (None, "../escape", "cannot be a directory name"),
        (None, "a/b", "cannot be a directory name"),
    ],
)
def test_bad_storage_or_name_is_rejected(tmp_path, storage, name, message):
    with pytest.raises(ConfigError, match=message):
        Checkpointer.for_run(_config(storage or tmp_path, name=name))


def test_checkpointer_pickles_for_actors(tmp_path):
    ckpt, _ = _three_checkpoints(tmp_path)
    copy = pickle.loads(pickle.dumps(ckpt))
    assert copy.run_dir == ckpt.run_dir and copy.load_latest()["commit_id"] == 2


def _noop(config):
    return None


def test_run_rejects_storage_problems_before_connecting(tmp_path, ray_disconnected):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        ray_elastic.run(_noop, storage_path=str(blocker), name="job")
    _three_checkpoints(tmp_path)
    with pytest.raises(RunNameInUseError, match="pass resume=True"):
        ray_elastic.run(_noop, storage_path=str(tmp_path), name="job")
    assert not ray.is_initialized(), "rejected before connecting to Ray, so before any actor starts"
