"""The HTTP plumbing the admin API and its privacy endpoints share: errors as JSON, 405s, bodies, queries.

One resource per path with every method of every module on it, so a 405's ``Allow`` lists them all
(``add_routes``); one handler wrapper that turns ``GatewayError`` and store errors into the OpenAI
error shape (``errors_as_json``); one JSON body reader and the query validators.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Awaitable, Callable, Iterable, Mapping

from aiohttp import web

from nexgate_proxy import GatewayError
from nexgate_proxy.requestbody import read_body as read_request_body
from nexgate_proxy.store import Conflict, LastOwnerError, NotFound, StoreError

log = logging.getLogger("nexgate.admin")

MAX_BODY_BYTES = 64 * 1024
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""What every id in a path, query or body looks like (the OpenAPI document declares the same)."""
_ID = re.compile(ID_PATTERN.strip("^$"))
_INTEGER = re.compile(r"-?[0-9]{1,20}")

Endpoint = Callable[[web.Request], Awaitable[web.StreamResponse]]


# ------------------------------------------------------------------- errors


def bad(param: str | None, message: str) -> GatewayError:
    return GatewayError(400, message, code="invalid_request", param=param)


def not_found(what: str) -> GatewayError:
    return GatewayError(404, f"No such {what}.", code="not_found")


def forbidden(message: str) -> GatewayError:
    return GatewayError(403, message, code="forbidden")


def errors_as_json(call: Endpoint) -> Endpoint:
    """Every failure in the OpenAI error shape: GatewayError as is, store errors as 404/409/503, bugs as 500."""
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await call(request)
        except GatewayError as exc:
            return exc.response()
        except NotFound as exc:
            return GatewayError(404, str(exc), code="not_found").response()
        except LastOwnerError as exc:
            return GatewayError(409, f"{exc}.", code="last_owner").response()
        except Conflict as exc:
            return GatewayError(409, f"Conflict: {exc}.", code="conflict").response()
        except StoreError as exc:
            log.error("admin API: the store failed: %s", type(exc).__name__)
            return GatewayError(503, "The account database is unavailable; retry shortly.",
                                code="store_unavailable").response()
        except web.HTTPException:
            raise
        except Exception:
            log.exception("admin API: unexpected error on %s %s", request.method, request.path)
            return GatewayError(500, "The admin API failed to handle the request.",
                                code="internal_error").response()

    handle.__name__ = getattr(call, "__name__", "admin")
    return handle


def method_not_allowed(allowed: Iterable[str]) -> Endpoint:
    allow = ", ".join(allowed)

    async def handle(request: web.Request) -> web.Response:
        return GatewayError(405, f"{request.method} is not supported on {request.path}; use {allow}.",
                            code="method_not_allowed", headers={"Allow": allow}).response()

    return handle


def add_routes(app: web.Application, prefix: str, routes: Iterable[tuple[str, str, Endpoint]]) -> None:
    """(method, path under prefix, endpoint): one resource per path, answering 405 with every method in Allow."""
    by_path: dict[str, list[tuple[str, Endpoint]]] = {}
    for method, path, endpoint in routes:
        by_path.setdefault(path, []).append((method, endpoint))
    for path, endpoints in by_path.items():
        resource = app.router.add_resource(prefix + path)
        for method, endpoint in endpoints:
            resource.add_route(method, endpoint)
        resource.add_route("*", method_not_allowed(m for m, _ in endpoints))


# -------------------------------------------------------------------- input


def clean_text(value: str) -> bool:
    """No control characters and encodable as UTF-8 (a lone surrogate is not)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_body(request: web.Request, fields: Mapping[str, type | tuple[type, ...]],
                    nullable: tuple[str, ...] = ()) -> dict[str, Any]:
    """The JSON object body, with only known fields of the right JSON types; null only where ``nullable``."""
    raw = await read_request_body(request, MAX_BODY_BYTES, too_large_code="body_too_large")
    if not raw.strip():
        raise bad(None, "The request body must be a JSON object.")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad(None, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise bad(None, "The request body must be a JSON object.")
    for key, value in data.items():
        expected = fields.get(key)
        if expected is None:
            known = ", ".join(fields) or "none"
            raise bad(key, f"Unknown field '{key}' (known fields: {known}).")
        if value is None and key in nullable:
            continue
        kinds = expected if isinstance(expected, tuple) else (expected,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise bad(key, f"'{key}' must be {_type_name(kinds)}" + (" or null." if key in nullable else "."))
    return data


def _type_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", list: "an array", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_query(request: web.Request, known: tuple[str, ...]) -> None:
    for name in request.query:
        if name not in known:
            raise bad(name, f"Unknown query parameter '{name}' (known: {', '.join(known) or 'none'}).")


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if _INTEGER.fullmatch(raw) is None:  # int() would also take " 5", "5_000" and non-ASCII digits
        raise bad(name, f"'{name}' must be an integer.")
    value = int(raw)
    if not low <= value <= high:
        raise bad(name, f"'{name}' must be between {low} and {high}.")
    return value


def query_bool(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false")
    if raw not in ("true", "false"):
        raise bad(name, f"'{name}' must be true or false.")
    return raw == "true"
