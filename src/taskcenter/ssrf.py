"""The SSRF guard: which addresses an outbound request may reach.

Pure classification and policy checks, plus an aiohttp resolver that vets the addresses actually connected to.
"""

from __future__ import annotations

import functools
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from taskcenter.errors import BlockedAddress, ValidationError

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

__all__ = [
    "GuardPolicy",
    "GuardedResolver",
    "check_address",
    "check_url",
    "forbidden_reason",
    "host_problem",
    "literal_address",
]


def _v4(cidr: str) -> tuple[int, int]:
    net = IPv4Network(cidr)
    return int(net.network_address), int(net.netmask)


def _v6(cidr: str) -> tuple[int, int]:
    net = IPv6Network(cidr)
    return int(net.network_address), int(net.netmask)


# (network, mask, reason), first match wins. Integer compares keep classification cheap.
_V4_RANGES: tuple[tuple[int, int, str], ...] = tuple(
    (*_v4(cidr), reason)
    for cidr, reason in (
        ("0.0.0.0/32", "unspecified"),
        ("0.0.0.0/8", "reserved"),  # "this network"
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
        ("192.0.2.0/24", "reserved"),  # documentation
        ("192.88.99.0/24", "reserved"),  # deprecated 6to4 relay anycast
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),  # benchmarking
        ("198.51.100.0/24", "reserved"),  # documentation
        ("203.0.113.0/24", "reserved"),  # documentation
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes the 255.255.255.255 broadcast
    )
)

# Ranges whose IPv4 payload decides the verdict: a v6 address that carries a v4 one reaches that v4 host.
_EMBEDDED = "embedded"
_V6_RANGES: tuple[tuple[int, int, str], ...] = tuple(
    (*_v6(cidr), reason)
    for cidr, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::ffff:0:0/96", _EMBEDDED),  # IPv4-mapped
        ("::/96", _EMBEDDED),  # IPv4-compatible (deprecated, still routed by some stacks)
        ("64:ff9b::/96", _EMBEDDED),  # NAT64 well-known prefix
        ("64:ff9b:1::/48", "private"),  # local-use NAT64
        ("::/8", "reserved"),  # the rest of it, after the forms above that live inside it
        ("100::/64", "reserved"),  # discard-only
        ("2001::/32", _EMBEDDED),  # Teredo: the obfuscated client address
        ("2001:2::/48", "reserved"),  # benchmarking
        ("2001:10::/28", "reserved"),  # ORCHID
        ("2001:20::/28", "reserved"),  # ORCHIDv2
        ("2001:db8::/32", "reserved"),  # documentation
        ("2002::/16", _EMBEDDED),  # 6to4
        ("3fff::/20", "reserved"),  # documentation
        ("5f00::/16", "reserved"),  # SRv6 SIDs
        ("fc00::/7", "private"),  # unique local
        ("fe80::/10", "link-local"),
        ("fec0::/10", "private"),  # deprecated site-local
        ("ff00::/8", "multicast"),
    )
)
_V6_GLOBAL_UNICAST = _v6("2000::/3")
_V4_MAX = 0xFFFFFFFF
_TEREDO_PREFIX = _v6("2001::/32")[0]
_SIXTOFOUR_PREFIX = _v6("2002::/16")[0]
# Characters that can spell an IPv4 address in inet_aton's legacy forms (decimal, octal, hex, short).
_V4_LITERAL_CHARS = frozenset("0123456789abcdefxABCDEFX.")
# A DNS label as resolvers take it: letters, digits, hyphens (not first or last), and the underscore that
# names such as Docker service names carry; 1-63 characters.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)


def _embedded_v4(value: int) -> int:
    """The IPv4 address carried inside an IPv6 address of an _EMBEDDED range."""
    if value >> 112 == _SIXTOFOUR_PREFIX >> 112:
        return (value >> 80) & _V4_MAX
    if value >> 96 == _TEREDO_PREFIX >> 96:
        return ~value & _V4_MAX
    return value & _V4_MAX  # mapped, compatible, NAT64: the low 32 bits


