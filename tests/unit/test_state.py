"""State without Ray: commits, restores, and the snapshot's independence from live tensors."""

from __future__ import annotations

import pytest
import torch

from ray_elastic.context import Session, TrainContext, set_session
from ray_elastic.snapshot import SnapshotHolder, _copy_into
from ray_elastic.state import MembershipChange, State

pytestmark = pytest.mark.timeout(30)


def _context(world_size: int = 1, round_id: int = 0) -> TrainContext:
    return TrainContext(rank=0, local_rank=0, world_size=world_size, local_world_size=1, node_rank=0,
                        num_nodes=1, restart_count=0, round_id=round_id, run_id="t", node_id="n",
                        device=torch.device("cpu"))


@pytest.fixture
def holder():
    snapshots = SnapshotHolder()
    set_session(Session(_context(), snapshots))
    yield snapshots
    set_session(None)


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def _train_step(model, opt):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_fresh_state_has_no_commit_and_keeps_attributes(holder):
    model, opt = _model_and_opt()
    state = State(model=model, optimizer=opt, step=0, epoch=3)
    assert state.restored_from == "fresh" and state.commit_id == -1
    assert state.step == 0 and state.epoch == 3 and state.model is model
    with pytest.raises(AttributeError):
        state.model = torch.nn.Linear(1, 1)


def test_reentry_restores_the_last_commit_not_later_changes(holder):
    model, opt = _model_and_opt()
    state = State(model=model, optimizer=opt, step=0)
    _train_step(model, opt)
    state.step = 1
    state.commit()
    committed = {k: v.clone() for k, v in model.state_dict().items()}
    committed_momentum = opt.state_dict()["state"][0]["momentum_buffer"].clone()
    _train_step(model, opt)  # uncommitted work, lost on failure
    state.step = 2

    model2, opt2 = _model_and_opt()  # what train_fn builds on re-entry
    restored = State(model=model2, optimizer=opt2, step=0)
    assert restored.restored_from == "memory" and restored.step == 1 and restored.commit_id == 0
    for key, value in model2.state_dict().items():
        assert torch.equal(value, committed[key])
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], committed_momentum)


def test_training_after_restore_does_not_change_the_snapshot(holder):
    model, opt = _model_and_opt()
    state = State(model=model, optimizer=opt, step=0)
    _train_step(model, opt)
    state.commit()
    snapshot_momentum = holder.items["optimizer"]["state"][0]["momentum_buffer"].clone()
    model2, opt2 = _model_and_opt()
    State(model=model2, optimizer=opt2, step=0)
    _train_step(model2, opt2)  # optimizers mutate their state in place
    assert torch.equal(holder.items["optimizer"]["state"][0]["momentum_buffer"], snapshot_momentum)


def test_commit_reuses_snapshot_buffers(holder):
    model, opt = _model_and_opt()
    state = State(model=model, optimizer=opt)
    state.commit()
    first = holder.items["model"]["weight"]
    _train_step(model, opt)
    state.commit()
    assert holder.items["model"]["weight"] is first, "same buffer, copied into"
    assert torch.equal(first, model.weight.detach())
    assert first.data_ptr() != model.weight.data_ptr()


def test_copy_into_handles_nested_trees_and_shape_changes():
    src = {"a": [torch.ones(2), (torch.zeros(3), 5)], "b": "x"}
    out = _copy_into(None, src)
    assert torch.equal(out["a"][0], src["a"][0]) and out["a"][0] is not src["a"][0]
    assert out["a"][1][1] == 5 and isinstance(out["a"][1], tuple) and out["b"] == "x"
    grown = _copy_into(out, {"a": [torch.ones(4), (torch.zeros(3), 6)], "b": "y"})
    assert grown["a"][0].shape == (4,) and grown["a"][1][1] == 6


def test_pending_membership_change_raises_after_snapshot():
    snapshots = SnapshotHolder()
    stop = {"flag": False}
    set_session(Session(_context(), snapshots, on_stop_check=lambda: stop["flag"]))
    try:
        model, opt = _model_and_opt()
        state = State(model=model, optimizer=opt, step=0)
        state.step = 1
        state.commit()
        stop["flag"] = True
        state.step = 2
        with pytest.raises(MembershipChange):
            state.commit()
        assert snapshots.attrs["step"] == 2 and snapshots.commit_id == 1, "the commit counted before leaving"
    finally:
        set_session(None)


def test_reset_callback_runs_when_world_changed():
    snapshots = SnapshotHolder()
    set_session(Session(_context(world_size=1), snapshots))
    model, opt = _model_and_opt()
    state = State(model=model, optimizer=opt)
    state.commit()
    seen = []
    state.register_reset_callback(lambda ctx: seen.append(ctx.world_size))
    assert seen == [], "same world: nothing to reset"
    snapshots.world_size = 4  # the last commit was taken in a world of 4
    set_session(Session(_context(world_size=1), snapshots))
    state2 = State(model=model, optimizer=opt)
    state2.register_reset_callback(lambda ctx: seen.append(ctx.world_size))
    assert seen == [1] and state2.world_changed
    set_session(None)


def test_state_outside_a_run_says_so():
    with pytest.raises(RuntimeError, match="only work inside a train_fn"):
        State(step=0)


def test_an_interrupt_handler_added_late_still_hears_the_request():
    """A stop or abort can come while train_fn is still setting up, before it adds its handler (the CLI's script
    runner): the handler hears it at once instead of never."""
    stop = {"flag": False}
    session = Session(_context(), SnapshotHolder(), on_stop_check=lambda: stop["flag"])
    heard: list[str] = []
    session.add_interrupt_handler(heard.append)
    assert heard == [], "nothing asked yet"
    stop["flag"] = True  # asked to stop before the session could pass it on (the round was still forming)
    session.add_interrupt_handler(heard.append)
    assert heard == ["stop"]
    session.interrupt("abort")
    session.interrupt("stop")  # an abort is not downgraded by a later stop
    session.add_interrupt_handler(heard.append)
    assert heard == ["stop", "abort", "abort", "stop", "stop", "abort"]
