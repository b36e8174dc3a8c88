"""Sharded (FSDP2) training state: snapshots of local shards, replicas on other nodes, M -> N resharding.

- `layout`: pure functions (chunks, replica placement, the restore choice, the reshard plan);
- `capture`: the State's items as DCP state dicts, split into a skeleton and local shards;
- `store`: this process's generations (own shards, replicas) and the commit protocol;
- `comm`: the collectives on host buffers; `restore`: rebuilding a commit in a new world;
- `durable`: sharded `torch.distributed.checkpoint` files written in the background;
- `glue`: what `State` calls.
"""
