"""LiteLLM's proxy as an optional benchmark target (``run.py --litellm PATH``), configured in ONE place.

LiteLLM is never a dependency of NexGate: install it into a venv of its own and pass its
``litellm`` executable (or set NEXGATE_BENCH_LITELLM)::

    python3 -m venv /work/litellm-venv && /work/litellm-venv/bin/pip install 'litellm[proxy]'
    benchmarks/run.py --litellm /work/litellm-venv/bin/litellm

The proxy (``litellm --config <yaml> --host 127.0.0.1 --port P``, one uvicorn worker) routes
``bench-model`` to the fake upstream as an OpenAI-compatible model (``openai/bench-model``,
``api_base`` = the upstream + ``/v1``). What it is given, and why (``SETTINGS``):

* a ``master_key``: every request is authenticated by its key, as NexGate's are. No database:
  LiteLLM's virtual keys, spend logs and budgets need PostgreSQL, and a master key alone is the
  lightest deployment that still checks a key. So LiteLLM persists nothing per request here,
  where NexGate writes a usage row and a ledger debit: the comparison favours LiteLLM.
* no callbacks (no logging integrations, no Prometheus), ``telemetry: false``;
* ``LITELLM_LOCAL_MODEL_COST_MAP=True``: the bundled price map, not a download at startup
  (startup only; the per-request cost is computed either way);
* ``LITELLM_LOG=ERROR``, as NexGate runs at WARNING: no per-request log line in either.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

BENCH_MODEL = "bench-model"
MASTER_KEY = "sk-bench-litellm"
ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}


def litellm_executable(given: str | None) -> str | None:
    """``--litellm PATH`` or NEXGATE_BENCH_LITELLM; None when neither is set. Exits if the file is missing."""
    path = given or os.environ.get("NEXGATE_BENCH_LITELLM") or None
    if path and not os.access(path, os.X_OK):
        raise SystemExit(f"LiteLLM executable {path!r} not found. Install it into its own venv:\n"
                         "  python3 -m venv /work/litellm-venv && /work/litellm-venv/bin/pip install 'litellm[proxy]'")
    return path


def litellm_config(upstream_url: str) -> dict[str, Any]:
    return {
        "model_list": [{"model_name": BENCH_MODEL, "litellm_params": {
            "model": f"openai/{BENCH_MODEL}", "api_base": f"{upstream_url.rstrip('/')}/v1",
            "api_key": "sk-bench-upstream"}}],
        "litellm_settings": {"telemetry": False, "callbacks": [], "success_callback": [], "failure_callback": []},
        "general_settings": {"master_key": MASTER_KEY},
    }


def litellm_setup(executable: str, upstream_url: str, port: int, workdir: Path
                  ) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(command, request headers, environment) of a LiteLLM proxy on ``port`` in front of the fake upstream."""
    config = workdir / "litellm-bench.yaml"
    config.write_text(yaml.safe_dump(litellm_config(upstream_url), sort_keys=False), encoding="utf-8")
    command = [executable, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return command, {"Authorization": f"Bearer {MASTER_KEY}"}, dict(ENV)


def litellm_version(executable: str) -> str:
    """The installed LiteLLM's version, read from its venv's metadata (no import of litellm here)."""
    import subprocess

    python = Path(executable).with_name("python")
    out = subprocess.run([str(python), "-c", "from importlib.metadata import version; print(version('litellm'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "?"
