"""NexGate: a self-hostable, programmable, OpenAI-compatible LLM API gateway."""

import pluggy

from .context import Identity, RequestContext, StashKey, Usage
from .records import UsageRecord
from .errors import GatewayError

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("nexgate")


class RecordRejected(Exception):
    """Raised by a ``nexgate_guard_record`` hook to keep a record from every sink."""


__all__ = [
    "GatewayError",
    "Identity",
    "RecordRejected",
    "RequestContext",
    "StashKey",
    "Usage",
    "UsageRecord",
    "__version__",
    "hookimpl",
]
