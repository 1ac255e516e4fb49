"""`python -m launch.train [--config FILE] [key=value ...]`: the `ray job submit` entrypoint.

The same code as `cpe-ray train`. As a Ray job's driver it joins the job's cluster unless
`cluster.address` says otherwise (`cpe_ray.run.ray_address`).
"""

from __future__ import annotations

import sys

from cpe_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