def _classify_v4(value: int) -> str | None:
    for net, mask, reason in _V4_RANGES:
        if value & mask == net:
            return reason
    return None


def forbidden_reason(ip: IPAddress) -> str | None:
    """Say why the guard refuses an address by default.

    Args:
        ip: the address to classify.

    Returns:
        One of 'loopback', 'private', 'cgnat', 'link-local', 'multicast', 'reserved', 'unspecified';
        None when the address is public. IPv6 forms that carry an IPv4 address (mapped, compatible, 6to4,
        NAT64, Teredo) are judged by that IPv4 address.
    """
    value = int(ip)
    if ip.version == 4:
        return _classify_v4(value)
    for net, mask, reason in _V6_RANGES:
        if value & mask == net:
            if reason != _EMBEDDED:
                return reason
            embedded = _classify_v4(_embedded_v4(value))
            # The IPv4 part of 64:ff9b::/96 and ::/96 can itself be 0.0.0.0/8 etc.: that is still a refusal.
            return embedded
    net, mask = _V6_GLOBAL_UNICAST
    return None if value & mask == net else "reserved"


def _host_key(host: str) -> str:
    return host.lower().rstrip(".")


def _normalise_host_entry(entry: str, field_name: str) -> str:
    host = _host_key(entry.strip())
    label = host[2:] if host.startswith("*.") else host
    if not label or "*" in label or "/" in label or " " in label:
        raise ValidationError(f"invalid host {entry!r}: use a name or '*.suffix'", field=field_name)
    return host


def _host_matches(host: str, patterns: frozenset[str]) -> bool:
    """Exact match, or a '*.suffix' pattern covering a subdomain (not the bare suffix itself)."""
    if not patterns:
        return False
    if host in patterns:
        return True
    dot = host.find(".")
    while dot != -1:
        if "*" + host[dot:] in patterns:
            return True
        dot = host.find(".", dot + 1)
    return False


def _network_key(net: IPNetwork) -> tuple[int, int, int]:
    return net.version, int(net.network_address), net.prefixlen


@dataclass(frozen=True)
class GuardPolicy:
    """Exceptions to the default refusal of non-public addresses. Hashable: the sender keys pools on it.

    Precedence: a denied host is always refused; an allowed host passes whatever it resolves to; an address
    in an allowed network passes; any other non-public address is refused.
    """

    enabled: bool = True
    """False switches the guard off entirely."""
    allow_networks: tuple[IPNetwork, ...] = ()
    """Networks reachable even though non-public (e.g. 127.0.0.0/8 for local testing)."""
    allow_hosts: frozenset[str] = field(default_factory=frozenset)
    """Host names let through whatever they resolve to; '*.example.com' covers subdomains."""
    deny_hosts: frozenset[str] = field(default_factory=frozenset)
    """Host names always refused; '*.example.com' covers subdomains."""

    def __post_init__(self) -> None:
        # Normalised so that equal policies compare and hash equal (one connection pool each).
        networks = tuple(sorted(set(self.allow_networks), key=_network_key))
        object.__setattr__(self, "allow_networks", networks)
        object.__setattr__(self, "allow_hosts", frozenset(_host_key(h) for h in self.allow_hosts))
        object.__setattr__(self, "deny_hosts", frozenset(_host_key(h) for h in self.deny_hosts))
        # The sender hashes the policy twice per request (its pool, the host verdict cache); the generated hash
        # walks the networks in Python each time (0.6 us), so it is computed once here.
        object.__setattr__(self, "_hash", hash(self._fields()))

    def _fields(self) -> tuple[bool, tuple[IPNetwork, ...], frozenset[str], frozenset[str]]:
        return self.enabled, self.allow_networks, self.allow_hosts, self.deny_hosts

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined,no-any-return]

    def __reduce__(self) -> tuple[type[GuardPolicy], tuple[Any, ...]]:
        # Rebuilt through __init__ so that another process computes its own hash (string hashes differ).
        return GuardPolicy, self._fields()

    @classmethod
    def from_lists(
        cls,
        allow_networks: Iterable[str] = (),
        allow_hosts: Iterable[str] = (),
        deny_hosts: Iterable[str] = (),
        enabled: bool = True,
    ) -> GuardPolicy:
        """Build a policy from configuration strings.

        Raises:
            ValidationError: a CIDR or host entry is malformed (``field`` names the list).
        """
        networks: list[IPNetwork] = []
        for cidr in allow_networks:
            try:
                networks.append(ip_network(cidr.strip(), strict=False))
            except ValueError as exc:
                raise ValidationError(f"invalid network {cidr!r}: {exc}", field="allow_networks") from exc
        return cls(
            enabled=enabled,
            allow_networks=tuple(networks),
            allow_hosts=frozenset(_normalise_host_entry(h, "allow_hosts") for h in allow_hosts),
            deny_hosts=frozenset(_normalise_host_entry(h, "deny_hosts") for h in deny_hosts),
        )

    def merged(self, other: GuardPolicy) -> GuardPolicy:
        """Combine two policies (global and per business): union of every list; on only when both are on."""
        return GuardPolicy(
            enabled=self.enabled and other.enabled,
            allow_networks=self.allow_networks + other.allow_networks,
            allow_hosts=self.allow_hosts | other.allow_hosts,
            deny_hosts=self.deny_hosts | other.deny_hosts,
        )


