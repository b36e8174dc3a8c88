"""Prints numbered lines quickly to stdout and stderr, the last ones just before it exits.

    lines.py COUNT [--fail-rank R]   (rank R exits 3 after its lines in its first start)
"""

import os
import sys

count = int(sys.argv[1])
rank = os.environ["RANK"]
restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
for i in range(count):
    print(f"out r{rank} a{restart} {i}")
    if i % 10 == 0:
        print(f"err r{rank} a{restart} {i}", file=sys.stderr)
print(f"out r{rank} a{restart} last", flush=True)
print(f"err r{rank} a{restart} last", file=sys.stderr, flush=True)
if len(sys.argv) > 3 and sys.argv[2] == "--fail-rank" and sys.argv[3] == rank and restart == "0":
    sys.exit(3)
