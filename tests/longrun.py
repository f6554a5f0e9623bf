"""Sizes of the robustness suites: small by default, large in the long run.

The default suite keeps each robustness test fast. The long run, documented in
``tests/conftest.py``, scales them up with environment variables:

``BNRS_LONG_RUN=1``
    Selects the long run: the defaults below become 10,000, and tests marked ``long``
    run (they are skipped otherwise).
``BNRS_FUZZ_EXAMPLES=N``
    Generated cases per fuzzed entry point and per kind (valid, invalid); default 30,
    10,000 in the long run.
``BNRS_FUZZ_SHRINK=0``
    Report a failing fuzz case as found, without shrinking it to a minimal one (faster).
``BNRS_REPEATED_CALLS=N``
    Calls of each kernel in the resident-memory tests; default 1,000, 10,000 in the
    long run.
"""

from __future__ import annotations

import os
from collections import Counter


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _count(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    value = int(text)
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {text!r}")
    return value


LONG_RUN = _flag("BNRS_LONG_RUN")
FUZZ_EXAMPLES = _count("BNRS_FUZZ_EXAMPLES", 10_000 if LONG_RUN else 30)
FUZZ_SHRINK = os.environ.get("BNRS_FUZZ_SHRINK", "1").strip() != "0"
REPEATED_CALLS = _count("BNRS_REPEATED_CALLS", 10_000 if LONG_RUN else 1_000)

#: "entry point (valid|invalid)" -> generated cases run, printed at the end of the session.
CASES: Counter = Counter()
#: name -> a measured figure (latency, memory growth), printed at the end of the session.
FIGURES: dict = {}
