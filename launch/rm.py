"""`python -m launch.rm train [--config FILE] [key=value ...]`: for `ray job submit`.

The same code as `cpe-ray rm train`.
"""

from __future__ import annotations

import sys

from cpe_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["rm", *sys.argv[1:]]))
