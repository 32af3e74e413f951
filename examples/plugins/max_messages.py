"""Example plugin: refuse chat requests with too many messages.

Load it with `plugins: {directory: examples/plugins}` in your YAML. It declares
its own config section, checked by `nexgate config check` like the built-ins':

    max_messages:
      limit: 50          # the most messages one chat request may send
"""

from dataclasses import dataclass

from aiohttp import web

from nexgate_proxy import GatewayError, hookimpl
from nexgate_proxy.config import ConfigSection


@dataclass(frozen=True)
class Settings:
    limit: int = 50


def parse(r, section, config):
    return Settings(limit=r.value(section, "limit", "max_messages", int, Settings.limit,
                                  lambda v: None if v > 0 else "must be greater than 0"))


SECTION = ConfigSection("max_messages", parse, ("limit",), "The most messages one chat request may send.")
LIMIT = web.AppKey("max_messages.limit", int)


@hookimpl
def nexgate_config_sections():
    return [SECTION]


@hookimpl
def nexgate_register_routes(app, config):
    app[LIMIT] = config.section(SECTION).limit


@hookimpl
def nexgate_admit(ctx):
    limit = ctx.app[LIMIT]
    messages = (ctx.body or {}).get("messages")
    if isinstance(messages, list) and len(messages) > limit:
        raise GatewayError(400, f"At most {limit} messages per request.",
                           code="too_many_messages", param="messages")
