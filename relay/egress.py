"""Egress: which network addresses destinations may reach, enforced where the client connects.

Addresses in loopback, private (RFC 1918), CGNAT, link-local (169.254.169.254, the cloud
metadata address, among them), unique-local and "this network" ranges, and the IPv4-mapped,
IPv4-compatible and NAT64 forms of those, are refused unless ``delivery.allowed_networks``
lists a network holding them. The check runs on every address a name resolves to
(``GuardedResolver``, so a public name that resolves to a private address is caught too) and on
IP literals in URLs (which aiohttp does not resolve). A refusal is a ``Blocked`` error naming
the address and the key that would allow it; the delivery fails, it is not retried.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

INTERNAL: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",        # "this network"
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",    # CGNAT (RFC 6598)
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local, cloud metadata
    "::/128", "::1/128",  # unspecified, loopback
    "fc00::/7",         # unique-local
    "fe80::/10",        # link-local
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.ip_network("::/96")


class Blocked(OSError):
    """A destination address that the relay may not reach."""

    def __init__(self, host: str, address: str) -> None:
        self.host, self.address = host, address
        where = f"{host} resolves to {address}" if host != address else f"address {address}"
        super().__init__(f"{where}, an internal address: refused (list its network in "
                         "delivery.allowed_networks to allow it)")


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _forms(address: Address) -> list[Address]:
    """The address and the IPv4 address it carries, if any (mapped, compatible, NAT64)."""
    forms: list[Address] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
        elif address in _NAT64 or (address in _V4_COMPATIBLE and int(address) > 1):
            forms.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return forms


def is_allowed(address: Address, allowed: tuple[Network, ...]) -> bool:
    """May a destination be reached at ``address``? Internal ones only when allowed."""
    forms = _forms(address)
    internal = [a for a in forms if any(a in net for net in INTERNAL)]
    if not internal:
        return True
    return all(any(a in net for net in allowed if net.version == a.version) for a in internal)


def check_literal(host: str, allowed: tuple[Network, ...]) -> None:
    """Raise Blocked when ``host`` is an IP literal the relay may not reach (names pass)."""
    try:
        address = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return
    if not is_allowed(address, allowed):
        raise Blocked(host, str(address))


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses ``is_allowed`` lets through."""

    def __init__(self, allowed: tuple[Network, ...], inner: AbstractResolver | None = None) -> None:
        self.allowed = allowed
        self._inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        kept = [r for r in found if is_allowed(ipaddress.ip_address(r["host"]), self.allowed)]
        if not kept:
            raise Blocked(host, found[0]["host"] if found else "?")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def blocked_cause(exc: BaseException) -> Blocked | None:
    """The Blocked error behind an aiohttp connector error, if that is what it was."""
    seen: set[int] = set()
    current: Any = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, Blocked):
            return current
        seen.add(id(current))
        current = getattr(current, "os_error", None) or current.__cause__ or current.__context__
    return None
