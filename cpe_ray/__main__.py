"""`python -m cpe_ray` is the `cpe-ray` command."""

import sys

from cpe_ray.cli import main

sys.exit(main())
