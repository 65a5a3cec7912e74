"""Webhooks: which URLs kma calls, and their signatures.

A webhook goes to a public http(s) address only, checked when the job is submitted and again
when it is sent (the name may resolve elsewhere by then), unless the operator allows the network
(`KMA_WEBHOOK_ALLOW_NETWORKS`). Signatures are HMAC-SHA256 over the exact body, hex, in the
`X-Kma-Signature` header; a receiver checks one with `verify(body, header, secret)`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Sequence

import httpx

SIGNATURE_HEADER = "X-Kma-Signature"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_KINDS = (
    ("is_unspecified", "an unspecified"),
    ("is_loopback", "a loopback"),
    ("is_link_local", "a link-local"),
    ("is_multicast", "a multicast"),
    ("is_reserved", "a reserved"),
    ("is_private", "a private"),
)


class WebhookRefused(ValueError):
    """A webhook URL kma will not call; the message says why."""


class WebhookUnresolved(WebhookRefused):
    """The webhook's host name does not resolve (now)."""


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, signature: str, secret: str) -> bool:
    return hmac.compare_digest(sign(body, secret), signature)


def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses `host` resolves to, as a connection to it would find them."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUnresolved(f"host {host!r} does not resolve") from exc
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64, 6to4), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def non_public_kind(address: IPAddress) -> str | None:
    """What makes the address one a webhook may not reach ("a loopback", ...); None if public."""
    for candidate in (_embedded_ipv4(address), address):
        if candidate is None:
            continue
        for attribute, kind in _KINDS:
            if getattr(candidate, attribute):
                return kind
        if not candidate.is_global:  # e.g. shared (CGNAT) 100.64.0.0/10
            return "a non-public"
    return None


def check_url(
    url: str, allow_networks: Sequence[IPNetwork] = ()
) -> tuple[httpx.URL, list[IPAddress]]:
    """The URL and the addresses its host resolves to, all of them allowed; else `WebhookRefused`.

    http or https, a host and no user info; every address public (or in `allow_networks`): a name
    with one private address among public ones is refused, as a client may connect to any.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise WebhookRefused("is not a valid URL") from exc
    if parsed.scheme not in ("http", "https"):
        raise WebhookRefused("must be an http or https URL")
    if parsed.userinfo:
        raise WebhookRefused("must not carry user info (user:password@)")
    host = parsed.raw_host.decode("ascii")
    if not host:
        raise WebhookRefused("must name a host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise WebhookRefused("has an invalid port")
    addresses = resolve(host, port)
    if not addresses:
        raise WebhookUnresolved(f"host {host!r} does not resolve")
    for address in addresses:
        kind = None if _allowed(address, allow_networks) else non_public_kind(address)
        if kind is not None:  # the address itself is not shown: it may be an internal one
            raise WebhookRefused(f"resolves to {kind} address")
    return parsed, addresses


def _allowed(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    candidates = [a for a in (address, _embedded_ipv4(address)) if a is not None]
    return any(a in network for a in candidates for network in networks)


def pinned_request(url: httpx.URL, address: IPAddress, body: bytes, secret: str) -> httpx.Request:
    """The signed POST of `body` to `url`, sent to `address` (the one just checked) rather than
    to whatever the name resolves to a moment later; TLS still checks the certificate's name."""
    headers = {
        "Host": url.netloc.decode("ascii"),
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(body, secret),
    }
    return httpx.Request(
        "POST",
        url.copy_with(host=str(address)),
        content=body,
        headers=headers,
        extensions={"sni_hostname": url.raw_host.decode("ascii")},
    )
