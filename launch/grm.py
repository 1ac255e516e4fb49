"""`python -m launch.grm collect|train [--config FILE] [key=value ...]`: for `ray job submit`.

The same code as `cpe-ray grm collect` / `cpe-ray grm train`.
"""

from __future__ import annotations

import sys

from cpe_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["grm", *sys.argv[1:]]))
