"""The NexGate config the benchmark runs, in ONE place: ``gateway_setup``.

The gateway is benchmarked with its full built-in chain: every plugin of
``nexgate_proxy.plugins.DEFAULT_PLUGINS`` stays enabled (``plugins.disable`` is
empty). Installed entry-point plugins are switched off so that what is measured
is NexGate itself, not whatever else happens to be installed in the venv.

What ``gateway_setup`` does for the built-ins it knows (each only when the
plugin is in ``DEFAULT_PLUGINS``):

* auth: creates the store (migrated), one user and one API key before the
  gateway starts; every benchmark request sends that key. The first request
  pays one bcrypt verification (in the warmup); then every request is a cache
  hit, as in production.
* credits: grants that user ``BENCH_CREDITS_USD``, so every request is priced,
  held and settled, and none is refused for want of credit.
* ratelimit: per-key rpm and tpm limits far above what a run reaches
  (``NEXGATE_BENCH_LIMITS=rpm`` or ``all``, i.e. with concurrency, to choose others), and the
  default abuse controls (brute-force bans); the pseudo-plugin ``abuse`` in ``disable``
  (``--variant "no abuse controls=abuse"``) turns those off.
* usage_log: its outbox directory in the temp dir.

Extending it when a built-in plugin joins
-----------------------------------------
Edit ``gateway_setup`` only; ``run.py`` and ``profile_gateway.py`` need no change:

* add the plugin's config section to ``config`` (e.g. ``config["limits"] = {...}``);
* if the plugin needs a header on every request, put it in ``headers``: the
  load generator (wrk) and the correctness check send it;
* if something must exist before the gateway starts (a key in the store, a
  seeded credit balance), do it in ``gateway_setup`` like ``_seed_account``
  (``workdir`` is a fresh temporary directory per run, deleted afterwards);
* set ``env`` for environment variables the gateway process should get.

Keep the benchmark realistic: configure the plugin the way a production
deployment would (e.g. a rate limit high enough that it never rejects, so the
cost of checking it is measured and not the cost of 429s; a credit balance
large enough for the whole run).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH_MODEL = "bench-model"
"""The alias clients call. It equals the upstream model name, so NexGate forwards the body unchanged."""


@dataclass
class GatewaySetup:
    config: dict[str, Any]
    """The YAML document, as a dict."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra request headers every benchmark request sends (e.g. Authorization)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables for the gateway process."""


def gateway_setup(upstream_url: str, port: int, workdir: Path, disable: list[str] | None = None) -> GatewaySetup:
    """The gateway config pointing ``bench-model`` at the fake upstream (``type: openai``).

    ``disable``: built-ins to switch off (``run.py --variant``); None reads NEXGATE_BENCH_DISABLE.
    """
    from nexgate_proxy.plugins import DEFAULT_PLUGINS

    # NEXGATE_BENCH_STORAGE_URL / NEXGATE_BENCH_STATE_URL: the scale-out stores (PostgreSQL, Redis).
    # A PostgreSQL URL should name an empty schema (?search_path=...): the run adds rows to it.
    storage_url = os.environ.get("NEXGATE_BENCH_STORAGE_URL") or f"sqlite:///{workdir / 'nexgate-bench.db'}"
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "workers": 1, "access_log": False,
                   "grace_period": 1},
        "storage": {"url": storage_url},
        "state": {"url": os.environ.get("NEXGATE_BENCH_STATE_URL", "memory://")},
        "providers": {
            "fake": {"type": "openai", "base_url": f"{upstream_url.rstrip('/')}/v1", "api_key": "sk-bench-upstream"},
        },
        "models": {
            BENCH_MODEL: {
                "route": [{"provider": "fake", "model": BENCH_MODEL}],
                "price": {"input": 0.15, "output": 0.60},
            },
        },
        "plugins": {"entrypoints": False, "disable": []},
    }
    setup = GatewaySetup(config=config)
    plugins = set(DEFAULT_PLUGINS)
    # NEXGATE_BENCH_DISABLE=credits,usage_log,... measures the chain without some built-ins,
    # to see what each costs. The reported figures use the full chain (nothing disabled).
    if disable is None:
        disable = [name for name in os.environ.get("NEXGATE_BENCH_DISABLE", "").split(",") if name]
    # "abuse" is not a plugin: it turns the ratelimit plugin's default abuse controls (brute-force
    # counting, checked on every request) off, to measure what the secure defaults cost.
    abuse_off = "abuse" in disable
    disabled = [name for name in disable if name != "abuse"]
    if disabled:
        config.setdefault("plugins", {})["disable"] = disabled
        config["privacy"] = {"allow_unguarded": "redaction" in disabled}
        plugins -= {f"nexgate_plugins.{name}" for name in disabled}
    if "nexgate_plugins.usage_log" in plugins:
        # The durable usage log spools to disk before the store: keep it in the temp dir.
        config["usage"] = {"outbox_dir": str(workdir / "outbox")}
    if "nexgate_plugins.ratelimit" in plugins:
        # Limits a production key would have, far above what the run reaches: the checks are
        # measured (on the key, in the hot state of NEXGATE_BENCH_STATE_URL), never a 429.
        config["limits"] = {"key": bench_limits(os.environ.get("NEXGATE_BENCH_LIMITS", "rpm+tpm"))}
        if abuse_off:
            config["limits"]["brute_force"] = False
    if "nexgate_plugins.auth" in plugins:
        config["auth"] = {"required": True}
        grant = BENCH_CREDITS_USD if "nexgate_plugins.credits" in plugins else None
        setup.headers["Authorization"] = f"Bearer {asyncio.run(_seed_account(storage_url, grant))}"
    return setup


