"""The privacy endpoints' part of the admin API's OpenAPI document (merged by ``openapi``)."""

from __future__ import annotations

from typing import Any

from .http import ID_PATTERN

EXPORT_VERSION = 1
"""The version of the export document's shape."""

# ------------------------------------------------------------------- OpenAPI

_NULLABLE_STRING = {"type": ["string", "null"]}
_TIMESTAMP = {"type": "string", "format": "date-time"}
_NULLABLE_TIMESTAMP = {"type": ["string", "null"], "format": "date-time"}
_PICO = {"type": "integer", "description": "pico-USD (1e-12 USD)."}
_NULLABLE_PICO = {"type": ["integer", "null"], "description": "pico-USD (1e-12 USD)."}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "required": list(properties), "properties": properties,
                              "additionalProperties": False}
    if description:
        schema["description"] = description
    return schema


def _responses(ok: dict[str, Any], *errors: str) -> dict[str, Any]:
    status = {"BadRequest": "400", "Unauthorized": "401", "Forbidden": "403", "NotFound": "404", "Conflict": "409",
              "TooLarge": "413"}
    responses = {"200": ok}
    for name in ("BadRequest", "Unauthorized", *errors):
        responses[status[name]] = {"$ref": f"#/components/responses/{name}"}
    return responses


_USER_ID = {"name": "user_id", "in": "path", "required": True,
            "schema": {"type": "string", "pattern": ID_PATTERN}}

OPENAPI_SCHEMAS: dict[str, Any] = {
    "UserDeleted": _object({
        "object": {"const": "user.deleted"},
        "id": {"type": "string"},
        "deleted": {"const": True},
        "deleted_at": _TIMESTAMP,
        "already_deleted": {"type": "boolean", "description": "True when an earlier call deleted it: nothing changed."},
        "revoked_key_ids": {"type": "array", "items": {"type": "string"},
                            "description": "Personal keys and organization keys the user created, revoked now."},
        "left_org_ids": {"type": "array", "items": {"type": "string"}},
        "cleared_ip_records": {"type": "integer", "description": "Usage records whose client IP was cleared."},
    }, "The account is anonymized: its usage, ledger and balance stay under the anonymous id."),
    "ExportMembership": _object({
        "org_id": {"type": "string"}, "org_name": {"type": "string"},
        "role": {"type": "string", "enum": ["owner", "admin", "member"]}, "created_at": _NULLABLE_TIMESTAMP,
    }),
    "ExportUsageRecord": _object({
        "request_id": {"type": "string"}, "ts": _TIMESTAMP, "endpoint": {"type": "string"},
        "model": _NULLABLE_STRING, "provider": _NULLABLE_STRING, "upstream_model": _NULLABLE_STRING,
        "account_id": _NULLABLE_STRING, "org_id": _NULLABLE_STRING, "key_id": _NULLABLE_STRING,
        "key_prefix": _NULLABLE_STRING, "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"}, "cached_tokens": {"type": "integer"},
        "usage_estimated": {"type": "boolean"}, "estimated_cost_pico": _NULLABLE_PICO,
        "actual_cost_pico": _NULLABLE_PICO, "latency_ms": {"type": "integer"}, "status": {"type": "integer"},
        "error_code": _NULLABLE_STRING, "stream": {"type": "boolean"},
        "client_ip": {**_NULLABLE_STRING, "description": "Cleared after privacy.ip_retention_days."},
        "attempts": {"type": "integer"},
    }, "Metadata of one request: there is no content."),
    "ExportLedgerEntry": _object({
        "id": {"type": "integer"}, "account_id": {"type": "string"},
        "kind": {"type": "string", "enum": ["payment", "debit", "refund", "dispute", "grant", "adjustment"]},
        "amount_pico": _PICO, "source": {"type": "string"}, "external_id": {"type": "string"},
        "request_id": _NULLABLE_STRING, "description": _NULLABLE_STRING, "created_at": _TIMESTAMP,
    }),
    "ExportUsageDay": _object({
        "object": {"const": "usage.daily_rollup"}, "day": {"type": "string", "format": "date"},
        "model": _NULLABLE_STRING, "requests": {"type": "integer"}, "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"}, "cost_pico": _PICO,
    }, "A UTC day's totals per model whose request rows usage.rollup_after_days deleted."),
    "UserExport": _object({
        "object": {"const": "user.export"},
        "version": {"const": EXPORT_VERSION},
        "exported_at": _TIMESTAMP,
        "user": _ref("User"),
        "balance": _object({"account_id": {"type": "string"}, "balance_pico": _PICO,
                            "balance_usd": {"type": "string", "description": "The same, as a decimal string."}}),
        "api_keys": {"type": "array", "items": _ref("ApiKey"), "description": "Personal keys, revoked ones too."},
        "memberships": {"type": "array", "items": _ref("ExportMembership")},
        "usage": {"type": "array", "items": _ref("ExportUsageRecord"), "description": "Oldest first."},
        "usage_daily": {"type": "array", "items": _ref("ExportUsageDay"),
                        "description": "Rolled-up days (no request rows any more), oldest first."},
        "ledger": {"type": "array", "items": _ref("ExportLedgerEntry"), "description": "Oldest first."},
    }, "Everything stored about a user's personal account."),
}
"""Schemas the paths below refer to, for ``components.schemas`` of the admin document."""

