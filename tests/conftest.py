"""Tests mirror the package (tests/model, tests/calibration, ...); the shared helpers
(``models``, ``realistic_stats``, ``checks``) live here in tests/ and are imported by name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
