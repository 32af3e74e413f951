"""Example plugin: refuse chat requests with too many messages.

Load it with `plugins: {directory: examples/plugins}` in your YAML.
"""

from nexgate_proxy import GatewayError, hookimpl

LIMIT = 50


@hookimpl
def nexgate_admit(ctx):
    messages = (ctx.body or {}).get("messages")
    if isinstance(messages, list) and len(messages) > LIMIT:
        raise GatewayError(400, f"At most {LIMIT} messages per request.",
                           code="too_many_messages", param="messages")
