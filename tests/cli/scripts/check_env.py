"""A torchrun user script for the launcher tests: checks torchrun's environment, then touches DIR/<RANK>.

    check_env.py --touch-file-dir DIR [--init-method URL] [--role NAME] [--fail]

--init-method forms a gloo group with that URL ("{MASTER_ADDR}" and "{MASTER_PORT}"
are filled in) and checks an all-reduce over the whole world; --fail makes rank 1
raise under torch's @record (so it writes TORCHELASTIC_ERROR_FILE).
"""

import argparse
import os
import sys

REQUIRED = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS", "LAUNCHER_TEST_SENTINEL",
)


def check_env(role: str) -> None:
    env = os.environ
    missing = [key for key in REQUIRED if key not in env]
    if missing:
        sys.exit(f"missing torchrun variables: {missing}")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local, local_world = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
    group, groups = int(env["GROUP_RANK"]), int(env["GROUP_WORLD_SIZE"])
    problems = [
        what for what, ok in (
            ("0 <= RANK < WORLD_SIZE", 0 <= rank < world),
            ("0 <= LOCAL_RANK < LOCAL_WORLD_SIZE", 0 <= local < local_world),
            ("WORLD_SIZE == LOCAL_WORLD_SIZE * GROUP_WORLD_SIZE", world == local_world * groups),
            ("RANK == GROUP_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK", rank == group * local_world + local),
            ("ROLE_RANK == RANK", env["ROLE_RANK"] == env["RANK"]),
            ("ROLE_WORLD_SIZE == WORLD_SIZE", env["ROLE_WORLD_SIZE"] == env["WORLD_SIZE"]),
            (f"ROLE_NAME == {role}", env["ROLE_NAME"] == role),
            ("MASTER_PORT is a port", 0 < int(env["MASTER_PORT"]) < 65536),
            ("TORCHELASTIC_RESTART_COUNT >= 0", int(env["TORCHELASTIC_RESTART_COUNT"]) >= 0),
            ("TORCHELASTIC_MAX_RESTARTS >= 0", int(env["TORCHELASTIC_MAX_RESTARTS"]) >= 0),
            ("TORCHELASTIC_USE_AGENT_STORE is a bool", env["TORCHELASTIC_USE_AGENT_STORE"] in ("True", "False")),
        ) if not ok
    ]
    if problems:
        sys.exit(f"rank {rank}: torchrun environment is wrong: {problems}")


def all_reduce(init_method: str) -> None:
    import torch
    import torch.distributed as dist

    url = init_method.format(MASTER_ADDR=os.environ["MASTER_ADDR"], MASTER_PORT=os.environ["MASTER_PORT"])
    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method=url, rank=int(os.environ["RANK"]), world_size=world)
    total = torch.ones(1)
    dist.all_reduce(total)
    if int(total.item()) != world:
        sys.exit(f"all_reduce over {url} gave {total.item()}, expected {world}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--touch-file-dir", "--touch_file_dir")
    parser.add_argument("--init-method")
    parser.add_argument("--role", default="default")
    parser.add_argument("--fail", action="store_true")
    args = parser.parse_args()
    check_env(args.role)
    if args.init_method:
        all_reduce(args.init_method)
    print(f"rank {os.environ['RANK']} checked", flush=True)
    if args.fail and os.environ["RANK"] == "1":
        raise RuntimeError("rank 1 fails on purpose (--fail)")
    if args.touch_file_dir:
        open(os.path.join(args.touch_file_dir, os.environ["RANK"]), "w").close()


if __name__ == "__main__":
    if "--fail" in sys.argv:
        from torch.distributed.elastic.multiprocessing.errors import record

        main = record(main)
    main()
