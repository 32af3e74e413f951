"""The admin plugin: the HTTP API under ``/admin/v1/`` and the operator's commands.

* ``api``: users, organizations, members, API keys, balances, usage and statements;
* ``privacy``: a user's data export and account deletion;
* ``openapi``: the document of both, served at ``/admin/v1/openapi.json``;
* ``http``: what both share: one resource per path, errors as JSON, 405s, bodies and queries;
* ``cli``: ``nexgate db|users|orgs|keys ...`` straight against the store.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from nexgate_proxy import hookimpl
from nexgate_proxy.config import Config
from nexgate_plugins.auth.settings import AUTH_SECTION

from . import api, cli, privacy


@hookimpl
def nexgate_register_routes(app: web.Application, config: Config) -> None:
    # The auth plugin declares the `auth` section (parsed once, by the core); here it is only read.
    app[api.ADMIN] = api.AdminSettings(auth=config.section(AUTH_SECTION))
    api.add_routes(app, privacy.ROUTES)


@hookimpl
def nexgate_cli_commands(subparsers: Any) -> None:
    cli.register(subparsers)
