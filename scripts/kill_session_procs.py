"""Kill every process that carries this test session's marker in its environment, and what runs below it.

scripts/test.sh exports RAY_ELASTIC_TEST_SESSION=<random>; every process the suite starts, Ray's
raylets and GCS among them, inherits it. Unlike `ray stop --force`, this leaves alone every Ray on
the machine that the suite did not start.
"""

from __future__ import annotations

import sys

import psutil

from ray_elastic.testing.procs import marked_processes


def main(marker: str) -> int:
    found = marked_processes("RAY_ELASTIC_TEST_SESSION", marker)
    names = []
    for proc in found:
        try:
            names.append(f"{proc.pid} {proc.name()} ({proc.status()}): {' '.join(proc.cmdline())[:120]}")
        except psutil.Error:
            names.append(f"{proc.pid} (gone)")
    for proc in found:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(found, timeout=5)
    if found:
        print(f"kill_session_procs: killed {len(found)} leftover process(es) of this test session: "
              + ", ".join(names), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]) if len(sys.argv) == 2 and sys.argv[1] else 2)
