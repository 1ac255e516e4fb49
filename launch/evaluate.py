"""`python -m launch.evaluate winrate|personafeedback|personamem [...]`: for `ray job submit`.

The same code as `cpe-ray eval ...`, e.g.

    ray job submit --working-dir . -- python -m launch.evaluate winrate \
        --config conf/experiment/qwen2.5-7b-cpe.yaml --model outputs/cpe/checkpoints/step-200
"""

from __future__ import annotations

import sys

from cpe_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
