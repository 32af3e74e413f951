"""The README's performance table is the one benchmarks/report.py prints from the committed results.

No benchmark runs here: the table is re-rendered from benchmarks/reference/*.json (the files the
published figures came from) and compared with README.md's block, so a figure cannot be edited by
hand or drift from the data it claims to come from.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _report():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_readme_table_is_the_one_report_renders_from_the_reference_results():
    report = _report()
    block = report.readme_block((ROOT / "README.md").read_text())
    assert block is not None, "README.md lacks the performance table block"
    assert block == report.render(report.load(report.REFERENCE)), (
        "README.md's performance table differs from the committed results: run "
        "`benchmarks/report.py --save` (after the benchmarks) instead of editing the table")


def test_reference_results_are_real_runs_of_the_benchmarks():
    report = _report()
    results = report.load(report.REFERENCE)
    assert "run_sqlite" in results, "no run.py result committed: the table would be all placeholders"
    run = results["run_sqlite"]
    for mode in ("json", "stream"):
        rows = run["throughput"][mode]
        assert {"upstream", "bare", "nexgate"} <= rows.keys()
        assert all(row["requests"] > 0 and row["round_rps"] for row in rows.values())
    for name, data in results.items():
        assert data["meta"]["git_commit"], name
        json.dumps(data)  # plain JSON, as written by the benchmark
