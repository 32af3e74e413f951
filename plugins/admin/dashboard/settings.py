"""The ``dashboard`` config section: where the dashboard lives, its session cookie, checkout links, invoices."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

from nexgate_proxy.config import Config, ConfigReader, ConfigSection
from nexgate_proxy.plugins import disabled_builtins

_PATH = re.compile(r"/[A-Za-z0-9_/-]{0,63}")
_PRODUCT = re.compile(r"[A-Za-z0-9_-]{1,100}")
SAMESITE = ("Strict", "Lax")


@dataclass(frozen=True, slots=True)
class CheckoutLink:
    product_id: str
    url: str
    """The product's DodoPayments checkout (payment link) URL; the account id is added as metadata."""
    label: str


@dataclass(frozen=True, slots=True)
class Business:
    """The operator's details printed on every invoice."""

    name: str = ""
    address: tuple[str, ...] = ()
    tax_id: str = ""
    email: str = ""
    invoice_prefix: str = "INV-"


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    enabled: bool = True
    path: str = "/dashboard"
    session_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    """HMAC key of the session cookies; random per process unless configured (sessions then end on restart)."""
    session_hours: int = 12
    cookie_name: str = "nexgate_dashboard"
    cookie_secure: str = "auto"
    """"auto" (Secure when the request came over HTTPS), "always" or "never"."""
    cookie_samesite: str = "Lax"
    clerk_sign_in_url: str = ""
    checkout: tuple[CheckoutLink, ...] = ()
    business: Business = field(default_factory=Business)


def _text(r: ConfigReader, s: Mapping[str, Any], key: str, path: str, default: str = "", limit: int = 500) -> str:
    return r.value(dict(s), key, path, str, default,
                   lambda v: None if len(v) <= limit else f"must be at most {limit} characters")


def parse_dashboard_settings(r: ConfigReader, s: dict[str, Any], config: Config) -> DashboardSettings:
    d = DashboardSettings()
    p = "dashboard"
    path = r.value(s, "path", p, str, d.path,
                   lambda v: None if _PATH.fullmatch(v) and v != "/" and not v.endswith("/")
                   else "must be a path such as /dashboard (letters, digits, _ - /; no trailing slash)")
    secret_text = r.value(s, "session_secret", p, str, "",
                          lambda v: None if not v or len(v) >= 32 else "must be at least 32 characters")
    checkout = []
    for product_id, spec in r.mapping(s.get("checkout"), f"{p}.checkout").items():
        here = f"{p}.checkout.{product_id}"
        if _PRODUCT.fullmatch(str(product_id)) is None:
            r.problem(here, "is not a product id (letters, digits, _ and - only)")
            continue
        c = r.mapping(spec, here, ("url", "label"))
        url = _text(r, c, "url", here, "", 2000)
        if not url.startswith("https://") and not url.startswith("http://127.0.0.1"):
            r.problem(f"{here}.url", "required: the product's https:// checkout link from the DodoPayments dashboard")
            continue
        checkout.append(CheckoutLink(str(product_id), url, _text(r, c, "label", here, str(product_id), 200)))
    b = r.mapping(s.get("business"), f"{p}.business", ("name", "address", "tax_id", "email", "invoice_prefix"))
    address = b.get("address") or []
    if isinstance(address, str):
        address = address.splitlines()
    if not isinstance(address, list) or not all(isinstance(line, str) for line in address):
        r.problem(f"{p}.business.address", "must be a list of lines")
        address = []
    business = Business(
        name=_text(r, b, "name", f"{p}.business"), address=tuple(address),
        tax_id=_text(r, b, "tax_id", f"{p}.business", "", 100), email=_text(r, b, "email", f"{p}.business", "", 320),
        invoice_prefix=r.value(b, "invoice_prefix", f"{p}.business", str, "INV-",
                               lambda v: None if re.fullmatch(r"[A-Za-z0-9_-]{0,20}", v) else
                               "must be up to 20 letters, digits, _ or -"))
    enabled = r.value(s, "enabled", p, bool, True)
    if enabled and "nexgate_plugins.admin" in disabled_builtins(config):
        r.problem(f"{p}.enabled", "the dashboard runs on the admin plugin, which plugins.disable turns off: "
                  "disable dashboard too, or set dashboard.enabled: false")
    return DashboardSettings(
        enabled=enabled,
        path=path,
        session_secret=secret_text.encode() if secret_text else secrets.token_bytes(32),
        session_hours=r.value(s, "session_hours", p, int, d.session_hours,
                              lambda v: None if 1 <= v <= 24 * 30 else "must be between 1 and 720"),
        cookie_name=r.value(s, "cookie_name", p, str, d.cookie_name,
                            lambda v: None if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v) else "must be a cookie name"),
        cookie_secure=r.value(s, "cookie_secure", p, str, d.cookie_secure,
                              lambda v: None if v in ("auto", "always", "never") else "must be auto, always or never"),
        cookie_samesite=r.value(s, "cookie_samesite", p, str, d.cookie_samesite,
                                lambda v: None if v in SAMESITE else "must be Strict or Lax"),
        clerk_sign_in_url=_text(r, s, "clerk_sign_in_url", p, "", 2000),
        checkout=tuple(checkout),
        business=business,
    )


DASHBOARD_SECTION = ConfigSection(
    "dashboard", parse_dashboard_settings,
    ("enabled", "path", "session_secret", "session_hours", "cookie_name", "cookie_secure", "cookie_samesite",
     "clerk_sign_in_url", "checkout", "business"),
    "The web dashboard: where it is served, its session cookie, buy-credits links and invoice details.")
