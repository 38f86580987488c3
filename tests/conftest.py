"""Shared test setup: make tests/ importable for helpers such as gradcheck.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
