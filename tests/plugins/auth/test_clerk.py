from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import pytest

import nexgate_plugins.auth.clerk as clerk_module
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from nexgate_plugins.auth.clerk import MAX_TOKEN_BYTES, ClerkIdentity, ClerkVerifier, JWTError
from tests.jwt_signing import b64url, b64url_json, jwk, public_pem, sign_rs256

ISSUER = "https://clerk.example.com"
APP = "https://app.example.com"
NOW = 1_750_000_000


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def verifier(signing_key: rsa.RSAPrivateKey) -> ClerkVerifier:
    return ClerkVerifier(public_key_pem=public_pem(signing_key), issuer=ISSUER, authorized_parties=[APP])


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER, "sub": "user_2abc", "sid": "sess_2xyz", "azp": APP,
        "iat": NOW - 10, "nbf": NOW - 10, "exp": NOW + 50,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def reason(verifier: ClerkVerifier, token: str, now: float = NOW) -> str:
    with pytest.raises(JWTError) as caught:
        verifier.verify(token, now=now)
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


# --- valid tokens ------------------------------------------------------------------------------


def test_valid_token_without_org(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    identity = verifier.verify(sign_rs256(signing_key, claims()), now=NOW)
    assert identity == ClerkIdentity(
        user_id="user_2abc", session_id="sess_2xyz", org_id=None, org_role=None, org_slug=None,
        claims=identity.claims,
    )
    assert identity.claims["azp"] == APP
    with pytest.raises(TypeError):
        identity.claims["sub"] = "someone_else"  # type: ignore[index]


@pytest.mark.parametrize(("role", "expected"), [("org:admin", "admin"), ("admin", "admin"), ("org:member", "member")])
def test_v1_org_claims(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey, role: str, expected: str) -> None:
    token = sign_rs256(signing_key, claims(org_id="org_123", org_role=role, org_slug="acme"))
    identity = verifier.verify(token, now=NOW)
    assert (identity.org_id, identity.org_role, identity.org_slug) == ("org_123", expected, "acme")


def test_v2_org_claims(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    token = sign_rs256(signing_key, claims(v=2, o={"id": "org_456", "rol": "admin", "slg": "globex", "per": "read"}))
    identity = verifier.verify(token, now=NOW)
    assert (identity.org_id, identity.org_role, identity.org_slug) == ("org_456", "admin", "globex")


def test_v2_role_with_prefix_is_normalised(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    token = sign_rs256(signing_key, claims(o={"id": "org_456", "rol": "org:owner"}))
    identity = verifier.verify(token, now=NOW)
    assert (identity.org_id, identity.org_role, identity.org_slug) == ("org_456", "owner", None)


def test_leeway_accepts_small_clock_skew(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    token = sign_rs256(signing_key, claims(iat=NOW + 3, nbf=NOW + 3, exp=NOW - 3))
    assert verifier.verify(token, now=NOW).user_id == "user_2abc"


def test_no_azp_allowlist_accepts_any_party(signing_key: rsa.RSAPrivateKey) -> None:
    open_verifier = ClerkVerifier(public_key_pem=public_pem(signing_key).decode(), issuer=ISSUER + "/")
    token = sign_rs256(signing_key, claims(azp="https://elsewhere.example"))
    assert open_verifier.verify(token, now=NOW).user_id == "user_2abc"


def test_jwks_selects_key_by_kid(
    tmp_path: Path, signing_key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey
) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [
        jwk(other_key, "ins_old"),
        jwk(signing_key, "ins_new"),
        {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},  # skipped, not RSA
    ]}))
    verifier = ClerkVerifier(jwks_path=jwks_file, issuer=ISSUER)
    assert verifier.verify(sign_rs256(signing_key, claims(), {"kid": "ins_new"}), now=NOW).user_id == "user_2abc"
    assert verifier.verify(sign_rs256(other_key, claims(sub="user_old"), {"kid": "ins_old"}), now=NOW).user_id == "user_old"
    # Right kid, wrong key's signature.
    assert reason(verifier, sign_rs256(other_key, claims(), {"kid": "ins_new"})) == "bad_signature"


def test_real_time_is_used_by_default(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    token = sign_rs256(signing_key, claims(iat=now, nbf=now, exp=now + 60))
    assert verifier.verify(token).user_id == "user_2abc"


# --- rejected tokens ---------------------------------------------------------------------------


def test_expired(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    assert reason(verifier, sign_rs256(signing_key, claims(exp=NOW - 6))) == "expired"
    assert reason(verifier, sign_rs256(signing_key, claims(exp=NOW - 5))) == "expired"


def test_nbf_in_the_future(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    assert reason(verifier, sign_rs256(signing_key, claims(nbf=NOW + 6))) == "not_yet_valid"


def test_iat_in_the_future(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    assert reason(verifier, sign_rs256(signing_key, claims(iat=NOW + 60, nbf=None))) == "not_yet_valid"


def test_missing_or_non_numeric_exp_is_malformed(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    assert reason(verifier, sign_rs256(signing_key, claims(exp=None))) == "malformed"
    assert reason(verifier, sign_rs256(signing_key, claims(exp=str(NOW + 50)))) == "malformed"
    assert reason(verifier, sign_rs256(signing_key, claims(exp=True))) == "malformed"


def test_wrong_issuer(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    assert reason(verifier, sign_rs256(signing_key, claims(iss="https://clerk.evil.com"))) == "wrong_issuer"
    assert reason(verifier, sign_rs256(signing_key, claims(iss=None))) == "wrong_issuer"


def test_azp_not_allowed(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    assert reason(verifier, sign_rs256(signing_key, claims(azp="https://evil.example.com"))) == "unauthorized_party"
    assert reason(verifier, sign_rs256(signing_key, claims(azp=None))) == "unauthorized_party"


def test_missing_sub(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    assert reason(verifier, sign_rs256(signing_key, claims(sub=None))) == "malformed"
    assert reason(verifier, sign_rs256(signing_key, claims(sub=""))) == "malformed"


def test_signed_by_another_key(verifier: ClerkVerifier, other_key: rsa.RSAPrivateKey) -> None:
    assert reason(verifier, sign_rs256(other_key, claims())) == "bad_signature"


def test_tampered_payload(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    header, _, signature = sign_rs256(signing_key, claims()).split(".")
    forged_payload = b64url_json(claims(sub="user_admin"))
    assert reason(verifier, f"{header}.{forged_payload}.{signature}") == "bad_signature"


def test_alg_none(verifier: ClerkVerifier) -> None:
    token = f"{b64url_json({'alg': 'none', 'typ': 'JWT'})}.{b64url_json(claims())}."
    assert reason(verifier, token) == "malformed"  # empty signature segment
    token_with_sig = f"{b64url_json({'alg': 'none'})}.{b64url_json(claims())}.{b64url(b'x')}"
    assert reason(verifier, token_with_sig) == "unsupported_alg"


@pytest.mark.parametrize("alg", ["HS256", "RS384", "PS256", "ES256", "rs256", "NONE", None, ["RS256"]])
def test_other_algorithms_are_refused(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey, alg: Any) -> None:
    header = {"typ": "JWT"} if alg is None else {"alg": alg, "typ": "JWT"}
    signing_input = f"{b64url_json(header)}.{b64url_json(claims())}"
    signature = signing_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    assert reason(verifier, f"{signing_input}.{b64url(signature)}") == "unsupported_alg"


def test_hs256_with_the_public_key_as_secret(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    # The classic algorithm-confusion attack: an HMAC keyed with the (public) PEM.
    signing_input = f"{b64url_json({'alg': 'HS256', 'typ': 'JWT'})}.{b64url_json(claims(sub='user_attacker'))}"
    mac = hmac.new(public_pem(signing_key), signing_input.encode(), hashlib.sha256).digest()
    assert reason(verifier, f"{signing_input}.{b64url(mac)}") == "unsupported_alg"


def test_unknown_kid_in_jwks(signing_key: rsa.RSAPrivateKey) -> None:
    verifier = ClerkVerifier(jwks={"keys": [jwk(signing_key, "ins_a"), jwk(signing_key, "ins_b")]}, issuer=ISSUER)
    assert reason(verifier, sign_rs256(signing_key, claims(), {"kid": "ins_unknown"})) == "unknown_kid"
    assert reason(verifier, sign_rs256(signing_key, claims())) == "unknown_kid"  # no kid, several keys
    assert reason(verifier, sign_rs256(signing_key, claims(), {"kid": 7})) == "malformed"


def test_crit_header_is_refused(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    assert reason(verifier, sign_rs256(signing_key, claims(), {"crit": ["exp"]})) == "malformed"


@pytest.mark.parametrize(
    "token",
    [
        "", ".", "..", "...", "a.b", "a.b.c.d", "not a token", "eyJ.eyJ.sig",
        "\u00e9.\u00e9.\u00e9", "a==.b.c", "a+b.c/d.e",
        b64url(b"[]") + "." + b64url_json({}) + ".c2ln",
        b64url(b"{not json") + "." + b64url_json({}) + ".c2ln",
        b64url_json({"alg": "RS256"}) + "." + b64url_json({}),
    ],
)
def test_garbage_tokens(verifier: ClerkVerifier, token: str) -> None:
    assert reason(verifier, token) in {"malformed", "unsupported_alg"}


def test_truncated_tokens(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    token = sign_rs256(signing_key, claims())
    for cut in range(0, len(token), 7):
        assert reason(verifier, token[:cut]) in {"malformed", "bad_signature"}


def test_non_canonical_base64_signature_is_refused(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    token = sign_rs256(signing_key, claims())
    # 256-byte signature -> 342 chars with 4 spare bits; flipping them must not yield a second valid token.
    last = token[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = token[:-1] + alphabet[alphabet.index(last) ^ 1]
    assert reason(verifier, twin) == "malformed"


def test_duplicate_json_keys_are_refused(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey) -> None:
    header = b64url(b'{"alg":"RS256","alg":"RS256"}')
    assert reason(verifier, f"{header}.{b64url_json(claims())}.c2ln") == "malformed"


def test_oversized_token(verifier: ClerkVerifier, signing_key: rsa.RSAPrivateKey,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    token = sign_rs256(signing_key, claims(padding="x" * MAX_TOKEN_BYTES))
    assert reason(verifier, token) == "malformed"

    def no_decoding(segment: str) -> bytes:
        raise AssertionError("an oversized token must be refused before any decoding")

    monkeypatch.setattr(clerk_module, "_b64url_decode", no_decoding)
    with pytest.raises(JWTError):
        verifier.verify("a" * 50_000_000)


def test_non_string_token(verifier: ClerkVerifier) -> None:
    assert reason(verifier, None) == "malformed"  # type: ignore[arg-type]
    assert reason(verifier, b"a.b.c") == "malformed"  # type: ignore[arg-type]


def test_error_never_contains_the_token(verifier: ClerkVerifier, other_key: rsa.RSAPrivateKey) -> None:
    token = sign_rs256(other_key, claims())
    with pytest.raises(JWTError) as caught:
        verifier.verify(token, now=NOW)
    assert token not in repr(caught.value) and token.split(".")[2] not in str(caught.value)


# --- configuration -----------------------------------------------------------------------------


def test_verifier_needs_a_key_and_an_issuer(signing_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError):
        ClerkVerifier(issuer=ISSUER)
    with pytest.raises(ValueError):
        ClerkVerifier(public_key_pem=public_pem(signing_key), issuer="")


def test_weak_and_non_rsa_keys_are_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="2048"):
        ClerkVerifier(public_key_pem=public_pem(weak), issuer=ISSUER)
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ValueError, match="RSA"):
        ClerkVerifier(public_key_pem=ec_pem, issuer=ISSUER)
    with pytest.raises(ValueError):
        ClerkVerifier(public_key_pem="-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----", issuer=ISSUER)


def test_jwks_without_rsa_signing_keys_is_refused(signing_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError):
        ClerkVerifier(jwks={"keys": []}, issuer=ISSUER)
    with pytest.raises(ValueError):
        ClerkVerifier(jwks={"keys": [{**jwk(signing_key, "k"), "use": "enc"}]}, issuer=ISSUER)
    with pytest.raises(ValueError, match="duplicate"):
        ClerkVerifier(jwks={"keys": [jwk(signing_key, "k"), jwk(signing_key, "k")]}, issuer=ISSUER)