_SUSPENSION = {"type": "object", "required": ["object", "id", "suspended_at", "changed"],
               "properties": {"object": {"const": "user"}, "id": {"type": "string"},
                              "suspended_at": _NULLABLE_TIMESTAMP, "changed": {"type": "boolean"}}}

OPENAPI_PATHS: dict[str, Any] = {
    "/admin/v1/users/{user_id}": {
        "patch": {
            "operationId": "update_users", "summary": "Correct a user's email or name (the user themself or the "
                                                      "superadmin)",
            "tags": ["users"], "parameters": [_USER_ID],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("UpdateUser")}}},
            "description": "Sets the fields given (null clears one); the old values are overwritten in the store. "
                           "A Clerk user's email is refreshed from the session token at sign-in as well.",
            "responses": _responses({"description": "The corrected user.", "content": {"application/json": {
                "schema": _ref("User")}}}, "NotFound", "TooLarge"),
        },
        "delete": {
            "operationId": "delete_users", "summary": "Delete an account (the user themself or the superadmin)",
            "tags": ["users"], "parameters": [_USER_ID],
            "description": "Revokes the user's personal keys and the organization keys they created (at once, on "
                           "every gateway), ends their memberships, clears email, name, external id and the client "
                           "IPs of their usage. Usage, ledger and balance stay under the anonymous id. Idempotent: "
                           "a second call answers 200 with `already_deleted: true`. 409 `last_owner` while the "
                           "user is the last owner of an organization; nothing is changed then.",
            "responses": _responses({"description": "Deleted.", "content": {"application/json": {
                "schema": _ref("UserDeleted")}}}, "NotFound", "Conflict"),
        },
    },
    "/admin/v1/users/{user_id}/suspend": {
        "post": {
            "operationId": "suspend_users", "summary": "Suspend an account: restriction of processing (superadmin)",
            "tags": ["users"], "parameters": [_USER_ID],
            "description": "The user's personal keys are refused 403 `account_suspended` on every gateway within a "
                           "second and the user cannot create keys; nothing is deleted. Idempotent "
                           "(`changed: false`). Lift it with `/unsuspend`.",
            "responses": _responses({"description": "Suspended.", "content": {"application/json": {
                "schema": _SUSPENSION}}}, "Forbidden", "NotFound"),
        },
    },
    "/admin/v1/users/{user_id}/unsuspend": {
        "post": {
            "operationId": "unsuspend_users", "summary": "Lift an account's suspension (superadmin)",
            "tags": ["users"], "parameters": [_USER_ID],
            "description": "The user's keys work again at once, on every gateway. Idempotent (`changed: false`).",
            "responses": _responses({"description": "Not suspended any more.", "content": {"application/json": {
                "schema": _SUSPENSION}}}, "Forbidden", "NotFound"),
        },
    },
    "/admin/v1/users/{user_id}/export": {
        "get": {
            "operationId": "export_users", "summary": "Export an account's data (the user themself or the superadmin)",
            "tags": ["users"],
            "parameters": [_USER_ID, {"name": "format", "in": "query", "required": False,
                                      "schema": {"type": "string", "enum": ["json", "csv"], "default": "json"},
                                      "description": "json: one document; csv: a zip of one CSV per section."}],
            "description": "Profile, balance, personal keys (metadata only), memberships, usage records and ledger "
                           "entries of the user's personal account, oldest first. The CSV zip holds user.csv, "
                           "balance.csv, api_keys.csv, memberships.csv, usage.csv, usage_daily.csv and ledger.csv "
                           "with the JSON's columns.",
            "responses": _responses({"description": "The export, as an attachment.", "content": {
                "application/json": {"schema": _ref("UserExport")},
                "application/zip": {"schema": {"type": "string", "contentMediaType": "application/zip"}},
            }}, "NotFound"),
        },
    },
}
"""Path items to merge into the admin API's OpenAPI document (``paths``)."""
