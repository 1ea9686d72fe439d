"""``python -m bmrs``: the ``bmrs`` command (what torchrun starts: ``torchrun ... -m bmrs train ...``)."""

import sys

from .cli import main

sys.exit(main())
