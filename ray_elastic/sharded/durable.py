"""Durable checkpoints of sharded state: `torch.distributed.checkpoint` files, written in the background.

Layout under ``<storage_path>/<run name>/`` (beside the replicated checkpoints of `checkpoint.py`,
and with the same rule: a checkpoint counts only once its manifest exists and matches)::

    checkpoint_000000041/.metadata          DCP's global metadata (merged, see below)
    checkpoint_000000041/__3_0.distcp       rank 3's shards (every rank writes its own)
    checkpoint_000000041/__3.metadata       rank 3's part of the metadata
    checkpoint_000000041/rest.pt            the replicated part: skeletons, attributes, leaf specs
    checkpoint_000000041/MANIFEST.json      kind "sharded", commit, step, world size, files

Each rank writes its shards from its in-memory snapshot in a thread of its own, with
`dcp.save(..., no_dist=True)` and a rank-local metadata file: no collective runs in the
background, so nothing there can interleave with training's collectives or hang on a
lost peer. Rank 0's thread then waits for every rank's part, merges the parts' metadata
into DCP's global `.metadata`, renames the directory into place and writes the manifest
last. A part that never comes (a rank lost) leaves a temporary directory, ignored and
later pruned. Loading is `dcp.load` into shards of the current world: it reshards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.tensor import DTensor, Shard

from ray_elastic.checkpoint import MANIFEST, TMP_PREFIX, _commit_id_of, _fsync_dir, _remove_tree, checkpoint_dir_name
from ray_elastic.checkpoint_checks import SHARDED_STATE_FILE as REST_FILE
from ray_elastic.checkpoint_checks import load_weights_only, manifest_mismatch
from ray_elastic.safepath import open_new, read_bytes
from ray_elastic.sharded.capture import _contiguous_stride
from ray_elastic.sharded.layout import SAFE_TYPES, FlatLayout, LeafSpec, leaf_view, local_shape

logger = logging.getLogger("ray_elastic")

KIND = "sharded"
DCP_METADATA = ".metadata"


def io_mesh(world: int, rank: int) -> Any:
    """A CPU device mesh of this world for checkpoint I/O, built for the rank this process has now.

    DTensors of FSDP2 parameters can carry a mesh that still reports the rank the process
    had in an earlier process group (seen with torch 2.13: DCP then wrote a shard at another
    rank's offsets), so DCP's view of who holds which rows must not come from them. This mesh
    opens no process group.
    """
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh("cpu", list(range(world)), _init_backend=False, _rank=rank)


class _RankWriter(FileSystemWriter):
    """DCP's file writer, told which rank it writes for: files `__<rank>_*`, metadata `__<rank>.metadata`."""

    def __init__(self, path: str | os.PathLike[str], rank: int):
        super().__init__(path, single_file_per_rank=True, sync_files=True, overwrite=True)
        self._rank = rank

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_writer(is_coordinator, rank=self._rank, use_collectives=False)


def merge_metadata(parts: list[Metadata]) -> Metadata:
    """One global DCP metadata from the rank-local ones: every tensor's chunks and where each was written."""
    state: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for part in parts:
        for key, meta in part.state_dict_metadata.items():
            if not isinstance(meta, TensorStorageMetadata):
                state.setdefault(key, meta)
                continue
            merged = state.setdefault(key, TensorStorageMetadata(meta.properties, meta.size, []))
            merged.chunks.extend(c for c in meta.chunks if all(s > 0 for s in c.sizes))
        for index, info in (part.storage_data or {}).items():
            chunks = part.state_dict_metadata[index.fqn]
            empty = isinstance(chunks, TensorStorageMetadata) and any(
                c.offsets == index.offset and not all(s > 0 for s in c.sizes) for c in chunks.chunks)
            if not empty:
                storage[index] = info
    for meta in state.values():
        if isinstance(meta, TensorStorageMetadata):
            meta.chunks.sort(key=lambda c: tuple(c.offsets))
    version = next((p.version for p in parts if p.version), None)
    return Metadata(state_dict_metadata=state, storage_data=storage, version=version)


class ShardedCheckpoints:
    """Background writer and loader of sharded checkpoints for one run directory.

    Args:
        run_dir: ``<storage_path>/<run name>``.
        every: write at every `every`-th commit.
        keep: complete checkpoints to keep.
        part_timeout_s: how long rank 0 waits for the other ranks' parts before giving up on one.
    """

    def __init__(self, run_dir: str | os.PathLike[str], every: int = 1, keep: int = 2, part_timeout_s: float = 600.0,
                 safe_globals: tuple = ()):
        self.run_dir = Path(run_dir)
        self.safe_globals = tuple(safe_globals)  # types the driver allowed for weights_only loading
        self.every = every
        self.keep = keep
        self.part_timeout_s = part_timeout_s
        self._thread: threading.Thread | None = None
        self._buffer: torch.Tensor | None = None
        self._give_up = threading.Event()
        self._meshes: dict[tuple[int, int], Any] = {}
        self.last_error: BaseException | None = None
        self.written: list[Path] = []
        self.cpu_s: list[float] = []  # CPU time each write took in its thread (what it takes from training)

    # -- writing ---------------------------------------------------------------------------------------
    def due(self, commit_id: int) -> bool:
        return commit_id >= 0 and (commit_id + 1) % self.every == 0

    def busy(self) -> set[int]:
        """Data pointers of snapshot buffers the writer still reads (not to be refilled yet)."""
        thread, buffer = self._thread, self._buffer
        return {buffer.data_ptr()} if thread is not None and thread.is_alive() and buffer is not None else set()

    def save_async(self, generation: Any, round_id: int, step: Any) -> None:
        """Start writing this rank's part of `generation` (and, on rank 0, finishing the checkpoint).

        Waits for the previous write first: the loop waits only when writes take longer than
        `every` commits.
        """
        self.wait()
        key = (generation.world, generation.rank)
        if key not in self._meshes:  # made here, on the training thread, for the rank this process has now
            self._meshes = {key: io_mesh(*key)}
        tmp = self.run_dir / f"{TMP_PREFIX}{checkpoint_dir_name(generation.commit_id)}-r{round_id}"
        rest = None
        if generation.rank == 0:
            rest = {"commit_id": generation.commit_id, "world": generation.world, "specs": generation.specs,
                    "items": generation.rest["items"], "attrs": generation.rest["attrs"], "step": step}
        self._give_up.clear()
        self._buffer = generation.own
        self._thread = threading.Thread(
            target=self._write, args=(tmp, generation, self._meshes[key], rest),
            name=f"ray_elastic-checkpoint-{generation.commit_id}", daemon=True)
        self._thread.start()

    def wait(self, timeout_s: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def abandon(self, timeout_s: float = 30.0) -> None:
        """Stop waiting for other ranks' parts (the round they wrote in is over) and let the writer end."""
        self._give_up.set()
        self.wait(timeout_s)

    def _write(self, tmp: Path, generation: Any, mesh: Any, rest: dict[str, Any] | None) -> None:
        rank, world, commit_id = generation.rank, generation.world, generation.commit_id
        started = time.thread_time()
        try:
            tensors = {}
            layout = FlatLayout.of(generation.specs, world, rank)
            for i, spec in enumerate(generation.specs):
                view = leaf_view(generation.own, generation.specs, layout, i, world, rank)
                if view.numel() == 0 and rank != 0:
                    continue
                tensors[spec.key] = DTensor.from_local(view, mesh, [Shard(spec.dim)], run_check=False,
                                                       shape=torch.Size(spec.shape),
                                                       stride=_contiguous_stride(spec.shape))
            tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
            with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.save(tensors, storage_writer=_RankWriter(tmp, rank), no_dist=True)
            if rest is not None:
                self._finish(tmp, world, commit_id, rest)
        except BaseException as exc:  # noqa: BLE001 - a failed write is logged; the previous checkpoint stays
            self.last_error = exc
            logger.warning("sharded checkpoint of commit %s not written: %s", commit_id, exc)
        finally:
            self.cpu_s.append(time.thread_time() - started)

    def _finish(self, tmp: Path, world: int, commit_id: int, rest: dict[str, Any]) -> None:
        deadline = time.monotonic() + self.part_timeout_s
        parts = [tmp / f"__{k}{DCP_METADATA}" for k in range(world)]
        while not all(p.exists() for p in parts):
            if self._give_up.is_set() or time.monotonic() > deadline:
                logger.warning("sharded checkpoint of commit %s abandoned: not every rank wrote its part", commit_id)
                return
            time.sleep(0.02)
        merged = merge_metadata([pickle.loads(p.read_bytes()) for p in parts])
        _write_synced(tmp / DCP_METADATA, pickle.dumps(merged))
        _write_synced(tmp / REST_FILE, _torch_bytes(rest))
        _fsync_dir(tmp)
        final = self.run_dir / checkpoint_dir_name(commit_id)
        if final.exists():
            _remove_tree(final)
        os.replace(tmp, final)
        _fsync_dir(self.run_dir)
        files = {}
        for path in sorted(final.iterdir()):  # every file's size and sha256, as replicated checkpoints have
            data = read_bytes(path)
            files[path.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        step = rest.get("step")
        manifest = {"format": 1, "kind": KIND, "commit_id": commit_id, "world_size": world, "time": time.time(),
                    "step": step if isinstance(step, (int, float)) else None, "files": files}
        _write_synced(final / f"{TMP_PREFIX}{MANIFEST}", json.dumps(manifest, indent=1).encode())
        os.replace(final / f"{TMP_PREFIX}{MANIFEST}", final / MANIFEST)
        _fsync_dir(final)
        self.written.append(final)
        self.prune(commit_id)

    def prune(self, finished: int) -> None:
        """Keep the newest `keep` complete checkpoints; drop older ones, and partial ones older than `finished`."""
        complete = self.complete()
        keep = {p for p, _ in complete[-self.keep:]}
        for path in self.run_dir.iterdir():
            if path in keep:
                continue
            if path.name.startswith(TMP_PREFIX) and path.is_dir():
                name = path.name[len(TMP_PREFIX):].split("-")[0]
                if 0 <= _commit_id_of(Path(name)) <= finished:  # a later one may still be in progress
                    shutil.rmtree(path, ignore_errors=True)
            elif 0 <= _commit_id_of(path) <= finished:
                _remove_tree(path)

    # -- reading ---------------------------------------------------------------------------------------
    def complete(self) -> list[tuple[Path, dict[str, Any]]]:
        """(directory, manifest) of every complete sharded checkpoint, oldest first."""
        from ray_elastic.checkpoint import Checkpointer

        reader = Checkpointer(self.run_dir)
        out = []
        for path in reader.complete_checkpoints():
            manifest = reader._read_manifest(path)
            if manifest is not None and manifest.get("kind") == KIND:
                out.append((path, manifest))
        return out

    def newest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete checkpoint whose files all match their manifest's sizes and sha256."""
        for path, manifest in reversed(self.complete()):
            problem = manifest_mismatch(path, manifest["commit_id"])
            if problem is None:
                return path, manifest
            logger.warning("sharded checkpoint %s does not match its manifest (%s); trying an older one", path, problem)
        return None

    def read_rest(self, path: Path) -> dict[str, Any]:
        """The replicated part of a checkpoint: commit_id, world, specs, items (skeletons), attrs, step.

        Loaded with torch.load(weights_only=True): plain values, ray_elastic's own dataclasses, and the
        types the driver allowed (see `ray_elastic.checkpoint`).
        """
        return load_weights_only(read_bytes(path / REST_FILE), path, (*self.safe_globals, *SAFE_TYPES))

    def load(self, path: Path, rest: dict[str, Any], world: int, rank: int) -> list[torch.Tensor]:
        """Read `path`'s shards resharded to this world: this rank's local shards. A collective (dcp.load)."""
        specs: list[LeafSpec] = rest["specs"]
        mesh = io_mesh(world, rank)
        targets = {
            spec.key: DTensor.from_local(torch.empty(local_shape(spec, world, rank), dtype=spec.dtype),
                                         mesh, [Shard(spec.dim)], run_check=False, shape=torch.Size(spec.shape),
                                         stride=_contiguous_stride(spec.shape))
            for spec in specs
        }
        dcp.load(targets, checkpoint_id=str(path), no_dist=not (dist.is_initialized() and dist.get_world_size() > 1))
        return [targets[spec.key].to_local() for spec in specs]


def _torch_bytes(value: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _write_synced(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open_new(tmp) as file:  # owner-only, never through a link
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)

