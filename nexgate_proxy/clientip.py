"""The client's IP: the socket peer, or X-Forwarded-For through configured trusted proxies.

X-Forwarded-For is only believed when the peer is a trusted proxy; then the
header is read right to left, skipping trusted hops, and the first untrusted
address is the client. A client that sends its own X-Forwarded-For through an
untrusted path gets nothing from it. Only the last few hops are read, so a
header with thousands of entries costs no more than one with ten.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_HOPS = 16


def parse_networks(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    """CIDRs or single addresses; raises ValueError naming the bad entry."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR (e.g. 10.0.0.0/8, ::1)") from None
    return tuple(networks)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    # An IPv4 client seen through an IPv6 socket is still that IPv4 client.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: tuple[IPNetwork, ...]) -> bool:
    return any(address in network for network in trusted)


def client_ip(peer: str | None, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> str:
    if not peer:
        return ""
    if not trusted or not forwarded_for:
        return peer
    peer_ip = _ip(peer)
    if peer_ip is None or not _trusted(peer_ip, trusted):
        return peer
    nearest = peer
    for hop in reversed(forwarded_for.rsplit(",", MAX_HOPS)[-MAX_HOPS:]):
        address = _ip(hop)
        if address is None:
            return nearest  # garbage in the chain: trust nothing left of it
        if not _trusted(address, trusted):
            return str(address)
        nearest = str(address)
    # Every hop read was a trusted proxy: the farthest one is the best we know.
    return nearest
