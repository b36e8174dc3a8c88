"""Elastic data loading: ElasticSampler + State + LR re-scaling, while a node dies and another joins.

    python examples/elastic_sampler.py

Starts a simulated 3-node cluster on this machine (`ray_elastic.testing.local_cluster`)
and trains a small regression for a few epochs on 2 to 3 nodes. Mid-run one node is
killed (the survivors re-form without restarting) and a new node is added (it joins at
the next commit). Throughout:

- `ElasticSampler` is part of the committed `State`, so after each change the rest of
  the epoch is re-split across the new world: no committed sample is seen twice and
  none is skipped;
- the learning rate follows the linear scaling rule `base_lr * world_size`, re-applied
  by a reset callback after every change of world size (the restored optimizer state
  carries the old world's LR).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from typing import Any

import torch

import ray_elastic
from ray_elastic.testing import local_cluster

BATCH_SIZE = 16  # per rank and step


def make_dataset(num_samples: int) -> torch.utils.data.TensorDataset:
    """The same synthetic regression data on every rank."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num_samples, 16, generator=generator)
    y = x @ torch.linspace(-1, 1, 16).unsqueeze(1) + 0.05 * torch.randn(num_samples, 1, generator=generator)
    return torch.utils.data.TensorDataset(x, y)


def train_fn(config: dict[str, Any]) -> dict[str, Any]:
    ctx = ray_elastic.get_context()
    dataset = make_dataset(config["num_samples"])
    sampler = ray_elastic.ElasticSampler(len(dataset), shuffle=True, seed=0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=config["base_lr"] * ctx.world_size)
    state = ray_elastic.State(model=model, optimizer=opt, sampler=sampler, epoch=0, step=0, samples=0)

    def rescale_lr(new: ray_elastic.TrainContext) -> None:
        for group in opt.param_groups:
            group["lr"] = config["base_lr"] * new.world_size

    state.register_reset_callback(rescale_lr)  # runs now if the world changed since the last commit
    loss = torch.zeros(())
    while state.epoch < config["epochs"]:
        sampler.set_epoch(state.epoch)
        # Every rank must take the same number of steps: shards of the rest of the epoch
        # can differ by one sample, so count whole global batches.
        steps_left = (len(dataset) - sampler.consumed) // (BATCH_SIZE * ctx.world_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler)
        for _, (x, y) in zip(range(steps_left), loader):
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sampler.record_batch(BATCH_SIZE)
            state.step += 1
            state.samples += BATCH_SIZE * ctx.world_size
            state.commit()
            ray_elastic.report({"epoch": state.epoch, "step": state.step, "loss": loss.item(),
                                "lr": opt.param_groups[0]["lr"], "samples": state.samples})
            time.sleep(config["step_sleep_s"])
        state.epoch += 1
        state.commit()
    return {"rank": ctx.rank, "world_size": ctx.world_size, "loss": loss.item(), "samples": state.samples}


def wait_for_event(path: str, kind: str, done: threading.Event, after_round: int = -1,
                   timeout_s: float = 180, **data: Any) -> dict[str, Any]:
    """Block until the run's JSON-lines event log holds a `kind` event after `after_round` matching `data`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not done.is_set():
        with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as lines:
            for line in lines:
                event = json.loads(line) if line.endswith("\n") else {}
                if event.get("kind") == kind and event["round_id"] > after_round and all(
                    event["data"].get(k) == v for k, v in data.items()
                ):
                    return event
        time.sleep(0.2)
    raise RuntimeError(f"no {kind!r} event with {data} (the run ended, or {timeout_s}s passed)")


def main() -> None:
    config = {"num_samples": 1536, "epochs": 4, "base_lr": 0.02, "step_sleep_s": 0.1}
    events_path = os.path.join(tempfile.mkdtemp(prefix="ray_elastic_"), "events.jsonl")
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def train() -> None:
        try:
            outcome["result"] = ray_elastic.run(
                train_fn, config=config, min_nodes=2, max_nodes=3, max_restarts=2, event_log_path=events_path
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread
            outcome["error"] = exc
        finally:
            done.set()

    with local_cluster(num_nodes=3) as cluster:
        runner = threading.Thread(target=train)
        runner.start()
        try:
            full = wait_for_event(events_path, "round_formed", done, world_size=3)
            time.sleep(2)
            cluster.kill_node(cluster.nodes[-1], graceful=False)
            # A replacement node at once: the survivors re-form without the lost one within a second. The new
            # node's worker starts once they have committed (seconds to start), then joins at a commit.
            cluster.add_node()
            shrunk = wait_for_event(events_path, "round_formed", done, after_round=full["round_id"], cause="restart")
            grown = wait_for_event(events_path, "round_formed", done, after_round=shrunk["round_id"], cause="scale-up")
        finally:
            runner.join()
    os.remove(events_path)
    os.rmdir(os.path.dirname(events_path))
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]

    history = result.metrics_history
    wrong_lr = [m for m in history if abs(m["lr"] - config["base_lr"] * m["world_size"]) > 1e-12]
    assert not wrong_lr, f"LR not re-scaled to base_lr * world_size: {wrong_lr[:3]}"
    steps = [m["step"] for m in history]
    assert steps == sorted(set(steps)), "rank 0 reported each committed step once, in order"
    print(f"rounds: {[(r.round_id, r.world_size, r.cause) for r in result.rounds]}")
    print(f"after the node loss: world size {shrunk['data']['world_size']}; "
          f"after the node joined: world size {grown['data']['world_size']}")
    print(f"restarts spent: {result.restarts}; lr by world size: "
          f"{sorted({(m['world_size'], m['lr']) for m in history})}")
    print(f"trained {result.metrics['epoch'] + 1} epochs, {result.metrics['step']} steps, "
          f"{result.metrics['samples']} samples; final loss {result.metrics['loss']:.4f}")


if __name__ == "__main__":
    main()
