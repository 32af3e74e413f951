"""The outbox's line format: the JSON encoder's bytes, whichever way a row is written."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from nexgate_plugins.usage_log.outbox import decode_row, encode_row
from nexgate_proxy.records import UsageRecord

ROW = UsageRecord("req_0123456789abcdef00000001", datetime.now(UTC), "chat.completions", "bench-model", "fake",
                  "upstream-model", "usr_abc", "org_1", "key_abc", 'ngk_"é', 12, 30, 4, False, 1234, 1000, 3, 200,
                  None, True, "203.0.113.9", 1)


@pytest.mark.parametrize("row", [
    ROW,
    ROW._replace(model=None, provider=None, upstream_model=None, account_id=None, org_id=None, key_id=None,
                 key_prefix=None, client_ip=None, error_code="upstream_timeout", usage_estimated=True, stream=False),
    ROW._replace(estimated_cost_pico=None, actual_cost_pico=None, attempts=0, status=499),
    ROW._replace(prompt_tokens=True),  # not what the guard lets through: the encoder writes it
    ROW._replace(model=7),
    ROW._replace(ts=datetime(2026, 1, 2, 3, 4, 5, 678901, UTC)),
])
def test_a_row_is_written_as_the_json_encoder_writes_it(row: UsageRecord) -> None:
    expected = json.dumps([row[0], row[1].timestamp(), *row[2:]], separators=(",", ":")).encode() + b"\n"
    assert encode_row(row) == expected
    assert decode_row(encode_row(row)) == row._replace(ts=datetime.fromtimestamp(row.ts.timestamp(), UTC))
