"""Shared by every test folder: puts ``tests/`` on ``sys.path`` for its helper modules (``waiting``).

pytest's default (prepend) import mode already does this for a conftest outside a package; the
explicit insert keeps ``from waiting import wait_for`` working under ``--import-mode=importlib`` too.
"""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