BENCH_LIMITS = {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000, "concurrent": 1_000_000}


def bench_limits(names: str) -> dict[str, int]:
    """NEXGATE_BENCH_LIMITS: which key limits are on, e.g. "rpm", "rpm+tpm" (the default) or "all"."""
    chosen = list(BENCH_LIMITS) if names == "all" else [n for n in names.replace(",", "+").split("+") if n]
    unknown = set(chosen) - set(BENCH_LIMITS)
    if unknown or not chosen:
        raise SystemExit(f"NEXGATE_BENCH_LIMITS: expected rpm, tpm, concurrent joined by '+', or 'all'; got {names!r}")
    return {name: BENCH_LIMITS[name] for name in chosen}


BENCH_CREDITS_USD = 1000
"""Prepaid balance of the benchmark account: about 20 million requests at this model's price."""


async def _seed_account(storage_url: str, credits_usd: int | None) -> str:
    """Create the store, one user, its API key (default bcrypt cost) and a credit grant; return the key."""
    from nexgate_proxy.accounts import create_api_key
    from nexgate_proxy.store import open_store

    store = await open_store(storage_url)
    try:
        await store.migrate()
        user = await store.create_user(name="benchmark")
        created = await create_api_key(store, name="benchmark", user_id=user.id)
        # NEXGATE_BENCH_EXTRA_KEYS=100000: more keys in the store, to show lookups do not grow with them.
        # Their hash is a placeholder (never verified): bcrypt for 100,000 keys would take hours.
        from nexgate_proxy.keys import generate_key

        for _ in range(int(os.environ.get("NEXGATE_BENCH_EXTRA_KEYS", "0"))):
            extra = generate_key()
            await store.create_api_key(public_id=extra.public_id, prefix=extra.prefix, user_id=user.id,
                                       secret_hash="$2b$12$" + "x" * 53, name="filler")
        if credits_usd:
            from decimal import Decimal

            from nexgate_proxy.money import usd_to_pico
            from nexgate_proxy.store import NewLedgerEntry

            await store.apply_ledger_entry(NewLedgerEntry(
                account_id=user.id, kind="grant", amount_pico=usd_to_pico(Decimal(credits_usd)),
                source="admin", external_id=f"benchmark-grant-{user.id}", description="benchmark"))
    finally:
        await store.close()
    return created.plaintext


def write_gateway_config(setup: GatewaySetup, path: Path) -> Path:
    path.write_text(yaml.safe_dump(setup.config, sort_keys=False), encoding="utf-8")
    return path
