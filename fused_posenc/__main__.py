"""``python -m fused_posenc``: check every encoding on every available backend against the float64
reference and time it (see :mod:`fused_posenc.demo`)."""
import sys

from .demo import main

sys.exit(main())
