"""`python -m launch.train [--config FILE] [key=value ...]`: the `ray job submit` entrypoint.

The same code as `cpe-ray train`; with `cluster.address=auto` it joins the cluster that the
job runs on.
"""

from __future__ import annotations

import sys

from cpe_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
