"""Where each benchmark script writes its results JSON, and the run facts every one of them carries.

``benchmarks/results/`` is git-ignored (scratch); ``report.py`` reads the files named in
``report.SOURCES`` from there and prints the README's performance table. The files a published
table was made from are copied to ``benchmarks/reference/`` (committed; ``report.py --save``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REFERENCE = HERE / "reference"


def run_facts(source: str) -> dict[str, Any]:
    """When, at which commit, from what source and with which command line the figures were measured."""
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "-"
    return {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": commit,
            "source": source, "argv": [Path(sys.argv[0]).name, *sys.argv[1:]]}


def save(path: Path, payload: dict[str, Any], source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": run_facts(source), **payload}, indent=1) + "\n")
    print(f"results written to {path}", flush=True)
    return path
