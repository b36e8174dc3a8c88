"""The benchmark workload as a torchrun script: plain DDP, optional per-step checkpoint file.

    torchrun --standalone --nproc-per-node=3 --max-restarts=3 torchrun_train.py \
        --log-dir DIR --checkpoint DIR/ckpt.pt

With `--checkpoint`, rank 0 saves model, optimizer and step after every step
(write to a temporary file, then rename) and every rank reloads it on (re)start:
what a torchrun user has to do to survive its restarts.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import time

import torch
import torch.distributed as dist
from loops import DEFAULTS, StepLog, leave_group, make_mlp, train_step, wait_for_turn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (default: none)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--width", type=int, default=DEFAULTS["width"])
    parser.add_argument("--depth", type=int, default=DEFAULTS["depth"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--sleep-s", type=float, default=DEFAULTS["sleep_s"])
    parser.add_argument("--turn-file", default=None, help="take turns with other systems (see loops.wait_for_turn)")
    parser.add_argument("--system", default="torchrun", help="this system's name in --turn-file")
    args = parser.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints where a worker hangs

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = make_mlp(args.width, args.depth)
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank))
    step = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        saved = torch.load(args.checkpoint, weights_only=False)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step = saved["step"]
    log = StepLog(args.log_dir, rank, world, f"t{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    log.enter(step)
    while step < log.stop_at(args.steps):
        if not wait_for_turn(args.turn_file, args.system, step + 1):
            break
        train_step(model, opt, x)
        step += 1
        started = time.perf_counter()
        if args.checkpoint and rank == 0:
            partial = f"{args.checkpoint}.tmp"
            torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step}, partial)
            os.replace(partial, args.checkpoint)
        log.step(step, (time.perf_counter() - started) * 1e3)
        if args.sleep_s:
            time.sleep(args.sleep_s)
    leave_group()


if __name__ == "__main__":
    main()
