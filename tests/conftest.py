"""Tests mirror the package (tests/model, tests/calibration, ...); the shared helpers
(``models``, ``realistic_stats``, ``checks``) live here in tests/ and are imported by name."""

import sys
from pathlib import Path

HELPERS = str(Path(__file__).resolve().parent)
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)
