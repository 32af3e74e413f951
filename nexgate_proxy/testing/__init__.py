"""NexGate's test kit: a real gateway on a socket, a scriptable fake upstream, real store backends.

Installed with ``pip install "nexgate[test]"`` and loaded into every pytest run
as the ``nexgate`` pytest plugin (``nexgate_proxy.testing.plugin``), which gives
the ``nexgate_*`` fixtures. The building blocks are importable from here::

    from nexgate_proxy.testing import FakeUpstream, Gateway, RecordingPlugin, gateway_config

Names load on first use, so loading the pytest plugin imports neither the
gateway application nor any database driver.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .gateway import (PROVIDER_KEY, Gateway, RecordingPlugin, StartGateway, chat, gateway_config,
                          running_gateways)
    from .net import free_port, is_listening
    from .services import (fresh_postgres_schema, require, require_postgres, require_redis, services_required,
                           store_url_for, with_search_path)
    from .upstream import Behaviour, FakeUpstream, Received, chat_body

_HOMES = {
    "upstream": ["Behaviour", "FakeUpstream", "Received", "chat_body"],
    "gateway": ["PROVIDER_KEY", "Gateway", "RecordingPlugin", "StartGateway", "chat", "gateway_config",
                "running_gateways"],
    "services": ["fresh_postgres_schema", "require", "require_postgres", "require_redis", "services_required",
                 "store_url_for", "with_search_path"],
    "net": ["free_port", "is_listening"],
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "PROVIDER_KEY", "Behaviour", "FakeUpstream", "Gateway", "Received", "RecordingPlugin", "StartGateway",
    "chat", "chat_body", "free_port", "fresh_postgres_schema", "gateway_config", "is_listening", "require",
    "require_postgres", "require_redis", "running_gateways", "services_required", "store_url_for",
    "with_search_path",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
