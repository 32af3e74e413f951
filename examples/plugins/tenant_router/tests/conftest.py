"""Finds the package in ../src when it is not installed (NexGate's own test run); harmless once installed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
