"""`type: azure`: Azure OpenAI, reached through its deployment URLs.

``base_url`` is the resource endpoint, ``https://<resource>.openai.azure.com``.
A route target's ``model`` is the Azure *deployment* name: requests go to
``{base_url}/openai/deployments/{deployment}/chat/completions?api-version=...``
(and ``/completions``, ``/embeddings``). The Responses API is not per deployment on
Azure: ``{base_url}/openai/responses?api-version=...`` with the deployment name as
the body's ``model``. The body's ``model`` is the deployment name everywhere;
deployment URLs ignore it. The key goes in the ``api-key`` header, never in
``Authorization`` (for Microsoft Entra ID tokens, leave ``api_key`` empty and set
``headers: {Authorization: "Bearer ..."}``).

Options: ``api_version`` (default :data:`DEFAULT_API_VERSION`, the latest GA
inference version, which takes ``stream_options.include_usage``) and
``responses_api_version`` (default :data:`DEFAULT_RESPONSES_API_VERSION`; the
Responses API needs a preview version).
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import quote

from .. import hookimpl
from .base import Provider

if TYPE_CHECKING:
    from ..config import ProviderConfig, Target
    from ..endpoints import Endpoint

DEFAULT_API_VERSION = "2024-10-21"
DEFAULT_RESPONSES_API_VERSION = "2025-04-01-preview"
OPTIONS = ("api_version", "responses_api_version")


class AzureProvider(Provider):
    type_name = "azure"
    endpoints = frozenset({"chat.completions", "completions", "embeddings", "responses"})

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        unknown = sorted(set(config.options) - set(OPTIONS))
        if unknown:
            hint = difflib.get_close_matches(unknown[0], OPTIONS, n=1)
            raise ValueError(f"unknown option(s) {', '.join(unknown)}"
                             + (f"; did you mean '{hint[0]}'?" if hint else f" (known: {', '.join(OPTIONS)})"))
        self.api_version = _version(config.options, "api_version", DEFAULT_API_VERSION)
        self.responses_api_version = _version(config.options, "responses_api_version",
                                              DEFAULT_RESPONSES_API_VERSION)

    def auth_headers(self) -> dict[str, str]:
        return {"api-key": self.config.api_key} if self.config.api_key else {}

    def url_for(self, endpoint: Endpoint, target: Target) -> str:
        if endpoint.name == "responses":
            return f"{self.base_url}/openai/responses?api-version={self.responses_api_version}"
        deployment = quote(target.model, safe="")
        return (f"{self.base_url}/openai/deployments/{deployment}{endpoint.upstream_path}"
                f"?api-version={self.api_version}")


def _version(options: Mapping[str, Any], key: str, default: str) -> str:
    value = options.get(key, default)
    if not isinstance(value, str) or not value or not value.replace("-", "").isalnum():
        raise ValueError(f"{key} must be an Azure API version such as {default!r}, got {value!r}")
    return value


@hookimpl
def nexgate_register_providers() -> dict[str, type[Provider]]:
    return {AzureProvider.type_name: AzureProvider}
