"""Which IP address a request comes from.

The peer of the TCP connection is the client, unless that peer is one of ``TRUSTED_PROXIES``:
then the header those proxies write (``FORWARDED_HEADER``: ``X-Forwarded-For``, or RFC 7239
``Forwarded``; the other one is ignored, since a proxy passes on whatever the client sent in it)
names it. All lines of that header are read as one list, from the right, skipping our own
proxies, and the first address that is not one of them is the client — entries further left
were written by whoever sent the request and prove nothing.
Every entry must parse as an IP address; text that does not (a forged or broken header) is never
stored or logged: the last trusted hop stands in for the client instead.

Run uvicorn with ``--no-proxy-headers`` (as ``make run`` and the container do) so this module sees
the real peer; uvicorn's own ``--forwarded-allow-ips`` rewrites the peer before the app sees it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
UNKNOWN = "unknown"


def parse_ip(text: str) -> str | None:
    """The canonical text of an IP address (``::ffff:1.2.3.4`` becomes ``1.2.3.4``), or None."""
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:4711"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:4711"
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            # "fe80::1%<anything>": a zone is free text, meaningless beyond the sender's host.
            return None
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
    return str(address)


def _hops_from_forwarded(header: str) -> list[str]:
    hops = []
    for element in header.split(","):
        for pair in element.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.strip().lower() == "for":
                hops.append(value.strip().strip('"'))
    return hops


def _trusted(address: str, networks: Sequence[IPNetwork]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in network for network in networks)


def client_ip(
    peer: str | None,
    header_lines: Sequence[str],
    header: str,
    trusted: Sequence[IPNetwork],
) -> str:
    """The client's address for a request from ``peer`` whose ``header`` (``X-Forwarded-For``
    or ``Forwarded``) came in ``header_lines``."""
    current = parse_ip(peer) if peer else None
    if current is None:
        return UNKNOWN
    joined = ",".join(header_lines)
    if header.lower() == "forwarded":
        hops = _hops_from_forwarded(joined)
    else:
        hops = [hop for hop in joined.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(current, trusted):
            break
        parsed = parse_ip(hop)
        if parsed is None:
            break  # a hop that is no address: keep the last one we could trust
        current = parsed
    return current
