"""Log hygiene: keys, tokens and request data never reach a log line, at any level."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import nexgate_plugins.admin as admin_plugin
import nexgate_plugins.redaction as redaction
from nexgate_proxy import cli, logscrub
from nexgate_proxy.context import RequestContext
from nexgate_proxy.keys import generate_key
from nexgate_proxy.testing import PROVIDER_KEY, FakeUpstream, Gateway, gateway_config
from tests.jwt_signing import b64url_json

PLUGINS = [redaction, admin_plugin]
log = logging.getLogger("nexgate.test.logscrub")


@pytest.fixture
def scrubbed(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog at DEBUG on the root logger, with the scrubber on its handler."""
    caplog.set_level(logging.DEBUG)
    logscrub.install()
    assert logscrub.installed_on(caplog.handler)
    return caplog


def text_of(caplog: pytest.LogCaptureFixture) -> str:
    """Everything a handler could write: formatted text and every record attribute."""
    parts = [caplog.text]
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(str(record.exc_text or ""))
        parts.append(repr({k: v for k, v in record.__dict__.items() if k not in ("exc_info",)}))
    return "\n".join(parts)


def jwt() -> str:
    return f"{b64url_json({'alg': 'RS256', 'typ': 'JWT'})}.{b64url_json({'sub': 'user_1', 'exp': 1})}.c2lnbmF0dXJlX2J5dGVz"


# ------------------------------------------------------------------ patterns


def test_every_kind_of_secret_is_masked() -> None:
    key = generate_key()
    token = jwt()
    scrub = logscrub.get_filter()
    cases = {
        f"key {key.plaintext} used": (key.plaintext, key.prefix),
        f"Authorization: Bearer {token}": (token, "Bearer [REDACTED]"),
        "bearer opaque-admin-token-123456": ("opaque-admin-token-123456", None),
        "provider sk-proj-abcdefghijklmnop and sk-ant-api03-xyz_123456": ("abcdefghijklmnop", None),
        f"session {token} expired": (token, None),
        "GET /v1/models?api_key=hunter2hunter2&x=1": ("hunter2hunter2", "&x=1"),
        'x-api-key: "abcdef123456"': ("abcdef123456", None),
        "store postgresql://nexgate:pa55word@db:5432/nexgate": ("pa55word", "db:5432/nexgate"),
        "state redis://:redispass@cache:6379/0": ("redispass", "cache:6379/0"),
        "malformed ngk_" + "A" * 40: ("A" * 40, None),
    }
    for text, (secret, kept) in cases.items():
        out = scrub.scrub(text)
        assert secret not in out, (text, out)
        assert "[REDACTED]" in out
        if kept:
            assert kept in out, (text, out)
        assert scrub.scrub(out) == out  # idempotent


def test_ordinary_text_is_left_alone() -> None:
    scrub = logscrub.get_filter()
    for text in ["usage record req_0123456789abcdef01234567 dropped by guard 'x'",
                 "API key key_abcdefghijklmnopqrstuvwxyz created (ngk_ABCDEFGHIJKL)",
                 "prompt_tokens=11 completion_tokens=7 tokens: 18",
                 "issuer https://clerk.example.com/.well-known",
                 "module nexgate_plugins.admin_api.handlers failed", "invalid token (expired)",
                 "listening on http://127.0.0.1:8080", "applied store migrations [1, 2]"]:
        assert scrub.scrub(text) == text


def test_configured_secrets_are_masked_wherever_they_appear() -> None:
    scrub = logscrub.install(["prov-secret-0987654321", "short", PROVIDER_KEY])
    assert scrub.scrub("calling upstream with prov-secret-0987654321!") == "calling upstream with [REDACTED]!"
    assert scrub.scrub("a short word") == "a short word"  # too short to mask safely
    assert scrub.scrub(f"x{PROVIDER_KEY}x") == "x[REDACTED]x"  # glued to other text: no pattern would see it


# ------------------------------------------------------------------- records


def test_arguments_that_may_hold_request_data_are_withheld(scrubbed: pytest.LogCaptureFixture) -> None:
    canary = "CANARY-args-5e1f"
    body = {"model": "gpt-test", "messages": [{"role": "user", "content": canary}]}
    ctx = RequestContext(request_id="req_1", endpoint="chat.completions", api_format="openai",
                         request=None, app=None, client_ip="127.0.0.1", body=body)  # type: ignore[arg-type]
    log.debug("body %s", body)
    log.info("ctx %r", ctx)
    log.warning("raw %s / %s", canary.encode(), bytearray(canary.encode()))
    log.error("tuple %s, ids %s, counts %s", ("a", canary), ["key_a", "key_b"], [1, 2, 3])
    log.info("mapping %(what)s", {"what": body})
    log.info(body)  # a dict as the message itself
    log.error("failed: %s", ValueError(f"bad value {canary}"))
    messages = [r.getMessage() for r in scrubbed.records]
    assert messages == [
        "body <dict withheld>", "ctx <RequestContext>",
        f"raw <{len(canary)} bytes withheld> / <{len(canary)} bytes withheld>",
        f"tuple ('a', '{canary}'), ids ['key_a', 'key_b'], counts [1, 2, 3]",  # flat lists of plain values
        "mapping <dict withheld>", "<dict withheld>", "failed: ValueError",
    ]
    # Strings are the caller's responsibility (flat strings only); every container of content is withheld.
    assert "\n".join(messages).count(canary) == 1


