"""Whose IP a request is: spoofing through untrusted peers is ignored."""

from __future__ import annotations

import pytest

from nexgate_proxy.clientip import client_ip, parse_networks

LB = parse_networks(["10.0.0.0/8", "::1"])


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        ("203.0.113.9", "1.2.3.4", LB, "203.0.113.9"),          # untrusted peer: header ignored
        ("203.0.113.9", "1.2.3.4", (), "203.0.113.9"),          # no trusted proxies configured
        ("10.1.2.3", "198.51.100.7", LB, "198.51.100.7"),       # one trusted hop
        ("10.1.2.3", "6.6.6.6, 198.51.100.7, 10.9.9.9", LB, "198.51.100.7"),  # spoofed left part ignored
        ("10.1.2.3", "garbage, 198.51.100.7", LB, "198.51.100.7"),
        ("10.1.2.3", "198.51.100.7, garbage", LB, "10.1.2.3"),  # unreadable nearest hop: trust nothing
        ("10.1.2.3", "10.0.0.5", LB, "10.0.0.5"),               # only proxies: the farthest known
        ("::1", "2001:db8::1", LB, "2001:db8::1"),
        ("::ffff:10.1.2.3", "198.51.100.7", LB, "198.51.100.7"),  # IPv4-mapped peer
        ("10.1.2.3", "[2001:db8::2]", LB, "2001:db8::2"),
    ],
)
def test_client_ip(peer: str, xff: str, trusted, expected: str) -> None:
    assert client_ip(peer, xff, trusted) == expected


def test_huge_forwarded_for_reads_only_the_last_hops() -> None:
    # Only MAX_HOPS entries are split off the right end, whatever the header's length.
    header = "1.1.1.1, " + ", ".join(["10.0.0.1"] * 10_000)
    assert client_ip("10.1.2.3", header, LB) == "10.0.0.1"
    assert client_ip("10.1.2.3", ", ".join(["10.0.0.1"] * 10_000) + ", 198.51.100.7", LB) == "198.51.100.7"


def test_bad_cidr_is_named() -> None:
    with pytest.raises(ValueError, match="not-an-ip"):
        parse_networks(["10.0.0.0/8", "not-an-ip"])