def _in_networks(ip: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    if not networks:
        return False
    # An IPv4-mapped address reaches the same host as its IPv4 form, so an IPv4 allowance covers it too.
    mapped = ip.ipv4_mapped if isinstance(ip, IPv6Address) else None
    return any(ip in net or (mapped is not None and mapped in net) for net in networks)


def _host_verdict(host: str, policy: GuardPolicy) -> bool:
    """True when the host name alone lets the request through; raises when it is denied."""
    key = _host_key(host)
    if _host_matches(key, policy.deny_hosts):
        raise BlockedAddress(f"host {key} is denied", host=key, reason="denied host")
    return _host_matches(key, policy.allow_hosts)


def check_address(ip: IPAddress, host: str, policy: GuardPolicy) -> None:
    """Refuse an address the policy does not let ``host`` reach.

    Raises:
        BlockedAddress: names the address (or host) and the reason.
    """
    if not policy.enabled or _host_verdict(host, policy) or _in_networks(ip, policy.allow_networks):
        return
    reason = forbidden_reason(ip)
    if reason is not None:
        raise BlockedAddress(f"{ip} is {reason} (host {host})", host=host, address=str(ip), reason=reason)


def literal_address(host: str) -> IPAddress | None:
    """The address an IP-literal host spells, or None for a name.

    Legacy IPv4 spellings some stacks accept (``2130706433``, ``0177.0.0.1``, ``127.1``, ``0x7f.1``) are
    read with ``inet_aton`` semantics so they are judged by the address they really mean.

    Raises:
        BlockedAddress: the host looks like an address but is not a valid one (fail closed).
    """
    if ":" in host:
        text = host.strip("[]").replace("%25", "%")
        try:
            return IPv6Address(text)
        except ValueError:
            raise BlockedAddress(
                f"invalid IPv6 literal {host}", host=host, reason="invalid literal"
            ) from None
    if not _V4_LITERAL_CHARS.issuperset(host):
        return None
    try:
        return IPv4Address(socket.inet_aton(host.rstrip(".")))
    except OSError:
        if host.replace(".", "").isdigit():
            raise BlockedAddress(
                f"invalid IPv4 literal {host}", host=host, reason="invalid literal"
            ) from None
        return None  # a name made of hex letters, such as "cafe.de"


@functools.lru_cache(maxsize=4096)
def host_problem(host: str) -> str | None:
    """Why no request to URL host ``host`` (as ``urlsplit`` gives it: lower case, IPv6 without brackets) can
    ever connect, or None. Checked when a task is created, so that such a URL is refused at once rather than
    failing every attempt.

    The guard's own classification decides what the host is: an IP literal (:func:`literal_address`) must be
    a valid address; anything else is a name, whose labels must be 1-63 letters, digits, hyphens (not at either
    end) or underscores, at most 253 characters in all, one trailing dot allowed. A name with other letters is
    judged in its IDNA form (``bücher.example`` as ``xn--bcher-kva.example``), as the sender will send it. Whether
    the address may be reached is not judged here (the guard's policy, at send time).
    """
    try:
        if literal_address(host) is not None:
            return None
    except BlockedAddress:  # looks like an address but is none (999.1.1.1, ::g)
        return f"host {host!r} is not a valid IP address"
    name = host[:-1] if host.endswith(".") else host
    if not name.isascii():
        try:
            name = URL.build(scheme="http", host=name).raw_host or ""
        except (ValueError, UnicodeError):
            return f"host {host!r} is not a valid internationalised host name"
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        return f"host {host!r} is not a valid host name"
    return None


def check_url(url: str | URL, policy: GuardPolicy, *, parsed: URL | None = None) -> URL:
    """Check what can be checked before connecting: the scheme, denied hosts and IP-literal hosts.

    aiohttp does not call the resolver for IP literals, so they are judged here; names are judged by
    :class:`GuardedResolver` on the addresses they resolve to.

    Args:
        url: The URL; messages quote it as given.
        policy: The guard policy.
        parsed: ``URL(url)`` if the caller has it already (it is then not parsed again).

    Returns:
        The parsed URL (so callers need not parse it again).

    Raises:
        BlockedAddress: the URL may not be requested.
    """
    if parsed is None:
        parsed = url if isinstance(url, URL) else URL(url)
    if not policy.enabled:
        return parsed
    if parsed.scheme not in ("http", "https"):
        raise BlockedAddress(f"scheme {parsed.scheme!r} is not allowed: {url}", reason="scheme")
    host = parsed.raw_host
    if not host:
        raise BlockedAddress(f"URL has no host: {url}", reason="no host")
    blocked = _host_check(host, policy)
    if blocked is not None:
        raise blocked
    return parsed


@functools.lru_cache(maxsize=4096)
def _host_check(host: str, policy: GuardPolicy) -> BlockedAddress | None:
    """The verdict on a URL host (allowed names, IP literals), cached: it depends on nothing else, and scanning
    the allowed networks for every request of a busy host showed up in the dispatcher's profile."""
    if _host_verdict(host, policy):
        return None
    try:
        ip = literal_address(host)
        if ip is not None:
            check_address(ip, host, policy)
    except BlockedAddress as exc:
        return exc
    return None


class GuardedResolver(AbstractResolver):
    """Resolves through an inner resolver and keeps only the addresses the policy allows.

    aiohttp connects to exactly the addresses returned here, with no second lookup, so DNS rebinding has no
    window between the check and the connection.
    """

    def __init__(self, policy: GuardPolicy, inner: AbstractResolver | None = None) -> None:
        """Wrap ``inner`` (default: aiohttp's ThreadedResolver, made on first use)."""
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` and drop every forbidden address.

        Raises:
            BlockedAddress: the host is denied, or every address it resolves to is forbidden.
        """
        policy = self._policy
        if self._inner is None:
            self._inner = ThreadedResolver()
        if not policy.enabled or _host_verdict(host, policy):
            return await self._inner.resolve(host, port, family)
        results = await self._inner.resolve(host, port, family)
        kept: list[ResolveResult] = []
        refused: list[str] = []
        for result in results:
            try:
                ip = ip_address(result["host"])
            except ValueError:
                refused.append(f"{result['host']} (unparseable)")
                continue
            if _in_networks(ip, policy.allow_networks):
                kept.append(result)
                continue
            reason = forbidden_reason(ip)
            if reason is None:
                kept.append(result)
            else:
                refused.append(f"{ip} ({reason})")
        if not kept:
            detail = ", ".join(refused) or "no addresses"
            raise BlockedAddress(
                f"{host} resolves only to forbidden addresses: {detail}", host=host, reason="resolved"
            )
        return kept

    async def close(self) -> None:
        """Close the inner resolver."""
        if self._inner is not None:
            await self._inner.close()
