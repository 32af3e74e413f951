"""Provider adapters: how to reach one kind of upstream API."""

from .base import Provider, UpstreamResponse

__all__ = ["Provider", "UpstreamResponse"]
