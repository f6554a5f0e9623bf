"""``python -m bnrs.bench``: the same as ``bnrs bench``."""

import sys

from .runner import main

sys.exit(main())
