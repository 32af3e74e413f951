"""Verify Clerk session tokens (RS256 JWTs) offline, with `cryptography` only.

Clerk signs session tokens with an RSA key whose public half is published as a
PEM ("JWT public key" in the dashboard) and as a JWKS. Verifying against a
local copy means no network call per request and no dependency on Clerk being
up. Only RS256 is accepted: the algorithm is fixed by configuration, never
chosen by the token, so `none` and HS256-with-the-public-key tricks cannot work.

What NexGate keeps of a verified token (``profile_claims``): the user id (``sub``) and the
``email`` claim, as the privacy policy says Clerk gives it; the ``name`` claim only when the
operator sets ``auth.clerk.store_name: true``. The admin API refreshes a changed email (and
name, when kept) from the token at every sign-in.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

MAX_TOKEN_BYTES = 8 * 1024
DEFAULT_LEEWAY_SECONDS = 5.0
MIN_RSA_KEY_BITS = 2048
_ALGORITHM = "RS256"

_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")

REASONS = frozenset({
    "malformed", "bad_signature", "expired", "not_yet_valid", "wrong_issuer",
    "unauthorized_party", "unsupported_alg", "unknown_kid",
})


class JWTError(Exception):
    """A token was refused. ``reason`` is short and safe to log; the token is never included."""

    def __init__(self, reason: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown JWT error reason: {reason!r}")
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ClerkIdentity:
    user_id: str
    session_id: str | None
    org_id: str | None
    org_role: str | None  # "admin", "member", ... without Clerk's "org:" prefix
    org_slug: str | None
    claims: Mapping[str, Any] = field(repr=False)


def _b64url_decode(segment: str) -> bytes:
    """Strict base64url: URL alphabet, no padding, canonical (one encoding per value)."""
    if len(segment) % 4 == 1 or _BASE64URL.fullmatch(segment) is None:
        raise JWTError("malformed")
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise JWTError("malformed") from None
    # Non-zero spare bits would let several strings carry the same signature.
    if base64.urlsafe_b64encode(decoded).rstrip(b"=").decode("ascii") != segment:
        raise JWTError("malformed")
    return decoded


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            # Parsers disagree on which duplicate wins; refuse rather than guess.
            raise JWTError("malformed")
        result[key] = value
    return result


def _reject_constant(_: str) -> Any:
    raise JWTError("malformed")  # NaN / Infinity are not JSON


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise JWTError("malformed") from None
    if not isinstance(value, dict):
        raise JWTError("malformed")
    return value


def _b64url_uint(value: Any) -> int:
    if not isinstance(value, str) or not value:
        raise ValueError("JWKS: RSA 'n' and 'e' must be base64url strings")
    try:
        return int.from_bytes(_b64url_decode(value), "big")
    except JWTError:
        raise ValueError("JWKS: RSA 'n' or 'e' is not valid base64url") from None


def _check_key_size(key: rsa.RSAPublicKey) -> rsa.RSAPublicKey:
    if key.key_size < MIN_RSA_KEY_BITS:
        raise ValueError(f"RSA key is {key.key_size} bits; at least {MIN_RSA_KEY_BITS} required")
    return key


def load_pem_public_key(pem: str | bytes) -> rsa.RSAPublicKey:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"Clerk public key is not a valid PEM public key: {exc}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("Clerk public key must be an RSA key")
    return _check_key_size(key)


def load_jwks(jwks: Mapping[str, Any] | str | bytes) -> dict[str, rsa.RSAPublicKey]:
    """RSA signing keys of a JWKS by ``kid``. Keys that are not RSA signing keys are skipped."""
    document = json.loads(jwks) if isinstance(jwks, (str, bytes)) else jwks
    entries = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError("JWKS must be an object with a 'keys' list")
    keys: dict[str, rsa.RSAPublicKey] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or entry.get("kty") != "RSA":
            continue
        if entry.get("use", "sig") != "sig" or entry.get("alg", _ALGORITHM) != _ALGORITHM:
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ValueError("JWKS: every RSA key needs a 'kid'")
        if kid in keys:
            raise ValueError(f"JWKS: duplicate kid {kid!r}")
        numbers = rsa.RSAPublicNumbers(_b64url_uint(entry.get("e")), _b64url_uint(entry.get("n")))
        keys[kid] = _check_key_size(numbers.public_key())
    if not keys:
        raise ValueError("JWKS holds no RSA signing key")
    return keys


def _normalise_role(role: Any) -> str | None:
    if not isinstance(role, str) or not role:
        return None
    return role.removeprefix("org:") or None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _org_claims(claims: Mapping[str, Any]) -> tuple[str | None, str | None, str | None]:
    """(org_id, role, slug) from session token v2 (``o``) or v1 (``org_*``) claims."""
    org = claims.get("o")
    if isinstance(org, Mapping):
        return _optional_str(org.get("id")), _normalise_role(org.get("rol")), _optional_str(org.get("slg"))
    return (
        _optional_str(claims.get("org_id")),
        _normalise_role(claims.get("org_role")),
        _optional_str(claims.get("org_slug")),
    )


_MAX_TIME = 2**53
"""Larger (or NaN/infinite, which compare false) is no time a real token carries."""


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int subclass; `"exp": true` is not a time. JSON's 1e400 parses to infinity (a
    # token that never expires) and 10**400 does not fit a float: both are malformed, not a 500.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -_MAX_TIME <= value <= _MAX_TIME:
        raise JWTError("malformed")
    return float(value)


class ClerkVerifier:
    """Verifies Clerk session tokens against keys loaded once, at construction."""

    def __init__(
        self,
        public_key_pem: str | bytes | None = None,
        jwks_path: str | Path | None = None,
        jwks: Mapping[str, Any] | str | bytes | None = None,
        *,
        issuer: str,
        authorized_parties: Iterable[str] = (),
        leeway: float = DEFAULT_LEEWAY_SECONDS,
        store_name: bool = False,
    ) -> None:
        if not isinstance(issuer, str) or not issuer.strip():
            raise ValueError("Clerk issuer is required (e.g. https://clerk.example.com)")
        if leeway < 0:
            raise ValueError("leeway must not be negative")
        self._pem_key = load_pem_public_key(public_key_pem) if public_key_pem is not None else None
        self._jwks_keys: dict[str, rsa.RSAPublicKey] = {}
        if jwks_path is not None:
            self._jwks_keys.update(load_jwks(Path(jwks_path).read_bytes()))
        if jwks is not None:
            self._jwks_keys.update(load_jwks(jwks))
        if self._pem_key is None and not self._jwks_keys:
            raise ValueError("ClerkVerifier needs public_key_pem, jwks_path or jwks")
        self.issuer = issuer.strip().rstrip("/")
        self.authorized_parties = frozenset(p.strip().rstrip("/") for p in authorized_parties if p.strip())
        self.leeway = float(leeway)
        self.store_name = bool(store_name)
        """Keep the ``name`` claim too (``auth.clerk.store_name``); off: only the user id and email."""

    def profile_claims(self, identity: ClerkIdentity) -> dict[str, Any]:
        """The profile claims NexGate may store: ``email``, and ``name`` only with ``store_name``."""
        wanted = ("email", "name") if self.store_name else ("email",)
        return {claim: identity.claims[claim] for claim in wanted if claim in identity.claims}

    def _key_for(self, kid: Any) -> rsa.RSAPublicKey:
        if kid is not None and not isinstance(kid, str):
            raise JWTError("malformed")
        if kid is not None and kid in self._jwks_keys:
            return self._jwks_keys[kid]
        # The dashboard PEM carries no kid, so it answers for any token the JWKS does not.
        if self._pem_key is not None:
            return self._pem_key
        if kid is None and len(self._jwks_keys) == 1:
            return next(iter(self._jwks_keys.values()))
        raise JWTError("unknown_kid")

    def verify(self, token: str, *, now: float | None = None) -> ClerkIdentity:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise JWTError("malformed")
        parts = token.split(".")
        if len(parts) != 3 or not all(parts):
            raise JWTError("malformed")
        header_b64, payload_b64, signature_b64 = parts

        header = _json_object(_b64url_decode(header_b64))
        if header.get("alg") != _ALGORITHM:
            raise JWTError("unsupported_alg")
        # RFC 7515 4.1.11: extensions we do not understand must be rejected.
        if "crit" in header:
            raise JWTError("malformed")
        key = self._key_for(header.get("kid"))

        signature = _b64url_decode(signature_b64)
        try:
            key.verify(signature, f"{header_b64}.{payload_b64}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise JWTError("bad_signature") from None

        # Claims are only read once the signature is known good.
        claims = _json_object(_b64url_decode(payload_b64))
        self._check_times(claims, time.time() if now is None else now)
        if claims.get("iss") != self.issuer:
            raise JWTError("wrong_issuer")
        if self.authorized_parties and claims.get("azp") not in self.authorized_parties:
            raise JWTError("unauthorized_party")
        user_id = claims.get("sub")
        if not isinstance(user_id, str) or not user_id:
            raise JWTError("malformed")

        org_id, org_role, org_slug = _org_claims(claims)
        return ClerkIdentity(
            user_id=user_id,
            session_id=_optional_str(claims.get("sid")),
            org_id=org_id,
            org_role=org_role,
            org_slug=org_slug,
            claims=MappingProxyType(claims),
        )

    def _check_times(self, claims: Mapping[str, Any], now: float) -> None:
        expires_at = _time_claim(claims, "exp")
        not_before = _time_claim(claims, "nbf")
        issued_at = _time_claim(claims, "iat")
        if expires_at is None:
            raise JWTError("malformed")  # a session token without expiry would be valid forever
        if now >= expires_at + self.leeway:
            raise JWTError("expired")
        if not_before is not None and now + self.leeway < not_before:
            raise JWTError("not_yet_valid")
        if issued_at is not None and now + self.leeway < issued_at:
            raise JWTError("not_yet_valid")