def test_tracebacks_keep_frames_and_types_not_messages(scrubbed: pytest.LogCaptureFixture) -> None:
    canary = "CANARY-trace-77aa"

    def parse(raw: str) -> Any:
        return json.loads(raw)

    try:
        try:
            parse(canary)
        except ValueError as exc:
            raise KeyError(f"no field in {canary}") from exc
    except KeyError:
        log.exception("handler failed")
    try:
        raise ConnectionRefusedError(111, f"Connect call failed postgresql://u:{canary}@db")
    except OSError:
        log.error("store unreachable", exc_info=True)
    text = text_of(scrubbed)
    assert canary not in text
    assert "Traceback (most recent call last)" in text and "in parse" in text and "json.loads(raw)" in text
    assert "json.decoder.JSONDecodeError: [message withheld" in text
    assert "The above exception was the direct cause" in text and "KeyError: [message withheld" in text
    assert "ConnectionRefusedError: [Errno 111] Connect call failed postgresql://[REDACTED]@db" in text
    assert all(r.exc_info is None for r in scrubbed.records)  # later handlers cannot re-format the original


def test_extra_attributes_and_stack_info_are_scrubbed(scrubbed: pytest.LogCaptureFixture) -> None:
    key = generate_key().plaintext
    log.info("access", extra={"first_request_line": f"GET /v1/models?key={key} HTTP/1.1",
                              "request_header": {"Authorization": f"Bearer {key}"}, "body": b"raw"},
             stack_info=True)
    record = scrubbed.records[-1]
    assert key not in text_of(scrubbed)
    assert record.first_request_line.endswith("_[REDACTED] HTTP/1.1")  # type: ignore[attr-defined]
    assert record.request_header == {"Authorization": "Bearer [REDACTED]"}  # type: ignore[attr-defined]
    assert record.body == "<3 bytes withheld>"  # type: ignore[attr-defined]


def test_debug_level_changes_nothing_and_messages_are_bounded(scrubbed: pytest.LogCaptureFixture) -> None:
    key = generate_key().plaintext
    logging.getLogger("aiohttp.server").debug("debug detail %s", key)
    logging.getLogger("aiohttp.access").debug("x" * 20000)
    assert key not in text_of(scrubbed)
    assert len(scrubbed.records[-1].getMessage()) < 8300


def test_a_scrubber_failure_replaces_the_record(scrubbed: pytest.LogCaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(text: str) -> str:
        raise RuntimeError("boom")

    failed = logscrub.STATS["failed"]
    monkeypatch.setattr(logscrub.get_filter(), "scrub", broken)
    log.error("secret %s", "ngk_ABCDEFGHIJKL_" + "s" * 40, extra={"secret_extra": "sk-abcdefghijkl"})
    monkeypatch.undo()
    record = scrubbed.records[-1]
    assert record.getMessage() == "log record withheld: the log scrubber failed on it (RuntimeError)"
    assert not hasattr(record, "secret_extra")
    assert logscrub.STATS["failed"] == failed + 1


def test_install_is_idempotent_and_reaches_every_handler() -> None:
    root = logging.getLogger()
    own = logging.StreamHandler()
    named = logging.getLogger("nexgate.test.own_handler")
    named_handler = logging.StreamHandler()
    root.addHandler(own)
    named.addHandler(named_handler)
    try:
        first = logscrub.install()
        second = logscrub.install(["another-secret-123"])
        assert first is second
        for handler in [own, named_handler, *root.handlers, logging.lastResort]:
            assert handler is not None
            assert [f for f in handler.filters if isinstance(f, logscrub.ScrubFilter)] == [first]
    finally:
        root.removeHandler(own)
        named.removeHandler(named_handler)


def test_the_admin_cli_installs_the_scrubber(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    fresh = logging.StreamHandler()
    root.addHandler(fresh)
    try:
        assert cli.main(["db", "migrate", "--storage-url", f"sqlite:///{tmp_path}/cli.db"]) == 0
        assert logscrub.installed_on(fresh)
    finally:
        root.removeHandler(fresh)


# --------------------------------------------------------------- the gateway


async def test_the_gateway_installs_it_and_access_logs_are_clean(
        upstream: FakeUpstream, start_gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gw: Gateway = await start_gateway(gateway_config(upstream), plugins=PLUGINS)
    assert logscrub.installed_on(caplog.handler)
    assert PROVIDER_KEY in logscrub.get_filter()._secrets
    async with aiohttp.ClientSession() as session:
        # A client that puts its key in the URL: the access log line is written without the query.
        async with session.get(f"{gw.url}/v1/models?api_key={gw.api_key}",
                               headers={"Authorization": f"Bearer {gw.api_key}"}) as resp:
            assert resp.status == 200
    await asyncio.sleep(0.05)
    access = [r for r in caplog.records if r.name == "aiohttp.access"]
    assert access, "the test runner logs access lines"
    assert any(r.getMessage().startswith("GET /v1/models 200") for r in access)
    assert not any("api_key" in r.getMessage() for r in access)
    assert gw.api_key not in text_of(caplog)
    assert gw.api_key.split("_")[2] not in text_of(caplog)
