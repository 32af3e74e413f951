"""The ``auth:`` section: key cache, bcrypt cost, the admin token and Clerk."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .clerk import ClerkVerifier
from nexgate_proxy.config import Config, ConfigReader, ConfigSection
from nexgate_proxy.keys import DEFAULT_BCRYPT_ROUNDS


# ------------------------------------------------------------------ settings


@dataclass(frozen=True, slots=True)
class AuthSettings:
    required: bool = True
    """False lets requests without a key through anonymously (the offline demo)."""
    cache_ttl: float = 60.0
    negative_ttl: float = 10.0
    cache_size: int = 100_000
    bcrypt_rounds: int = DEFAULT_BCRYPT_ROUNDS
    admin_token_sha256: str | None = field(default=None, repr=False)
    """SHA-256 (hex) of the bootstrap admin token, for self-hosters without Clerk."""
    clerk: ClerkVerifier | None = None

    def is_admin_token(self, token: str) -> bool:
        if not self.admin_token_sha256:
            return False
        digest = hashlib.sha256(token.encode()).hexdigest()
        return hmac.compare_digest(digest, self.admin_token_sha256)


def parse_auth_settings(r: ConfigReader, s: dict[str, Any], config: Config) -> AuthSettings:
    p = "auth"
    d = AuthSettings()
    token_hash = r.value(s, "admin_token_sha256", p, str, "") or None
    if token_hash is not None:
        token_hash = token_hash.lower()
        if len(token_hash) != 64 or any(c not in "0123456789abcdef" for c in token_hash):
            r.problem(f"{p}.admin_token_sha256", "must be the 64-hex-digit SHA-256 of the admin token "
                      "(e.g. `printf %s \"$TOKEN\" | sha256sum`)")
            token_hash = None
    return AuthSettings(
        required=r.value(s, "required", p, bool, d.required),
        cache_ttl=r.value(s, "cache_ttl", p, float, d.cache_ttl, _non_negative),
        negative_ttl=r.value(s, "negative_ttl", p, float, d.negative_ttl, _non_negative),
        cache_size=r.value(s, "cache_size", p, int, d.cache_size, lambda v: None if v > 0 else "must be > 0"),
        bcrypt_rounds=r.value(s, "bcrypt_rounds", p, int, d.bcrypt_rounds,
                              lambda v: None if 4 <= v <= 31 else "must be between 4 and 31"),
        admin_token_sha256=token_hash,
        clerk=_clerk(r, s.get("clerk"), f"{p}.clerk"),
    )


AUTH_SECTION = ConfigSection("auth", parse_auth_settings, (
    "required", "cache_ttl", "negative_ttl", "cache_size", "bcrypt_rounds", "admin_token_sha256", "clerk"),
    "API keys: the verified-key cache, the bcrypt cost, the admin token and Clerk sign-in.")
"""The ``auth:`` section; other plugins (admin) read ``config.section(AUTH_SECTION)`` too."""


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must not be negative"


def _clerk(r: ConfigReader, raw: Any, p: str) -> ClerkVerifier | None:
    if raw is None:
        return None
    s = r.mapping(raw, p, ("issuer", "public_key", "public_key_file", "jwks_file", "authorized_parties", "leeway",
                           "store_name"))
    issuer = r.value(s, "issuer", p, str, "")
    if not issuer:
        r.problem(f"{p}.issuer", "required: your Clerk Frontend API URL, e.g. https://clerk.example.com")
    pem = r.value(s, "public_key", p, str, None)
    pem_file = r.value(s, "public_key_file", p, str, None)
    jwks_file = r.value(s, "jwks_file", p, str, None)
    if pem_file:
        try:
            pem = Path(pem_file).read_text()
        except OSError as exc:
            r.problem(f"{p}.public_key_file", f"cannot read {pem_file!r}: {exc.strerror}")
    if not (pem or jwks_file):
        r.problem(p, "give public_key, public_key_file or jwks_file (Clerk's JWT public key; no network call is made)")
    if not issuer or not (pem or jwks_file):
        return None
    try:
        return ClerkVerifier(public_key_pem=pem, jwks_path=jwks_file, issuer=issuer,
                             authorized_parties=tuple(r.value(s, "authorized_parties", p, list, [])),
                             leeway=r.value(s, "leeway", p, float, 5.0),
                             store_name=r.value(s, "store_name", p, bool, False))
    except Exception as exc:  # a bad key file is a config problem, named here
        r.problem(p, f"cannot load the Clerk key: {exc}")
        return None


# -------------------------------------------------------------------- cache


