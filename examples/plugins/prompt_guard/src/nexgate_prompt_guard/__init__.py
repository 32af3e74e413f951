"""Refuse requests whose prompt matches configured keywords or regular expressions.

The check runs in ``nexgate_admit``, so a refused request never leaves the
gateway: no upstream call, no hold, no cost. It happens in memory only: the
prompt is read from ``ctx.body`` and never copied, logged or counted by its
text; the error and the metric name the rule that matched, never the match.

    prompt_guard:
      keywords: ["ignore previous instructions"]   # case-insensitive substrings
      patterns: ['\\b\\d{3}-\\d{2}-\\d{4}\\b']       # Python regular expressions
      models: []                                   # only these aliases (empty: every model)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterator

from aiohttp import web
from prometheus_client.core import CounterMetricFamily

from nexgate_proxy import GatewayError, RequestContext, hookimpl
from nexgate_proxy.config import Config, ConfigReader, ConfigSection

NEXGATE_HOOKS = "1.0"

CONTENT_KEYS = ("messages", "system", "prompt", "input", "instructions")
"""The body fields that carry what a client sends to the model, on every endpoint NexGate serves."""


@dataclass(frozen=True)
class Rule:
    name: str
    """"keywords", or "pattern N" (its place in the list, from 1): what the error and the metric say."""
    regex: re.Pattern[str]


@dataclass(frozen=True)
class Settings:
    rules: tuple[Rule, ...] = ()
    models: frozenset[str] = frozenset()


def _strings(path: str, r: ConfigReader, raw: Any) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(item, str) and item for item in raw):
        r.problem(path, "expected a list of non-empty strings")
        return []
    return raw


def parse(r: ConfigReader, section: dict[str, Any], config: Config) -> Settings:
    rules = []
    keywords = _strings("prompt_guard.keywords", r, section.get("keywords"))
    if keywords:  # one alternation: one scan of the text for every keyword
        rules.append(Rule("keywords", re.compile("|".join(map(re.escape, keywords)), re.IGNORECASE)))
    for i, pattern in enumerate(_strings("prompt_guard.patterns", r, section.get("patterns")), 1):
        try:
            rules.append(Rule(f"pattern {i}", re.compile(pattern)))
        except re.error as exc:
            r.problem(f"prompt_guard.patterns[{i - 1}]", f"not a regular expression: {exc}")
    models = _strings("prompt_guard.models", r, section.get("models"))
    for model in models:
        if model not in config.models:
            r.problem("prompt_guard.models", f"unknown model alias '{model}'")
    return Settings(tuple(rules), frozenset(models))


SECTION = ConfigSection("prompt_guard", parse, ("keywords", "patterns", "models"),
                        "Refuse requests whose prompt matches keywords or regular expressions.")


class Guard:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.refused: dict[str, int] = {rule.name: 0 for rule in settings.rules}

    def check(self, body: dict[str, Any]) -> str | None:
        """The name of the first rule the request's content matches, or None."""
        for text in _texts([body.get(key) for key in CONTENT_KEYS]):
            for rule in self.settings.rules:
                if rule.regex.search(text):
                    return rule.name
        return None


def _texts(value: Any) -> Iterator[str]:
    """Every string inside the content fields: message contents, text parts, prompts, inputs."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in _NOT_TEXT:
                yield from _texts(item)


_NOT_TEXT = frozenset({"role", "type", "name", "id", "tool_call_id", "cache_control",
                       "image_url", "source", "input_audio", "file"})
"""Keys of content parts that hold no text to check (labels, or images and audio as base64)."""

GUARD: web.AppKey[Guard] = web.AppKey("nexgate_prompt_guard.guard", Guard)


@hookimpl
def nexgate_config_sections() -> list[ConfigSection[Any]]:
    return [SECTION]


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    app[GUARD] = Guard(config.section(SECTION))


@hookimpl
def nexgate_admit(ctx: RequestContext) -> None:
    guard = ctx.app[GUARD]
    if not guard.settings.rules or ctx.body is None:
        return
    if guard.settings.models and ctx.model not in guard.settings.models:
        return
    rule = guard.check(ctx.body)
    if rule is not None:
        guard.refused[rule] += 1
        raise GatewayError(400, f"The request was refused by the gateway's prompt policy ({rule}).",
                           code="prompt_rejected", param="messages")


@hookimpl
def nexgate_metrics(app: web.Application) -> Iterator[Any]:
    family = CounterMetricFamily("nexgate_prompt_guard_refusals", "Requests the prompt guard refused, by rule.",
                                 labels=("rule",))
    for rule, count in app[GUARD].refused.items():
        family.add_metric((rule,), count)
    yield family
