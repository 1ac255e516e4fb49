"""`python -m launch.sft [--config FILE] [key=value ...]`: stage 1 (SFT) for `ray job submit`.

The same code as `cpe-ray sft`; as a Ray job's driver it joins the job's cluster.
"""

from __future__ import annotations

import sys

from cpe_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
