"""Puts this folder on ``sys.path``, so that tests in subfolders import the helpers here
(``from models import ...``, ``from realistic_stats import ...``) as the top-level tests do."""

import sys
from pathlib import Path

HELPERS = str(Path(__file__).resolve().parent)
if HELPERS not in sys.path:
    sys.path.insert(0, HELPERS)
