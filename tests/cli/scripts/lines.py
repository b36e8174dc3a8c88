"""Prints numbered lines quickly to stdout and stderr, the last ones just before it exits.

    lines.py COUNT DIR [--fail-rank R]

Each rank touches DIR/done-<rank>-<attempt> after its last line. With --fail-rank, rank R exits 3
in its first attempt, once every other rank has printed all its lines (so none of them is cut short).
"""

import os
import sys
import time

count, done_dir = int(sys.argv[1]), sys.argv[2]
rank, world = os.environ["RANK"], int(os.environ["WORLD_SIZE"])
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
for i in range(count):
    print(f"out r{rank} a{attempt} {i}")
    if i % 10 == 0:
        print(f"err r{rank} a{attempt} {i}", file=sys.stderr)
print(f"out r{rank} a{attempt} last", flush=True)
print(f"err r{rank} a{attempt} last", file=sys.stderr, flush=True)
open(os.path.join(done_dir, f"done-{rank}-{attempt}"), "w").close()
if sys.argv[3:5] == ["--fail-rank", rank] and attempt == "0":
    others = [os.path.join(done_dir, f"done-{r}-0") for r in range(world) if str(r) != rank]
    deadline = time.monotonic() + 60
    while not all(os.path.exists(p) for p in others) and time.monotonic() < deadline:
        time.sleep(0.01)
    sys.exit(3)
