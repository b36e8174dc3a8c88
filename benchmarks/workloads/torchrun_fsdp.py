"""The FSDP2 benchmark workload as a torchrun script, with a synchronous DCP checkpoint every step.

    torchrun --standalone --nproc-per-node=4 --max-restarts=3 torchrun_fsdp.py \
        --log-dir DIR --checkpoint-dir DIR/ckpt --width 1581

Every rank writes its shards of step N to `<checkpoint-dir>/step-N` (`dcp.save`), then rank 0
points `<checkpoint-dir>/latest` at it and removes the one before; on (re)start every rank
loads `latest`: what a torchrun user does to survive its restarts with sharded state.
Without `--checkpoint-dir` it only trains (the overhead baseline).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import shutil
import signal
import time
from pathlib import Path

import torch.distributed as dist
from fsdp_loops import DEFAULTS, batch, build, dcp_load, dcp_save, latest_checkpoint, train_step
from loops import StepLog, leave_group, wait_for_turn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--width", type=int, default=DEFAULTS["width"])
    parser.add_argument("--depth", type=int, default=DEFAULTS["depth"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--replicate", type=int, default=DEFAULTS["replicate"], help="HSDP replica groups")
    parser.add_argument("--sleep-s", type=float, default=DEFAULTS["sleep_s"])
    parser.add_argument("--turn-file", default=None)
    parser.add_argument("--system", default="torchrun")
    parser.add_argument("--fresh-store", action="store_true",
                        help="form the group on a new TCPStore per restart (MASTER_PORT + 1 + restart count), "
                             "working around torchrun 2.13 handing out a dead rank's old gloo address")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    if args.fresh_store:
        import datetime

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        port = int(os.environ["MASTER_PORT"]) + 1 + int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        store = dist.TCPStore(os.environ["MASTER_ADDR"], port, world, is_master=rank == 0,
                              timeout=datetime.timedelta(seconds=120))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = {"width": args.width, "batch": args.batch}
    root = args.checkpoint_dir
    latest = latest_checkpoint(root) if root else None
    model, opt = build(args.width, args.depth, replicate=args.replicate, init=latest is None)
    x = batch(cfg, rank)
    step = 0
    if latest is not None:
        step = dcp_load(model, opt, latest)
    log = StepLog(args.log_dir, rank, world, f"t{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    log.enter(step)
    while step < log.stop_at(args.steps):
        if not wait_for_turn(args.turn_file, args.system, step + 1):
            break
        train_step(model, opt, x)
        step += 1
        started = time.perf_counter()
        if root:
            dcp_save(model, opt, step, str(Path(root) / f"step-{step}"))
            if rank == 0:  # the checkpoint is complete once dcp.save returned: point at it, drop the one before last
                (Path(root) / "latest.tmp").write_text(f"step-{step}")
                os.replace(Path(root) / "latest.tmp", Path(root) / "latest")
                shutil.rmtree(Path(root) / f"step-{step - 2}", ignore_errors=True)
        log.step(step, (time.perf_counter() - started) * 1e3)
        if args.sleep_s:
            time.sleep(args.sleep_s)
    leave_group()


if __name__ == "__main__":
    main()
