"""Start-up of a local launch: torchrun vs `ray-elastic run`, side by side, rounds interleaved.

    python benchmarks/startup.py --rounds 10            # under /work/bin/raylock: one system starts a Ray

Each round launches every system once (order rotating) with 2 processes running a
script whose first statement prints a line, and records the time from the launcher's
start to that first line on the launcher's stdout, and to the launcher's exit:

- torchrun --standalone --nproc-per-node=2
- ray-elastic run --standalone --nproc-per-node=2          (this machine, no Ray)
- ray-elastic run --address=local --nproc-per-node=2       (a Ray started by the CLI: the former local path)

Then it times the parts the launches are made of, each in a fresh interpreter:
interpreter start, the launchers' imports, `ray.init` of a local Ray, and a worker
actor that imports torch (what every slot of a Ray launch waits for).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import StealMeter, fmt_s, log, machine_line, table  # noqa: E402

HELLO = "import os\nprint(f'hello from rank {os.environ[\"RANK\"]}', flush=True)\n"
SYSTEMS = {
    "torchrun --standalone": [sys.executable, "-m", "torch.distributed.run", "--standalone"],
    "ray-elastic run --standalone (no Ray)": [sys.executable, "-m", "ray_elastic", "run", "--standalone"],
    "ray-elastic run --address=local (starts a Ray)": [sys.executable, "-m", "ray_elastic", "run",
                                                       "--address=local"],
}
PARTS = {
    "python -c pass": "pass",
    "import torch.distributed.run (torchrun's imports)": "import torch.distributed.run",
    "import ray_elastic.cli, cli_local (the local path's imports)":
        "import ray_elastic.cli, ray_elastic.cli_local",
    "ray.init() of a local Ray, then shutdown": (
        "import ray, time; t = time.monotonic(); ray.init(address='local', include_dashboard=False, num_cpus=2); "
        "print('T', time.monotonic() - t); ray.shutdown()"),
    "ray.init() + an actor that imports torch (a worker slot)": (
        "import ray, time; t = time.monotonic(); ray.init(address='local', include_dashboard=False, num_cpus=2)\n"
        "@ray.remote(num_cpus=0)\nclass W:\n    def __init__(self):\n        import torch  # noqa: F401\n"
        "    def ready(self):\n        return 1\n"
        "ray.get(W.remote().ready.remote()); print('T', time.monotonic() - t); ray.shutdown()"),
}


def launch(cmd: list[str], script: Path, nproc: int, timeout_s: float) -> tuple[float | None, float, int]:
    """(seconds to the first script line, seconds to exit, exit code)."""
    start = time.monotonic()
    proc = subprocess.Popen([*cmd, f"--nproc-per-node={nproc}", str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=script.parent)
    first = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if first is None and "hello from rank" in line:
            first = time.monotonic() - start
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return first, time.monotonic() - start, proc.returncode


def time_part(code: str) -> float:
    """Seconds a fresh interpreter takes to run `code` (or the time it prints after 'T ')."""
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    inner = [line.split()[1] for line in out.splitlines() if line.startswith("T ")]
    return float(inner[0]) if inner else time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="skip the system that starts a Ray")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    systems = {k: v for k, v in SYSTEMS.items() if not (args.no_ray and "--address=local" in k)}
    parts = {k: v for k, v in PARTS.items() if not (args.no_ray and "ray.init" in k)}
    script = Path(tempfile.mkdtemp(prefix="startup_")) / "hello.py"
    script.write_text(HELLO)
    first: dict[str, list[float]] = {name: [] for name in systems}
    total: dict[str, list[float]] = {name: [] for name in systems}
    ratios: dict[str, list[float]] = {name: [] for name in systems}
    part_times: dict[str, list[float]] = {name: [] for name in parts}
    steal = StealMeter()
    began = time.monotonic()
    for round_no in range(args.rounds):
        names = list(systems)
        names = names[round_no % len(names):] + names[:round_no % len(names)]
        got = {}
        for name in names:
            to_first, to_exit, code = launch(systems[name], script, args.nproc, args.timeout)
            if code != 0 or to_first is None:
                log(f"round {round_no}: {name} failed (exit {code})")
                continue
            got[name] = to_first
            first[name].append(to_first)
            total[name].append(to_exit)
        if "torchrun --standalone" in got:
            for name, value in got.items():
                ratios[name].append(value / got["torchrun --standalone"])
        for name, code in parts.items():
            part_times[name].append(time_part(code))
        log(f"round {round_no}: " + ", ".join(f"{n.split(' (')[0]} {v:.2f}s" for n, v in got.items()))
    med = statistics.median
    print(machine_line())
    print()
    print(f"`python benchmarks/startup.py --rounds {args.rounds}{' --no-ray' if args.no_ray else ''}` "
          f"({time.monotonic() - began:.0f} s; CPU steal {fmt_s(steal.percent(), 0)}%)")
    print()
    print(table(["launcher", "first script line (s, median)", "exit (s, median)",
                 "first line / torchrun's, same round (median)", "runs"],
                [(name, fmt_s(med(first[name])) if first[name] else "—", fmt_s(med(total[name])) if total[name]
                  else "—", fmt_s(med(ratios[name])) if ratios[name] else "—", len(first[name]))
                 for name in systems]))
    print()
    print(table(["part (a fresh interpreter each)", "seconds (median)"],
                [(name, fmt_s(med(values))) for name, values in part_times.items()]))


if __name__ == "__main__":
    main()
