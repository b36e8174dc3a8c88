"""The package's names load on first use: the local CLI starts without Ray
(benchmarks/startup.py: its imports 1.53 s -> 1.05 s)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ray_elastic

pytestmark = pytest.mark.timeout(60)


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_local_cli_path_imports_no_ray():
    out = _run("import sys, ray_elastic.cli, ray_elastic.cli_local; print('ray' in sys.modules)")
    assert out == "False", "ray_elastic.cli and the local launcher must not import Ray"


def test_every_public_name_resolves_and_unknown_names_raise():
    assert sorted(ray_elastic.__all__) == sorted(ray_elastic._HOME_OF), "every public name has a home module"
    for name in ray_elastic.__all__:
        assert getattr(ray_elastic, name) is not None, name
    assert set(ray_elastic.__all__) <= set(dir(ray_elastic))
    assert ray_elastic.State.__module__ == "ray_elastic.state"
    with pytest.raises(AttributeError, match="no attribute 'Stat'"):
        _ = ray_elastic.Stat  # type: ignore[attr-defined]


def test_from_import_works_in_a_fresh_interpreter():
    out = _run("from ray_elastic import run, State, TrainingFailedError; print(run.__module__, State.__name__)")
    assert out == "ray_elastic.api State"
