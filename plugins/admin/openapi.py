"""The OpenAPI 3.1 document of the admin API (``GET /admin/v1/openapi.json``).

Kept as Python next to the handlers in ``api.py`` and ``privacy.py`` so it ships without
package-data. It is the contract clients generate code from, so it declares what the server checks
(id patterns, text without control characters, ranges); where a rule cannot be written in it, the
server answers within what it documents. tests/plugins/admin/test_admin_api.py fails when a route and
this document disagree; test_openapi_schemathesis.py runs schemathesis (every check) against it.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from nexgate_proxy import __version__

from .http import ID_PATTERN
from .privacy_openapi import OPENAPI_PATHS, OPENAPI_SCHEMAS

_NULLABLE_STRING = {"type": ["string", "null"]}
_ID = {"type": "string", "pattern": ID_PATTERN}
_NO_CONTROL = r"[^\u0000-\u001f\u007f]"
_TEXT_PATTERN = rf"^{_NO_CONTROL}*[^\s\u0000-\u001f\u007f]{_NO_CONTROL}*$"
"""Not blank, no control characters (surrounding spaces are trimmed)."""


def _text(max_length: int, **more: Any) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_length, "pattern": _TEXT_PATTERN, **more}


_EMAIL = {"type": "string", "minLength": 1, "maxLength": 320, "pattern": rf"^{_NO_CONTROL}*@{_NO_CONTROL}*$"}
_LIMIT_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,64}$"}
_MONTH = {"type": "string", "pattern": r"^(19[7-9]\d|[2-8]\d{3}|9[0-8]\d{2}|99[0-8]\d|999[0-8])-(0[1-9]|1[0-2])$",
          "description": "A UTC calendar month, `YYYY-MM`, from 1970-01 to 9998-12."}
_TIMESTAMP = {"type": "string", "format": "date-time", "description": "ISO-8601, UTC (`Z`)."}
_NULLABLE_TIMESTAMP = {"type": ["string", "null"], "format": "date-time", "description": "ISO-8601, UTC (`Z`)."}
_ROLE = {"type": "string", "enum": ["owner", "admin", "member"]}
_USD = {"type": "string", "pattern": r"^-?\d+(\.\d{1,12})?$",
        "description": "Exact decimal US dollars (never a float), e.g. `12.5` or `-0.0000275`."}
_NULLABLE_USD = {**_USD, "type": ["string", "null"]}
_PICO = {"type": "integer", "description": "The same amount in integer pico-USD (1e-12 USD)."}
_NULLABLE_PICO = {**_PICO, "type": ["integer", "null"]}
_ACCOUNT_TYPE = {"type": "string", "enum": ["user", "organization"]}
_LIMIT_VALUE = {"type": "integer", "minimum": 0, "maximum": 2**53 - 1}
_ORG_LIMITS = {
    "type": ["object", "null"],
    "properties": {
        "rpm": {**_LIMIT_VALUE, "description": "Requests per minute of all the organization's keys; 0: none."},
        "tpm": {**_LIMIT_VALUE, "description": "Tokens per minute of all the organization's keys; 0: none."},
        "concurrent": {**_LIMIT_VALUE, "description": "Requests in flight at once; 0: none."},
    },
    "additionalProperties": False,
    "propertyNames": _LIMIT_NAME,
    "description": "The operator's overrides of the organization's rate limits, per name over "
                   "`limits.orgs.<org_id>` and then `limits.org` of the YAML config; null: none.",
}


def _money(name: str, nullable: bool = False) -> dict[str, Any]:
    return {f"{name}_usd": _NULLABLE_USD if nullable else _USD, f"{name}_pico": _NULLABLE_PICO if nullable else _PICO}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(name: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["object", "data", "has_more"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref(name)},
            "has_more": {"type": "boolean"},
        },
    }


def _object(required: list[str], properties: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "required": required, "properties": properties,
                              "additionalProperties": False}
    if description:
        schema["description"] = description
    return schema


_SCHEMAS: dict[str, Any] = {
    "Error": _object(["error"], {
        "error": _object(["message", "type", "param", "code"], {
            "message": {"type": "string"},
            "type": {"type": "string", "description": "OpenAI error type, e.g. `invalid_request_error`."},
            "param": {**_NULLABLE_STRING, "description": "The request field or parameter at fault."},
            "code": {**_NULLABLE_STRING, "description": "Machine-readable reason, e.g. `invalid_token`."},
        }),
    }, "The OpenAI error shape, used for every error."),
    "User": _object(["object", "id", "external_id", "email", "name", "created_at", "deleted_at", "suspended_at"], {
        "object": {"const": "user"},
        "id": {"type": "string", "examples": ["usr_3k2j4h5g6f7d8s9a0q1w2e3r4t"]},
        "external_id": {**_NULLABLE_STRING, "description": "The identity provider's user id (Clerk `sub`)."},
        "email": _NULLABLE_STRING,
        "name": _NULLABLE_STRING,
        "created_at": _TIMESTAMP,
        "deleted_at": _NULLABLE_TIMESTAMP,
        "suspended_at": {**_NULLABLE_TIMESTAMP, "description": "Set while the account is suspended: its keys "
                                                               "are refused 403 `account_suspended`."},
    }),
    "Organization": _object(["object", "id", "name", "created_at", "role"], {
        "object": {"const": "organization"},
        "id": {"type": "string"},
        "name": {"type": "string"},
        "created_at": _TIMESTAMP,
        "role": {"oneOf": [_ROLE, {"type": "null"}],
                 "description": "The caller's role in it; null for the superadmin."},
        "limits": {**_ORG_LIMITS, "description": "Present for the superadmin only. " + _ORG_LIMITS["description"]},
    }),
    "Member": _object(["object", "org_id", "user_id", "role", "email", "name", "created_at"], {
        "object": {"const": "organization.member"},
        "org_id": {"type": "string"},
        "user_id": {"type": "string"},
        "role": _ROLE,
        "email": _NULLABLE_STRING,
        "name": _NULLABLE_STRING,
        "created_at": _TIMESTAMP,
    }),
    "MemberDeleted": _object(["object", "org_id", "user_id", "deleted", "revoked_key_ids"], {
        "object": {"const": "organization.member.deleted"},
        "org_id": {"type": "string"},
        "user_id": {"type": "string"},
        "deleted": {"const": True},
        "revoked_key_ids": {"type": "array", "items": {"type": "string"},
                            "description": "Organization keys the member had created, now revoked."},
    }),
    "ApiKey": _object(
        ["object", "id", "name", "prefix", "user_id", "org_id", "created_by", "created_at", "last_used_at",
         "expires_at", "revoked_at", "allowed_models", "limits"], {
            "object": {"const": "api_key"},
            "id": {"type": "string"},
            "name": {"type": "string"},
            "prefix": {"type": "string", "description": "Non-secret start of the key, safe to display."},
            "user_id": {**_NULLABLE_STRING, "description": "Set for a personal key."},
            "org_id": {**_NULLABLE_STRING, "description": "Set for an organization key."},
            "created_by": _NULLABLE_STRING,
            "created_at": _TIMESTAMP,
            "last_used_at": {**_NULLABLE_TIMESTAMP, "description": "Recorded in batches: may lag by a minute."},
            "expires_at": _NULLABLE_TIMESTAMP,
            "revoked_at": _NULLABLE_TIMESTAMP,
            "allowed_models": {"type": ["array", "null"], "items": {"type": "string"},
                               "description": "null: every model."},
            "limits": {"type": ["object", "null"]},
        }, "Key metadata. Neither the key nor its hash is ever returned, except `key` on creation."),
    "CreatedApiKey": "filled in below: ApiKey and the plaintext `key`",
    "Caller": _object(["object", "superadmin", "user", "orgs", "clerk"], {
        "object": {"const": "caller"},
        "superadmin": {"type": "boolean", "description": "True for the bootstrap admin token."},
        "user": {"oneOf": [_ref("User"), {"type": "null"}]},
        "orgs": {"type": "array", "items": _ref("Organization")},
        "clerk": {"oneOf": [{"type": "null"}, _object(
            ["user_id", "session_id", "org_id", "org_role", "org_slug"], {
                "user_id": {"type": "string"}, "session_id": _NULLABLE_STRING, "org_id": _NULLABLE_STRING,
                "org_role": _NULLABLE_STRING, "org_slug": _NULLABLE_STRING,
            }, "The session token's claims (v1 `org_*` or v2 `o`); informational, they grant nothing.")]},
    }),
    "Balance": _object(["object", "account_id", "account_type", "currency", "balance_usd", "balance_pico"], {
        "object": {"const": "balance"},
        "account_id": {"type": "string"},
        "account_type": _ACCOUNT_TYPE,
        "currency": {"const": "usd"},
        **_money("balance"),
    }, "The account's prepaid balance: the sum of its ledger."),
    "Transaction": _object(
        ["object", "id", "account_id", "kind", "amount_usd", "amount_pico", "source", "external_id", "request_id",
         "description", "created_at"], {
            "object": {"const": "transaction"},
            "id": {"type": "integer"},
            "account_id": {"type": "string"},
            "kind": {"type": "string", "enum": ["payment", "debit", "refund", "dispute", "grant", "adjustment"]},
            **_money("amount"),
            "source": {"type": "string", "description": "`request` for usage debits, `dodopayments`, `admin`..."},
            "external_id": {"type": "string", "description": "The source's id: applied at most once."},
            "request_id": _NULLABLE_STRING,
            "description": _NULLABLE_STRING,
            "created_at": _TIMESTAMP,
        }, "A ledger entry, signed: credits positive, debits negative."),
    "UsageRecord": _object(
        ["object", "request_id", "ts", "endpoint", "model", "provider", "upstream_model", "account_id", "org_id",
         "key_id", "key_prefix", "prompt_tokens", "completion_tokens", "cached_tokens", "usage_estimated",
         "estimated_cost_usd", "estimated_cost_pico", "actual_cost_usd", "actual_cost_pico", "latency_ms", "status",
         "error_code", "stream", "attempts"], {
            "object": {"const": "usage_record"},
            "request_id": {"type": "string"},
            "ts": {**_TIMESTAMP, "description": "When the request started (UTC)."},
            "endpoint": {"type": "string"},
            "model": _NULLABLE_STRING,
            "provider": _NULLABLE_STRING,
            "upstream_model": _NULLABLE_STRING,
            "account_id": _NULLABLE_STRING,
            "org_id": _NULLABLE_STRING,
            "key_id": _NULLABLE_STRING,
            "key_prefix": _NULLABLE_STRING,
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "cached_tokens": {"type": "integer"},
            "usage_estimated": {"type": "boolean", "description": "Token counts are NexGate's estimate."},
            **_money("estimated_cost", nullable=True),
            **_money("actual_cost", nullable=True),
            "latency_ms": {"type": "integer"},
            "status": {"type": "integer"},
            "error_code": _NULLABLE_STRING,
            "stream": {"type": "boolean"},
            "attempts": {"type": "integer"},
        }, "Metadata of one request: never its content, nor the client IP."),
    "UsageTotal": _object(
        ["object", "group_by", "group", "requests", "prompt_tokens", "completion_tokens", "cost_usd", "cost_pico"], {
            "object": {"const": "usage_total"},
            "group_by": {"type": "string", "enum": ["day", "model", "key"]},
            "group": {"type": "string", "description": "`YYYY-MM-DD` (UTC), the model, or the key id; '' if none."},
            "requests": {"type": "integer"},
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            **_money("cost"),
        }),
    "StatementTransaction": _object(
        ["date", "kind", "source", "description", "amount_usd", "amount_pico", "count", "id", "external_id"], {
            "date": _TIMESTAMP,
            "kind": {"type": "string"},
            "source": {"type": "string"},
            "description": _NULLABLE_STRING,
            **_money("amount"),
            "count": {"type": "integer", "minimum": 1,
                      "description": "Ledger entries summed: a day's request debits are one line."},
            "id": {"type": ["integer", "null"], "description": "The ledger entry; null for summed lines."},
            "external_id": _NULLABLE_STRING,
        }),
    "Statement": _object(
        ["object", "account_id", "account_type", "account_name", "month", "period_start", "period_end", "currency",
         "opening_balance_usd", "opening_balance_pico", "credits_usd", "credits_pico", "debits_usd", "debits_pico",
         "closing_balance_usd", "closing_balance_pico", "transactions", "usage_by_model", "generated_at", "final"], {
            "object": {"const": "statement"},
            "account_id": {"type": "string"},
            "account_type": _ACCOUNT_TYPE,
            "account_name": _NULLABLE_STRING,
            "month": {"type": "string", "pattern": r"^\d{4}-\d{2}$"},
            "period_start": _TIMESTAMP,
            "period_end": {**_TIMESTAMP, "description": "Exclusive: the first instant of the next month."},
            "currency": {"const": "usd"},
            **_money("opening_balance"),
            **_money("credits"),
            **_money("debits"),
            **_money("closing_balance"),
            "transactions": {"type": "array", "items": _ref("StatementTransaction"),
                             "description": "Oldest first; opening + the sum of their amounts = closing."},
            "usage_by_model": {"type": "array", "items": _ref("UsageTotal")},
            "generated_at": _TIMESTAMP,
            "final": {"type": "boolean", "description": "False while the month is still running."},
        }, "One UTC month of an account's ledger."),
    "TransactionList": _list_of("Transaction"),
    "UsageRecordList": _list_of("UsageRecord"),
    "UsageTotalList": _list_of("UsageTotal"),
    "UserList": _list_of("User"),
    "OrganizationList": _list_of("Organization"),
    "MemberList": _list_of("Member"),
    "ApiKeyList": _list_of("ApiKey"),
    "CreateUser": _object([], {
        "external_id": _text(255),
        "email": _EMAIL,
        "name": _text(200),
    }),
    "UpdateUser": {  # PATCH /users/{user_id}: the correction right (privacy_openapi.py)
        "type": "object", "additionalProperties": False, "minProperties": 1,
        "properties": {"email": {"anyOf": [_EMAIL, {"type": "null"}], "description": "null clears it."},
                       "name": {"anyOf": [_text(200), {"type": "null"}], "description": "null clears it."}},
    },
    "CreateOrganization": _object(["name"], {
        "name": _text(200),
        "owner_user_id": {**_ID, "description": "The owner; the caller by default (the superadmin, who owns "
                                                "nothing, must give it: 404 otherwise)."},
    }),
    "AddMember": _object(["user_id"], {
        "user_id": _ID,
        "role": {**_ROLE, "default": "member"},
    }),
    "UpdateMember": _object(["role"], {"role": _ROLE}),
    "UpdateOrganization": _object(["limits"], {"limits": _ORG_LIMITS}),
    "CreateApiKey": {**_object(["name"], {
        "name": _text(200),
        "org_id": {**_ID, "description": "Create an organization key (caller: its admin or owner)."},
        "user_id": {**_ID, "description": "The user whose personal key this is: the caller by default (the "
                                         "superadmin, who has no keys, must give it or `org_id`: 404 otherwise)."},
        "expires_at": {"type": "string", "format": "date-time",
                       "description": "ISO-8601 with a timezone, in the future (409 `expires_at_passed` if not)."},
        "allowed_models": {"type": "array", "minItems": 1, "maxItems": 256, "items": _text(200),
                           "description": "Model aliases the key may use; omit for every model."},
        "limits": {"type": "object", "maxProperties": 32, "propertyNames": _LIMIT_NAME,
                   "additionalProperties": {"oneOf": [
                       {"type": "number", "minimum": 0},
                       {"type": "string", "minLength": 1, "maxLength": 64, "pattern": rf"^{_NO_CONTROL}*$"}]},
                   "description": "Limit overrides read by the limits plugin."},
    }), "not": {"required": ["org_id", "user_id"]},
                     "description": "A personal key (`user_id`) or an organization key (`org_id`), not both."},
}

_SCHEMAS["CreatedApiKey"] = {
    **_SCHEMAS["ApiKey"],
    "required": [*_SCHEMAS["ApiKey"]["required"], "key"],
    "properties": {**_SCHEMAS["ApiKey"]["properties"], "key": {
        "type": "string", "description": "The plaintext key. Shown this once: store it now."}},
    "description": "The new key's metadata and, this once, its plaintext `key`.",
}

# Credits and unapplied payments (superadmin): nexgate_plugins.credits.grants and .payments.
_GRANT_USD = {"type": "string", "pattern": r"^\d{1,6}(\.\d{1,12})?$", "not": {"pattern": r"^0+(\.0+)?$"},
              "description": "A plain decimal amount of US dollars greater than 0 (no exponent), e.g. `10` or "
                             "`2.50`; at most 12 decimals."}
_ADJUST_USD = {"type": "string", "pattern": r"^-?\d{1,6}(\.\d{1,12})?$", "not": {"pattern": r"^-?0+(\.0+)?$"},
               "description": "A plain signed decimal amount of US dollars, not 0, e.g. `-2.50` or `10`."}
_SCHEMAS["CreateGrant"] = _object(["account_id", "amount_usd", "reason"], {
    "account_id": {**_ID, "description": "A user or organization id."},
    "amount_usd": _GRANT_USD,
    "reason": {**_text(500), "description": "Why: shown on the account's statement."},
    "ref": {**_text(200), "description": "Your idempotency reference: the same ref is applied once (again: 200, "
                                         "`applied` false); used before for another account or amount: 409. "
                                         "Grants and adjustments share refs."},
})
_SCHEMAS["CreateAdjustment"] = {**_SCHEMAS["CreateGrant"], "properties": {
    **_SCHEMAS["CreateGrant"]["properties"], "amount_usd": _ADJUST_USD}}
_SCHEMAS["CreditGrant"] = _object(
    ["object", "applied", "account_id", "account_type", "external_id", "reason", "amount_usd", "amount_pico",
     "balance_usd", "balance_pico"], {
        "object": {"type": "string", "enum": ["grant", "adjustment"]},
        "applied": {"type": "boolean", "description": "False: this ref was applied before; nothing changed."},
        "account_id": {"type": "string"}, "account_type": _ACCOUNT_TYPE,
        "external_id": {"type": "string", "description": "The ledger entry's id at source `admin`: `grant:<ref>`."},
        "reason": {"type": "string"}, **_money("amount"), **_money("balance"),
    }, "A grant or adjustment booked in the ledger (kind `grant` or `adjustment`, source `admin`).")
_UNAPPLIED_PROPERTIES: dict[str, Any] = {
    "object": {"const": "unapplied_payment"},
    "source": {"type": "string", "description": "The payment provider, `dodopayments`."},
    "payment_id": {"type": "string"},
    "account_hint": {**_NULLABLE_STRING, "description": "The account the payment's metadata named, if any."},
    **_money("credit"),
    "description": {"type": "string", "description": "What was bought and paid, e.g. `...; paid 10.99 USD`."},
    "reason": {"type": "string", "description": "Why it was not credited (no, unknown or deleted account)."},
    "received_at": _TIMESTAMP,
    "applied_to": {**_NULLABLE_STRING, "description": "The account the operator applied it to; null: still open."},
    "applied_at": _NULLABLE_TIMESTAMP,
}
_SCHEMAS["UnappliedPayment"] = _object(list(_UNAPPLIED_PROPERTIES), _UNAPPLIED_PROPERTIES,
                                       "A payment credited to nobody until the operator applies it.")
_SCHEMAS["UnappliedPaymentList"] = _list_of("UnappliedPayment")
_SCHEMAS["ApplyUnappliedPayment"] = _object(["account_id"], {
    "account_id": {**_ID, "description": "The user or organization to credit (not a deleted one)."}})
_SCHEMAS["AppliedPayment"] = _object([*_UNAPPLIED_PROPERTIES, "applied", "balance_usd", "balance_pico"], {
    **_UNAPPLIED_PROPERTIES, "applied": {"type": "boolean", "description": "False: applied to this account before."},
    **_money("balance")}, "The payment, applied; the account's balance after it.")


_ERRORS = {
    "BadRequest": "Invalid JSON, unknown field, wrong type or value; `param` names the field.",
    "Unauthorized": "No token, or the token is invalid or expired (code `invalid_token`).",
    "Forbidden": "The caller may not do this.",
    "NotFound": "Unknown id, or one the caller may not see.",
    "Conflict": "The change conflicts with existing data (duplicate, last owner).",
    "TooLarge": "The request body is larger than 64 KiB.",
}
_STATUS = {"BadRequest": "400", "Unauthorized": "401", "Forbidden": "403", "NotFound": "404", "Conflict": "409",
           "TooLarge": "413"}


def _json(schema: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _op(operation_id: str, summary: str, ok: tuple[str, str, str], *errors: str,
        body: str | None = None, parameters: list[dict[str, Any]] | None = None,
        description: str | None = None, tag: str | None = None) -> dict[str, Any]:
    status, schema, what = ok
    responses: dict[str, Any] = {status: _json(schema, what)}
    for name in ("BadRequest", "Unauthorized", *errors, *(("TooLarge",) if body else ())):
        responses[_STATUS[name]] = {"$ref": f"#/components/responses/{name}"}
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary, "tags": [tag or operation_id.split("_")[-1]],
                          "responses": responses}
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return op


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _ID}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_PAGE = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Page size."),
    _query("offset", {"type": "integer", "minimum": 0, "maximum": 1_000_000_000, "default": 0}, "Rows to skip."),
]
_INCLUDE_REVOKED = _query("include_revoked", {"type": "boolean", "default": False}, "Also list revoked keys.")
_ACCOUNT = _query("account", _ID, "A user or organization id. Default: the caller's own account (the superadmin, "
                                  "who has none, must give one: 404 otherwise).")
_MOMENT = {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "format": "date"}]}
_PERIOD = [
    _query("since", _MOMENT, "Inclusive. ISO-8601 with a timezone (`2025-01-01T00:00:00Z`), or a date (UTC midnight)."),
    _query("until", _MOMENT, "Exclusive; same format as `since`. Not after `since`: an empty period."),
]
_USAGE_FILTERS = [
    _query("model", _text(200), "Only this model alias."),
    _query("key_id", _ID, "Only requests made with this API key."),
]
_MONEY_ACCESS = ("Your own account; an organization's for its admins and owners (403 for members); any for the "
                 "superadmin. Other users' personal accounts answer 404.")


def _statement_op() -> dict[str, Any]:
    op = _op("get_statements", "A monthly statement, as JSON or a printable HTML page",
             ("200", "Statement", "The statement."), "Forbidden", "NotFound",
             parameters=[{"name": "month", "in": "path", "required": True, "schema": _MONTH,
                          "description": "The UTC calendar month, `YYYY-MM`."},
                         _ACCOUNT,
                         _query("format", {"type": "string", "enum": ["json", "html"]},
                                "Default: html when the Accept header asks for text/html, else json.")],
             description="Opening balance, every transaction of the month (a day's request debits summed into "
                         "one line), closing balance, and usage totals by model. The month in progress is provisional; "
                         "a month that has not begun answers 404 (`month_not_started`). " + _MONEY_ACCESS)
    op["responses"]["200"]["content"]["text/html"] = {"schema": {"type": "string"}}
    return op


_PATHS: dict[str, Any] = {
    "/admin/v1/openapi.json": {"get": {
        "operationId": "get_openapi", "summary": "This document", "tags": ["meta"], "security": [],
        "responses": {"200": {"description": "The OpenAPI document.",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }},
    "/admin/v1/me": {"get": _op("get_me", "Who is calling: user profile and organizations, or the superadmin",
                                ("200", "Caller", "The caller."))},
    "/admin/v1/users": {
        "post": _op("create_users", "Create a user (superadmin)", ("201", "User", "The new user."),
                    "Forbidden", "Conflict", body="CreateUser"),
        "get": _op("list_users", "List users (superadmin)", ("200", "UserList", "Users, oldest first."),
                   "Forbidden", parameters=[*_PAGE, _query("include_deleted", {"type": "boolean", "default": False},
                                                          "Also list soft-deleted users.")]),
    },
    "/admin/v1/users/{user_id}": {
        "get": _op("get_users", "A user (the user themself or the superadmin)", ("200", "User", "The user."),
                   "NotFound", parameters=[_path("user_id")]),
    },
    "/admin/v1/orgs": {
        "post": _op("create_orgs", "Create an organization", ("201", "Organization", "The new organization."),
                    "Forbidden", "NotFound", body="CreateOrganization",
                    description="A user becomes its owner; the superadmin must name the owner."),
        "get": _op("list_orgs", "The caller's organizations (superadmin: all)",
                   ("200", "OrganizationList", "Organizations with the caller's role."), parameters=_PAGE),
    },
    "/admin/v1/orgs/{org_id}": {
        "get": _op("get_orgs", "An organization (its members)", ("200", "Organization", "The organization."),
                   "NotFound", parameters=[_path("org_id")]),
        "patch": _op("update_orgs", "Set or remove an organization's rate-limit overrides (superadmin)",
                     ("200", "Organization", "The organization, with its limits."), "Forbidden", "NotFound",
                     body="UpdateOrganization", parameters=[_path("org_id")],
                     description="Replaces the overrides as a whole; `null` or `{}` removes them. Unknown names "
                                 "are refused with 400. Takes effect at once on every gateway sharing the state "
                                 "store. Members get 403, outsiders 404."),
    },
    "/admin/v1/orgs/{org_id}/members": {
        "get": _op("list_members", "Members (admins and owners)", ("200", "MemberList", "The members."),
                   "Forbidden", "NotFound", parameters=[_path("org_id")]),
        "post": _op("add_members", "Add a member (owners)", ("201", "Member", "The membership."),
                    "Forbidden", "NotFound", "Conflict", body="AddMember", parameters=[_path("org_id")]),
    },
    "/admin/v1/orgs/{org_id}/members/{user_id}": {
        "patch": _op("update_members", "Change a member's role (owners)", ("200", "Member", "The membership."),
                     "Forbidden", "NotFound", "Conflict", body="UpdateMember",
                     parameters=[_path("org_id"), _path("user_id")],
                     description="Demoting the last owner is refused with 409."),
        "delete": _op("remove_members", "Remove a member (owners; a member may leave)",
                      ("200", "MemberDeleted", "Removed; the organization keys the member created are revoked."),
                      "Forbidden", "NotFound", "Conflict", parameters=[_path("org_id"), _path("user_id")],
                      description="Removing the last owner is refused with 409. The personal account stays."),
    },
    "/admin/v1/orgs/{org_id}/keys": {
        "get": _op("list_org_keys", "The organization's keys (admins and owners)",
                   ("200", "ApiKeyList", "Key metadata."), "Forbidden", "NotFound",
                   parameters=[_path("org_id"), _INCLUDE_REVOKED]),
    },
    "/admin/v1/keys": {
        "post": _op("create_keys", "Create an API key", ("201", "CreatedApiKey", "The key, with its plaintext once."),
                    "Forbidden", "NotFound", "Conflict", body="CreateApiKey",
                    description="A personal key of the caller, or an organization key with `org_id`."),
        "get": _op("list_keys", "The caller's personal keys", ("200", "ApiKeyList", "Key metadata."),
                   "NotFound", parameters=[
                       _query("user_id", _ID, "Whose keys: the caller's own (default); any user's for the "
                                              "superadmin, who has none and must give it (404 otherwise)."),
                       _INCLUDE_REVOKED]),
    },
    "/admin/v1/balance": {
        "get": _op("get_balance", "An account's balance", ("200", "Balance", "The balance."), "Forbidden", "NotFound",
                   parameters=[_ACCOUNT], description=_MONEY_ACCESS),
    },
    "/admin/v1/transactions": {
        "get": _op("list_transactions", "An account's ledger, newest first",
                   ("200", "TransactionList", "Ledger entries."), "Forbidden", "NotFound",
                   parameters=[_ACCOUNT, *_PERIOD, *_PAGE], description=_MONEY_ACCESS),
    },
    "/admin/v1/usage": {
        "get": _op("list_usage", "An account's usage records, newest first",
                   ("200", "UsageRecordList", "Usage records (metadata only)."), "Forbidden", "NotFound",
                   parameters=[_ACCOUNT, *_PERIOD, *_USAGE_FILTERS, *_PAGE], description=_MONEY_ACCESS),
    },
    "/admin/v1/usage/totals": {
        "get": _op("get_usage_totals", "An account's usage totals per day, model or key",
                   ("200", "UsageTotalList", "Totals, ordered by group."), "Forbidden", "NotFound",
                   parameters=[_ACCOUNT, *_PERIOD, *_USAGE_FILTERS,
                               _query("group_by", {"type": "string", "enum": ["day", "model", "key"], "default": "day"},
                                      "What to total by: UTC day, model alias, or API key.")],
                   description=_MONEY_ACCESS, tag="usage"),
    },
    "/admin/v1/statements/{month}": {
        "get": _statement_op(),
    },
    "/admin/v1/keys/{key_id}": {
        "get": _op("get_keys", "An API key's metadata", ("200", "ApiKey", "Key metadata."), "Forbidden", "NotFound",
                   parameters=[_path("key_id")]),
        "delete": _op("revoke_keys", "Revoke an API key", ("200", "ApiKey", "The revoked key."),
                      "Forbidden", "NotFound", parameters=[_path("key_id")],
                      description="Takes effect at once on every gateway sharing the state store. "
                                  "Personal keys: their owner; organization keys: its admins and owners."),
    },
}


def _grant_op(operation_id: str, summary: str, body: str, description: str) -> dict[str, Any]:
    op = _op(operation_id, summary, ("201", "CreditGrant", "Booked."), "Forbidden", "NotFound", "Conflict",
             body=body, description=description + " Superadmin only; the same as `nexgate credits grant|adjust`. "
                                                   "404: no such account.", tag="credits")
    op["responses"]["200"] = _json("CreditGrant", "This ref was applied before, to this account: nothing changed.")
    return op


_CREDIT_PATHS: dict[str, Any] = {
    "/admin/v1/credits/grants": {"post": _grant_op(
        "create_grants", "Grant credits to an account (superadmin)", "CreateGrant",
        "Books a positive `grant`; every running gateway's cached balance takes it once.")},
    "/admin/v1/credits/adjustments": {"post": _grant_op(
        "create_adjustments", "Adjust an account's balance up or down (superadmin)", "CreateAdjustment",
        "Books a signed `adjustment` (a correction).")},
    "/admin/v1/payments/unapplied": {"get": _op(
        "list_unapplied_payments", "Payments credited to nobody (superadmin)",
        ("200", "UnappliedPaymentList", "Held payments, oldest first."), "Forbidden",
        parameters=[_query("include_applied", {"type": "boolean", "default": False}, "Also the applied ones."),
                    *_PAGE], tag="payments",
        description="A DodoPayments payment that named no account, or an unknown or deleted one, is held here "
                    "(and counted in the `nexgate_payments_unapplied` metric) until applied.")},
    "/admin/v1/payments/unapplied/{payment_id}/apply": {"post": _op(
        "apply_unapplied_payments", "Credit a held payment to an account, once (superadmin)",
        ("200", "AppliedPayment", "Applied (or applied to this account before)."), "Forbidden", "NotFound",
        "Conflict", body="ApplyUnappliedPayment", parameters=[_path("payment_id")], tag="payments",
        description="404: no such held payment, or the account does not exist or was deleted. 409: applied to "
                    "another account already. The same as `nexgate payments apply`.")},
}


@cache
def _document() -> dict[str, Any]:
    paths = copy.deepcopy({**_PATHS, **_CREDIT_PATHS})
    for path, operations in OPENAPI_PATHS.items():
        paths.setdefault(path, {}).update(operations)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "NexGate admin API",
            "version": __version__,
            "description": "Users, organizations, members, API keys, balances, usage and statements of a NexGate "
                           "gateway. Authenticate with "
                           "the bootstrap admin token or a Clerk session token as a bearer token.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "The admin token (its SHA-256 is `auth.admin_token_sha256`) or a Clerk session JWT.",
            }},
            "schemas": {**_SCHEMAS, **OPENAPI_SCHEMAS},
            "responses": {name: _json("Error", text) for name, text in _ERRORS.items()},
        },
    }


def build_openapi() -> dict[str, Any]:
    """A fresh copy of the document (callers may modify it)."""
    return copy.deepcopy(_document())
