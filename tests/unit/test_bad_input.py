"""Bad input is rejected before Ray or any actor starts, with a message that says what to change."""

from __future__ import annotations

import threading

import pytest

import ray_elastic
from ray_elastic.errors import ConfigError

pytestmark = pytest.mark.timeout(30)


def _noop(config):
    return None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_nodes": 0}, "min_nodes must be >= 1"),
        ({"min_nodes": 3, "max_nodes": 2}, "raise max_nodes or lower min_nodes"),
        ({"min_nodes": 2.0}, "min_nodes must be an int"),
        ({"min_nodes": True}, "min_nodes must be an int"),
        ({"nproc_per_node": 0}, "nproc_per_node must be >= 1"),
        ({"nproc_per_node": "4"}, "nproc_per_node must be an int"),
        ({"max_restarts": -2}, "or -1 for unlimited"),
        ({"max_restarts": False}, "max_restarts must be an int"),
        ({"wait_for_nodes_timeout_s": -1}, "wait_for_nodes_timeout_s must be a finite number"),
        ({"abort_timeout_s": float("inf")}, "abort_timeout_s must be a finite number"),
        ({"hang_timeout_s": -5}, "hang_timeout_s must be a finite number"),
        ({"replacement_wait_s": -1}, "replacement_wait_s must be a finite number"),
        ({"collective_timeout_s": 0}, "collective_timeout_s must be > 0"),
        ({"probe_timeout_s": 0}, "probe_timeout_s must be > 0"),
        ({"hang_timeout_s": 0}, "hang_timeout_s must be > 0"),
        ({"probe_timeout_s": 0.5}, "must be at least twice heartbeat_interval_s"),
        ({"use_gpu": "yes"}, "use_gpu must be True or False"),
        ({"backend": "mpi"}, "backend must be 'gloo', 'nccl'"),
        ({"use_gpu": True, "resources_per_worker": {"GPU": 0.5}}, "which NCCL cannot run; set backend='gloo'"),
        ({"resources_per_worker": {"CPU": -1}}, "resources_per_worker['CPU'] must be >= 0"),
        ({"resources_per_worker": ["CPU"]}, "resources_per_worker must be a dict"),
        ({"resume": True}, "resume=True needs storage_path"),
        ({"progress": "fancy"}, "progress must be"),
        ({"warmup_modules": "torch._dynamo"}, "warmup_modules must be a list of module names"),
        ({"warmup_modules": ["torch._no_such_module"]}, "cannot be imported here: ['torch._no_such_module']"),
        ({"snapshot": "lazy"}, "snapshot must be 'auto'"),
    ],
)
def test_bad_arguments_are_rejected_with_what_to_change(kwargs, message, ray_disconnected):
    import ray

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ray_elastic.run(_noop, **kwargs)
    assert not ray.is_initialized(), "rejected before Ray started"


@pytest.mark.parametrize("value", ["auto", "0", "-2", "1.5"])
def test_a_bad_omp_num_threads_in_the_drivers_environment_is_named(value, monkeypatch, ray_disconnected):
    import ray

    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ConfigError, match=f"OMP_NUM_THREADS is '{value}' in the driver's environment"):
        ray_elastic.run(_noop)
    assert not ray.is_initialized(), "rejected before Ray started"


def test_unpicklable_train_fn_names_the_captured_object():
    lock = threading.Lock()

    def train_fn(config):
        with lock:
            return 1

    with pytest.raises(ConfigError, match=r"closure variable 'lock' \(lock\)") as info:
        ray_elastic.run(train_fn)
    assert "inside train_fn" in str(info.value)


def test_train_fn_must_be_callable():
    with pytest.raises(ConfigError, match="train_fn must be callable"):
        ray_elastic.run("train.py")  # type: ignore[arg-type]


def test_errors_pickle_with_their_payload():
    import pickle

    first = ray_elastic.FailureInfo("exception", 1, "node", 0, "ValueError: x", step=3, traceback="tb")
    err = ray_elastic.TrainingFailedError("budget spent", first, (first,), 3, 2)
    back = pickle.loads(pickle.dumps(err))
    assert back.first_failure == first and back.restarts == 3 and str(back) == str(err)
    assert isinstance(ConfigError("x"), ValueError) and issubclass(ConfigError, ray_elastic.ElasticError)


def _node(cpus: float, gpus: float = 0.0, alive: bool = True):
    from ray_elastic.placement import NodeInfo

    return NodeInfo(f"n{cpus}-{gpus}", {"CPU": cpus, "GPU": gpus, "memory": 1e9}, alive)


def test_feasibility_rejects_only_what_no_node_or_node_type_could_ever_hold():
    """Issue 18.4: an empty cluster (a CPU-less head) or one an autoscaler will grow is not rejected."""
    from ray_elastic.config import RunConfig
    from ray_elastic.placement import check_feasible

    two = RunConfig(run_id="t", nproc_per_node=2)
    head = _node(0)
    assert check_feasible(two, [head, _node(2), _node(4)]) == 2
    assert check_feasible(two, [head]) == 0, "no worker node yet: wait for one"
    assert check_feasible(two, [head], node_types=[{"CPU": 4.0}]) == 0, "an autoscaler can add one"
    with pytest.raises(ConfigError, match="no node can hold nproc_per_node=2"):
        check_feasible(two, [head, _node(1)])  # worker nodes are up and none is large enough
    with pytest.raises(ConfigError, match="no node can hold nproc_per_node=2 .* the largest node has \\{'CPU': 1"):
        check_feasible(two, [head], node_types=[{"CPU": 1.0}])  # nor any node type
    gpu = RunConfig(run_id="t", use_gpu=True)
    assert gpu.bundle == {"CPU": 1.0, "GPU": 1.0}, "a whole GPU per worker by default"
    shared = RunConfig(run_id="t", use_gpu=True, backend="gloo", nproc_per_node=2, resources_per_worker={"GPU": 0.5})
    assert shared.bundle["GPU"] == 0.5 and check_feasible(shared, [head, _node(2, gpus=1.0)]) == 1, "2 ranks share it"
    with pytest.raises(ConfigError, match="no GPUs"):
        check_feasible(gpu, [head, _node(2)])
    assert check_feasible(gpu, [head, _node(2)], node_types=[{"CPU": 8.0, "GPU": 1.0}]) == 0
    with pytest.raises(ConfigError, match="no GPUs"):
        check_feasible(gpu, [head], node_types=[{"CPU": 8.0}])
