"""snapshot="live" without Ray: what is held by reference, when it stops counting, and the loop-shape checks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ray_elastic import ConfigError, SnapshotLostError
from ray_elastic.context import Session, set_session
from ray_elastic.snapshot import SnapshotHolder
from ray_elastic.state import State
from tests.unit.test_state import _context

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def live():
    snapshots = SnapshotHolder("live")
    set_session(Session(_context(), snapshots))
    yield snapshots
    set_session(None)


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def _forward_backward(model):
    model(torch.randn(8, 4)).pow(2).mean().backward()  # also moves BatchNorm's running stats


def _step(model, opt):
    opt.zero_grad()
    _forward_backward(model)
    opt.step()


def _clone_state(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {i: s["momentum_buffer"].clone() for i, s in opt.state_dict()["state"].items()})


def _assert_state(model, opt, expected):
    weights, momentum = expected
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    for i, per_param in opt.state_dict()["state"].items():
        assert torch.equal(per_param["momentum_buffer"], momentum[i])


def _trained_and_committed():
    """A model and optimizer after one step, committed as step 1; returns (model, opt, state)."""
    model, opt = _model_and_opt()
    state = State(model=model, optimizer=opt, step=0)
    _step(model, opt)
    state.step = 1
    state.commit()
    return model, opt, state


def test_optimizer_tensors_are_held_by_reference_the_rest_is_copied(live):
    model, opt, _ = _trained_and_committed()
    held = live.items["model"]
    assert held["0.weight"].data_ptr() == model[0].weight.data_ptr(), "parameters are not copied"
    momentum = live.items["optimizer"]["state"][0]["momentum_buffer"]
    assert momentum.data_ptr() == opt.state[model[0].weight]["momentum_buffer"].data_ptr()
    assert held["1.running_mean"].data_ptr() != model[1].running_mean.data_ptr(), "buffers are copied"
    assert live.held_commit_id() == 0


def test_failure_before_the_next_step_restores_the_commit(live):
    model, opt, _ = _trained_and_committed()
    committed = _clone_state(model, opt)
    _forward_backward(model)  # the next step fails in its backward all-reduce, before opt.step()

    model2, opt2 = _model_and_opt()  # what train_fn builds on re-entry
    restored = State(model=model2, optimizer=opt2, step=0)
    assert restored.restored_from == "memory" and restored.step == 1
    _assert_state(model2, opt2, committed)
    _step(model2, opt2)  # training the new objects leaves the snapshot (the old tensors) alone
    assert live.held_commit_id() == 0


def test_a_step_after_the_commit_loses_it_loudly_instead_of_restoring_wrong_state(live):
    model, opt, _ = _trained_and_committed()
    _step(model, opt)  # then train_fn raises before commit() (on every rank)
    assert live.held_commit_id() == -1
    with pytest.raises(SnapshotLostError, match="commit 0 \\(step 1\\) is lost"):
        State(model=_model_and_opt()[0], optimizer=_model_and_opt()[1], step=0)


def test_an_in_place_write_outside_the_optimizer_is_noticed(live):
    model, opt = _model_and_opt()
    state = State(model=model, optimizer=opt)
    _step(model, opt)
    state.commit()
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    assert live.held_commit_id() == -1


def test_next_commit_reuses_its_copies_and_never_writes_into_live_tensors(live):
    model, opt = _model_and_opt()
    state = State(model=model, optimizer=opt)
    _step(model, opt)
    state.commit()
    running_mean = live.items["model"]["1.running_mean"]
    weight_before = model[0].weight.detach().clone()
    _step(model, opt)
    weight_after = model[0].weight.detach().clone()
    state.commit()
    assert live.items["model"]["1.running_mean"] is running_mean, "copied buffers are reused"
    assert torch.equal(model[0].weight.detach(), weight_after) and not torch.equal(weight_after, weight_before)
    assert live.held_commit_id() == 1


def test_objects_kept_across_rounds_still_hold_the_commit_after_restore(live):
    model, opt = _model_and_opt()  # a train_fn that keeps model and optimizer in globals
    state = State(model=model, optimizer=opt, step=0)
    _step(model, opt)
    state.commit()
    committed = _clone_state(model, opt)
    again = State(model=model, optimizer=opt, step=0)  # re-entry: loads the commit into the same objects
    assert again.restored_from == "memory" and live.held_commit_id() == 0
    _assert_state(model, opt, committed)
    _step(model, opt)
    assert live.held_commit_id() == -1, "stepping the same objects moves the live tensors on"


def test_two_steps_between_commits_are_rejected(live):
    model, opt = _model_and_opt()
    State(model=model, optimizer=opt)
    _step(model, opt)
    with pytest.raises(ConfigError, match="stepped twice since the last commit"):
        _step(model, opt)


def test_copy_mode_allows_any_loop_shape():
    snapshots = SnapshotHolder("copy")
    set_session(Session(_context(), snapshots))
    try:
        model, opt = _model_and_opt()
        state = State(model=model, optimizer=opt)
        _step(model, opt)
        _step(model, opt)
        state.commit()
        assert snapshots.items["model"]["0.weight"].data_ptr() != model[0].weight.data_ptr()
    finally:
        set_session(None)


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_collective_between_step_and_commit_is_rejected(live, one_rank_group):
    model, opt = _model_and_opt()
    state = State(model=model, optimizer=opt)
    dist.all_reduce(torch.ones(1))  # before the step (a DDP backward): fine
    _step(model, opt)
    state.commit()
    _step(model, opt)
    dist.all_reduce(torch.ones(1))  # e.g. averaging the loss for a log line
    with pytest.raises(ConfigError, match="no collective"):
        state.commit()


def test_bad_snapshot_mode_is_rejected():
    with pytest.raises(ConfigError, match="snapshot must be"):
        SnapshotHolder("lazy")


def test_a_write_through_data_after_the_commit_is_not_restored_as_the_commit(live):
    """`.data` aliases have their own version counter (issue 18.1); a checksum of the parameters taken at
    the commit sees the write, so the only process holding commit 0 says it is lost instead of restoring it."""
    model, opt, _ = _trained_and_committed()
    model[0].weight.data.mul_(2.0)  # no version bump on model[0].weight
    assert model[0].weight._version == live._live[0][1]
    with pytest.raises(SnapshotLostError, match="commit 0 \\(step 1\\) is lost"):
        State(model=_model_and_opt()[0], optimizer=_model_and_opt()[1], step=0)


def test_a_kept_module_wrapped_in_ddp_again_still_restores_its_commit(live, one_rank_group):
    """A module built once per process and wrapped in DDP on every entry: DDP's constructor broadcast
    writes into the kept parameters (issue 18.1). The round's end keeps the commit apart from them."""
    net, _ = _model_and_opt()
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = State(model=model, optimizer=opt, step=0)
    _step(model, opt)
    state.step = 1
    state.commit()
    committed = _clone_state(model, opt)
    _forward_backward(model)  # the next step fails in its backward all-reduce
    live.end_round()  # the worker, once train_fn left the round
    with torch.no_grad():
        net[0].weight.add_(1.0)  # e.g. a rank 0 that is a newcomer broadcasting its fresh weights
    model = torch.nn.parallel.DistributedDataParallel(net)  # re-entry: the same net, wrapped again
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    again = State(model=model, optimizer=opt, step=0)
    assert again.restored_from == "memory" and again.step == 1
    _assert_state(model, opt, committed)
