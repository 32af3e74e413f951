"""Read /metrics the way Prometheus does: with prometheus_client's own parser."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape_text(url: str, headers: dict[str, str] | None = None) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics", headers=headers or {}) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.text()


def samples(text: str) -> Samples:
    """Every sample by (name, labels); parsing fails on anything Prometheus would not read."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when it is absent (a counter never incremented)."""
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and wanted <= ls)
