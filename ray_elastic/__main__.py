"""`python -m ray_elastic run ...`: the same as the `ray-elastic` command."""

import sys

from ray_elastic.cli import main

if __name__ == "__main__":
    sys.exit(main())
