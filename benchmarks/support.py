"""What benchmarks share with the tests: loopback federations (free ports, SuperLink/SuperNode
commands, process killing, test certificates). The one copy lives in
``tests/support/flower_local.py``; benchmarks (run as ``python benchmarks/NAME.py``) import it
from here."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import flower_local  # noqa: E402

__all__ = ["flower_local"]
