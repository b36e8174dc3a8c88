"""Every line a script prints reaches the console, in order per rank, before the CLI exits or
restarts the scripts (issue 19); TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE shapes the prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import LINES, SCRIPTS, expected_lines, launch, lines_of

pytestmark = pytest.mark.timeout(170)


def test_twelve_runs_lose_no_line(tmp_path: Path):
    """12 runs of 2 ranks x 300 lines; every 4th run fails rank 1 once, so its lines come in two attempts."""
    template = "<${role_name}:${rank}:${local_rank}> "
    for run in range(12):
        done = tmp_path / f"run{run}"
        done.mkdir()
        restart = run % 4 == 3
        env = {"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": template} if run % 2 else {}
        args = ["--standalone", "--nproc-per-node=2", "--max-restarts=1", str(SCRIPTS / "lines.py"), str(LINES),
                str(done)]
        result = launch("ray-elastic", args + (["--fail-rank", "1"] if restart else []), tmp_path, env)
        assert result.returncode == 0, result.stderr[-3000:]
        for rank in range(2):
            prefix = f"<default:{rank}:{rank}> " if run % 2 else f"[rank{rank}]:"
            for stream, text in (("out", result.stdout), ("err", result.stderr)):
                want = (expected_lines(stream, rank, 0) + expected_lines(stream, rank, 1)) if restart else \
                    expected_lines(stream, rank, 0)
                got = lines_of(text, prefix)
                first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                assert got == want, f"run {run}, rank {rank}, std{stream}: {len(got)} of {len(want)} lines, " \
                                    f"first difference at line {first}"
