"""Client IPs in log lines: a keyed hash, never the address (see docs/privacy.md, "Logs").

``ip_tag("198.51.100.7")`` is ``ip~`` + 12 hex digits of HMAC-SHA256 under a random key that lives
only in this process's memory and is replaced every rotation period (``privacy.ip_retention_days``,
set by the redaction plugin; 30 days by default, an hour when it is 0). Within one period and one
process the same client gets the same tag, so an operator can follow one abuser through the log;
the tag cannot be turned back into the address (the key is never written anywhere), and tags of
different periods or processes cannot be linked. Stored IPs (usage records) follow the same
retention; the log keeps no IP to outlive it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

DEFAULT_PERIOD_SECONDS = 30 * 86400
MIN_PERIOD_SECONDS = 3600

_period = DEFAULT_PERIOD_SECONDS
_epoch = -1
_key = b""


def set_rotation(days: int) -> None:
    """Rotate the key every ``days`` (the IP retention); 0 means hourly. Takes effect at once."""
    global _period, _epoch
    _period = max(MIN_PERIOD_SECONDS, int(days) * 86400)
    _epoch = -1


def ip_tag(ip: str | None) -> str:
    """The log form of a client IP (or of a rate-limit subject such as ``ip:2001:db8::/64``)."""
    global _epoch, _key
    if not ip:
        return "ip~unknown"
    epoch = int(time.time() // _period)
    if epoch != _epoch:
        _key, _epoch = secrets.token_bytes(32), epoch
    return "ip~" + hmac.new(_key, ip.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:12]
