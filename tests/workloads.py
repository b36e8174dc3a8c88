"""Training functions shared by the cluster tests (pickled by value into workers)."""

from __future__ import annotations

import os
import time

import torch

import ray_elastic
from ray_elastic.testing.faults import SlowToSave

ENV_KEYS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
)


def weights_digest(module: torch.nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in module.parameters()]


def state_digest(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    """Sums of every tensor of the model's and optimizer's state_dicts, in a fixed order."""
    out = [float(t.double().sum()) for t in model.state_dict().values()]
    for _, per_param in sorted(opt.state_dict()["state"].items()):
        out += [float(v.double().sum()) for _, v in sorted(per_param.items()) if torch.is_tensor(v)]
    return out


def payload_digest(payload: dict) -> list[float]:
    """`state_digest`, computed from a stored snapshot payload instead of live objects."""
    out = [float(t.double().sum()) for t in payload["items"]["model"].values()]
    for _, per_param in sorted(payload["items"]["optimizer"]["state"].items()):
        out += [float(v.double().sum()) for _, v in sorted(per_param.items()) if torch.is_tensor(v)]
    return out


_restores: list[tuple[int, str, list[float]]] = []  # per process, across re-entries: (round, source, digest)
_kept: dict[str, torch.nn.Module] = {}  # config["keep_model"]: the module this process built once


def _trace_commit(trace_dir: str, step: int, round_id: int) -> None:
    """Rank 0 appends `step wall_time pid round_id master_port` to `<trace_dir>/steps.log` per committed step.

    Unlike the committed log in State, this file is not exactly-once: a step
    completed, lost and redone shows twice, which is what it is for.
    """
    line = f"{step} {time.time():.6f} {os.getpid()} {round_id} {os.environ.get('MASTER_PORT', '-')}\n"
    with open(os.path.join(trace_dir, "steps.log"), "a", encoding="utf-8") as out:
        out.write(line)


def _log_commit(trace_dir: str, step: int, round_id: int) -> None:
    """Every rank appends `step round_id` to `<trace_dir>/commits-<pid>.log` per commit it took.

    Outside the State on purpose: a commit lost and restored from an older one shows as a step
    this process committed twice, where the State's own log would be restored along with it.
    """
    with open(os.path.join(trace_dir, f"commits-{os.getpid()}.log"), "a", encoding="utf-8") as out:
        out.write(f"{step} {round_id}\n")


def _step_limit(steps: int, trace_dir: str | None) -> int:
    """`steps`, lowered by a `<trace_dir>/stop_at` file (written by a harness well ahead of every rank)."""
    if not trace_dir:
        return steps
    try:
        with open(os.path.join(trace_dir, "stop_at"), encoding="utf-8") as handle:
            return min(steps, int(handle.read().strip()))
    except (OSError, ValueError):
        return steps


def stuck_in_user_code(seconds: float) -> None:
    """A rank stuck outside any collective (a hang the watchdog must explain by this name)."""
    time.sleep(seconds)


def hold_the_gil(seconds: float) -> None:
    """One C call that never lets the GIL go (`sum` over a range), sized to last about `seconds`."""
    started = time.perf_counter()
    sum(range(1_000_000))
    per_item = max(time.perf_counter() - started, 1e-9) / 1_000_000
    sum(range(int(seconds / per_item)))


def python_busy_loop(seconds: float) -> None:
    """A pure-Python loop: it holds the GIL, but gives it up every switch interval."""
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


_HOOKS = {"stuck": stuck_in_user_code, "gil_call": hold_the_gil, "python_loop": python_busy_loop}


def _run_hooks(config: dict, ctx, step: int) -> None:
    """`config["hooks"]`: [{"kind", "rank", "step", "seconds", "restart_count" (0)}], run before that step;
    each run appends `kind rank step start end pid` to `<trace_dir>/hooks.log`."""
    for hook in config.get("hooks", ()):
        if (hook["rank"], hook["step"], hook.get("restart_count", 0)) != (ctx.rank, step, ctx.restart_count):
            continue
        started = time.time()
        _HOOKS[hook["kind"]](hook["seconds"])
        if config.get("trace_dir"):
            with open(os.path.join(config["trace_dir"], "hooks.log"), "a", encoding="utf-8") as out:
                out.write(f"{hook['kind']} {ctx.rank} {step} {started:.6f} {time.time():.6f} {os.getpid()}\n")


def _wait_at_gate(gate: dict | None, ctx) -> None:
    if gate is None or (gate["rank"], gate["restart_count"]) != (ctx.rank, ctx.restart_count):
        return
    while os.path.exists(gate["path"]):
        time.sleep(0.05)


def ddp_train(config: dict) -> dict:
    """A small float64 DDP model; logs every committed step in the state itself.

    config: steps, sleep_s (per step), faults (FaultInjector or None, checked before the step),
    faults_after_step (checked between opt.step() and commit(), with the step being taken),
    faults_at_end (checked after the loop, before returning, with the last step), width,
    first_attempt_env (variables set in the worker while restart_count is 0, removed
    after: a crash hook that must fire once), trace_dir (see `_trace_commit` and
    `_log_commit`; a `stop_at` file there lowers `steps`, see `_step_limit`),
    keep_model (build the module once per process and wrap it in DDP again on every entry),
    commit_every (commit only every N steps; default 1), hooks (busy or stuck
    ranks, see `_run_hooks`), slow_checkpoint_s (each durable write takes that long),
    gate ({"path", "rank", "restart_count"}: that rank, in rounds of that restart count,
    waits before each step while the file `path` exists).
    """
    ctx = ray_elastic.get_context()
    for key, value in config.get("first_attempt_env", {}).items():
        if ctx.restart_count == 0:
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    torch.manual_seed(1234 + ctx.rank)  # different on purpose: State must make them equal
    width = config.get("width", 8)
    if config.get("keep_model") and "net" in _kept:
        net = _kept["net"]
    else:
        net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(),
                                  torch.nn.Linear(width, 1)).double()
        if config.get("keep_model"):
            _kept["net"] = net
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    extra = {"ballast": SlowToSave(config["slow_checkpoint_s"])} if config.get("slow_checkpoint_s") else {}
    state = ray_elastic.State(model=model, optimizer=opt, step=0, log=[], worlds=[], **extra)
    _restores.append((ctx.round_id, state.restored_from, state_digest(model, opt)))
    resets: list[int] = []
    state.register_reset_callback(lambda c: resets.append(c.world_size))
    faults = config.get("faults")
    after_step = config.get("faults_after_step")  # fire between opt.step() and commit()
    generator = torch.Generator().manual_seed(ctx.rank)
    loss = torch.tensor(0.0)
    trace_dir = config.get("trace_dir")
    while state.step < _step_limit(config["steps"], trace_dir):
        if faults is not None:
            faults.check(state.step)
        _run_hooks(config, ctx, state.step)
        _wait_at_gate(config.get("gate"), ctx)
        x = torch.randn(16, width, dtype=torch.float64, generator=generator)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step.check(state.step + 1)
        state.step += 1
        state.log.append(state.step)
        state.worlds.append(ctx.world_size)
        committed = state.commit_id
        try:
            if state.step % config.get("commit_every", 1) == 0:
                state.commit()
        finally:  # a commit that raises MembershipChange did take its snapshot
            if trace_dir and state.commit_id != committed:
                _log_commit(trace_dir, state.step, ctx.round_id)
                if ctx.rank == 0:
                    _trace_commit(trace_dir, state.step, ctx.round_id)
        ray_elastic.report({"step": state.step, "loss": loss.item(), "world_size": ctx.world_size})
        if config.get("sleep_s"):
            time.sleep(config["sleep_s"])
    if config.get("faults_at_end") is not None:
        config["faults_at_end"].check(state.step)
    return {
        "rank": ctx.rank,
        "context": {k: getattr(ctx, k) for k in (
            "rank", "local_rank", "world_size", "local_world_size", "node_rank", "num_nodes",
            "restart_count", "round_id")},
        "env": {k: os.environ.get(k) for k in ENV_KEYS},
        "log": list(state.log),
        "worlds": list(state.worlds),
        "weights": weights_digest(net),
        "restored_from": state.restored_from,
        "resets": resets,
        "pid": os.getpid(),
        "restores": list(_restores),
    }
