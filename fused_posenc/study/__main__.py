"""``python -m fused_posenc.study``: the length-generalisation study (see :mod:`fused_posenc.study.cli`)."""
import sys

from .cli import main

sys.exit(main())
