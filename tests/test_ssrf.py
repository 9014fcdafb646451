"""Tests of the SSRF guard: address classification, policies, URL checks and the guarded resolver.

Every address here is handed to pure functions or a fake resolver; nothing is connected to.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from yarl import URL

from taskcenter.errors import BlockedAddress, ValidationError
from taskcenter.ssrf import GuardedResolver, GuardPolicy, check_address, check_url, forbidden_reason
from tests.receiver import StaticResolver

CLASSIFIED = [
    # IPv4
    ("0.0.0.0", "unspecified"),
    ("0.1.2.3", "reserved"),
    ("10.0.0.1", "private"),
    ("10.255.255.255", "private"),
    ("100.64.0.1", "cgnat"),
    ("100.127.255.254", "cgnat"),
    ("127.0.0.1", "loopback"),
    ("127.255.0.9", "loopback"),
    ("169.254.169.254", "link-local"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.0.0.8", "reserved"),
    ("192.0.2.10", "reserved"),
    ("192.88.99.1", "reserved"),
    ("192.168.1.1", "private"),
    ("198.18.0.1", "reserved"),
    ("198.19.255.255", "reserved"),
    ("198.51.100.7", "reserved"),
    ("203.0.113.9", "reserved"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("8.8.8.8", None),
    ("93.184.216.34", None),
    ("100.63.255.255", None),
    ("100.128.0.0", None),
    ("172.15.255.255", None),
    ("172.32.0.0", None),
    ("198.20.0.0", None),
    ("223.255.255.255", None),
    # IPv6
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fc00::1", "private"),
    ("fd12:3456::1", "private"),
    ("fe80::1", "link-local"),
    ("febf::1", "link-local"),
    ("fec0::1", "private"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "reserved"),
    ("3fff::1", "reserved"),
    ("100::1", "reserved"),
    ("4000::1", "reserved"),
    ("::2:0:0:1", "reserved"),
    ("2606:4700:4700::1111", None),
    ("2a00:1450:4001::200e", None),
    # IPv4-mapped
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.1.2.3", "private"),
    ("::ffff:169.254.169.254", "link-local"),
    ("::ffff:0.0.0.0", "unspecified"),
    ("::ffff:8.8.8.8", None),
    # IPv4-compatible
    ("::127.0.0.1", "loopback"),
    ("::10.0.0.1", "private"),
    ("::8.8.8.8", None),
    # 6to4 (2002:AABB:CCDD::/48 embeds AA.BB.CC.DD)
    ("2002:7f00:1::1", "loopback"),
    ("2002:a00:1::", "private"),
    ("2002:a9fe:a9fe::1", "link-local"),
    ("2002:808:808::1", None),
    # NAT64
    ("64:ff9b::127.0.0.1", "loopback"),
    ("64:ff9b::192.168.0.1", "private"),
    ("64:ff9b::100.64.0.1", "cgnat"),
    ("64:ff9b::8.8.8.8", None),
    ("64:ff9b:1::1", "private"),
    # Teredo: the client address is stored inverted (~127.0.0.1 == 0x80fffffe)
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),
]


@pytest.mark.parametrize(("address", "reason"), CLASSIFIED)
def test_forbidden_reason_classifies_address(address: str, reason: str | None) -> None:
    assert forbidden_reason(ip_address(address)) == reason


LITERAL_URLS = [
    ("http://127.0.0.1/", "loopback"),
    ("http://2130706433/", "loopback"),  # decimal
    ("http://0177.0.0.1/", "loopback"),  # octal
    ("http://127.1/", "loopback"),  # short form
    ("http://0x7f.1/", "loopback"),  # hex
    ("http://0x7f000001/", "loopback"),
    ("http://127.0.0.1./", "loopback"),  # trailing dot
    ("http://017700000001/", "loopback"),
    ("http://3232235777/", "private"),  # 192.168.1.1
    ("http://0/", "unspecified"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]:8080/", "loopback"),
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("https://[fd00::1]/", "private"),
    ("http://[2002:7f00:1::1]/", "loopback"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
]


@pytest.mark.parametrize(("url", "reason"), LITERAL_URLS)
def test_check_url_blocks_forbidden_ip_literal(url: str, reason: str) -> None:
    with pytest.raises(BlockedAddress) as caught:
        check_url(url, GuardPolicy())
    assert caught.value.context["reason"] == reason


@pytest.mark.parametrize(
    "url",
    ["http://93.184.216.34/x", "https://[2606:4700:4700::1111]/", "http://example.com/", "https://cafe.de/"],
)
def test_check_url_passes_public_literal_and_names(url: str) -> None:
    assert str(check_url(url, GuardPolicy())).startswith(url.split("/")[0])


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://example.com/"])
def test_check_url_refuses_non_http_scheme(url: str) -> None:
    with pytest.raises(BlockedAddress, match="scheme"):
        check_url(url, GuardPolicy())


def test_check_url_refuses_malformed_numeric_host() -> None:
    with pytest.raises(BlockedAddress, match="invalid IPv4 literal"):
        check_url("http://1.2.3.4.5/", GuardPolicy())


def test_check_url_skips_everything_when_disabled() -> None:
    check_url("http://127.0.0.1/", GuardPolicy(enabled=False))


def test_check_url_message_names_address_and_reason() -> None:
    with pytest.raises(BlockedAddress, match=r"127\.0\.0\.1 is loopback"):
        check_url("http://2130706433/", GuardPolicy())


def test_allow_networks_lets_address_through() -> None:
    policy = GuardPolicy.from_lists(["127.0.0.0/8"])
    check_address(IPv4Address("127.0.0.1"), "localhost", policy)


def test_allow_networks_covers_ipv4_mapped_form() -> None:
    policy = GuardPolicy.from_lists(["127.0.0.0/8"])
    check_address(IPv6Address("::ffff:127.0.0.1"), "x", policy)


def test_allow_networks_does_not_cover_other_ranges() -> None:
    policy = GuardPolicy.from_lists(["127.0.0.0/8"])
    with pytest.raises(BlockedAddress, match="private"):
        check_address(IPv4Address("10.0.0.1"), "x", policy)


def test_allow_hosts_lets_host_through_whatever_it_resolves_to() -> None:
    policy = GuardPolicy.from_lists(allow_hosts=["internal.example.com"])
    check_address(IPv4Address("10.0.0.1"), "Internal.Example.COM.", policy)


def test_allow_hosts_wildcard_covers_subdomains_only() -> None:
    policy = GuardPolicy.from_lists(allow_hosts=["*.corp.example"])
    check_address(IPv4Address("10.0.0.1"), "a.b.corp.example", policy)
    with pytest.raises(BlockedAddress):
        check_address(IPv4Address("10.0.0.1"), "corp.example", policy)


def test_deny_hosts_blocks_public_address() -> None:
    policy = GuardPolicy.from_lists(deny_hosts=["evil.example"])
    with pytest.raises(BlockedAddress, match="denied"):
        check_address(IPv4Address("93.184.216.34"), "evil.example", policy)


def test_deny_hosts_wildcard_blocks_subdomain() -> None:
    policy = GuardPolicy.from_lists(deny_hosts=["*.evil.example"])
    with pytest.raises(BlockedAddress, match="denied"):
        check_address(IPv4Address("93.184.216.34"), "x.evil.example", policy)
    check_address(IPv4Address("93.184.216.34"), "notevil.example", policy)


def test_deny_hosts_beats_allow_lists() -> None:
    policy = GuardPolicy.from_lists(["0.0.0.0/0"], allow_hosts=["a.example"], deny_hosts=["a.example"])
    with pytest.raises(BlockedAddress, match="denied"):
        check_address(IPv4Address("93.184.216.34"), "a.example", policy)


def test_check_url_applies_deny_hosts_before_connecting() -> None:
    policy = GuardPolicy.from_lists(deny_hosts=["evil.example"])
    with pytest.raises(BlockedAddress, match="denied"):
        check_url("https://EVIL.example/hook", policy)


def test_check_address_is_silent_when_disabled() -> None:
    check_address(IPv4Address("127.0.0.1"), "x", GuardPolicy(enabled=False))


def test_from_lists_rejects_bad_cidr_naming_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        GuardPolicy.from_lists(["10.0.0.0/33"])
    assert caught.value.field == "allow_networks"


@pytest.mark.parametrize("entry", ["", "*", "a.*.example", "*."])
def test_from_lists_rejects_bad_host_pattern(entry: str) -> None:
    with pytest.raises(ValidationError) as caught:
        GuardPolicy.from_lists(deny_hosts=[entry])
    assert caught.value.field == "deny_hosts"


def test_equal_lists_make_equal_hashable_policies() -> None:
    a = GuardPolicy.from_lists(["10.0.0.0/8", "127.0.0.1/8"], allow_hosts=["A.example"])
    b = GuardPolicy.from_lists(["127.0.0.0/8", "10.0.0.0/8", "10.0.0.0/8"], allow_hosts=["a.example."])
    assert a == b
    assert len({a, b}) == 1


def test_policy_unpickled_in_another_process_hashes_like_its_own_policies() -> None:
    # The hash is computed once when built, and string hashes differ between processes: a pickled policy must
    # not carry this process's hash along.
    policy = GuardPolicy.from_lists(["127.0.0.0/8"], allow_hosts=["a.example"], deny_hosts=["b.example"])
    code = (
        "import pickle, sys\n"
        "from taskcenter.ssrf import GuardPolicy\n"
        "copy = pickle.loads(sys.stdin.buffer.read())\n"
        "own = GuardPolicy.from_lists(['127.0.0.0/8'], allow_hosts=['a.example'], deny_hosts=['b.example'])\n"
        "print(copy == own, hash(copy) == hash(own), len({copy, own}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-c", code], input=pickle.dumps(policy), env=env, capture_output=True, check=True
    )
    assert done.stdout.decode().split() == ["True", "True", "1"]


def test_replaced_policy_hashes_like_an_equal_policy() -> None:
    policy = GuardPolicy.from_lists(["127.0.0.0/8"], allow_hosts=["a.example"], deny_hosts=["b.example"])
    off = dataclasses.replace(policy, enabled=False)
    assert off == GuardPolicy.from_lists(["127.0.0.0/8"], ["a.example"], ["b.example"], enabled=False)
    assert hash(off) == hash(
        GuardPolicy.from_lists(["127.0.0.0/8"], ["a.example"], ["b.example"], enabled=False)
    )


def test_check_url_uses_the_parsed_form_given_and_quotes_the_url_as_given() -> None:
    given = "ftp://Example.com/a b"
    with pytest.raises(BlockedAddress) as caught:
        check_url(given, GuardPolicy(), parsed=URL(given))
    assert caught.value.message == f"scheme 'ftp' is not allowed: {given}"
    parsed = URL("http://127.0.0.1/")
    with pytest.raises(BlockedAddress):  # judged by what was parsed, not by the text
        check_url("http://example.com/", GuardPolicy(), parsed=parsed)
    assert check_url("http://127.0.0.1/", GuardPolicy.from_lists(["127.0.0.0/8"]), parsed=parsed) is parsed


def test_merged_unions_lists() -> None:
    merged = GuardPolicy.from_lists(["10.0.0.0/8"], deny_hosts=["a.example"]).merged(
        GuardPolicy.from_lists(["127.0.0.0/8"], allow_hosts=["b.example"], deny_hosts=["c.example"])
    )
    assert merged.allow_networks == (ip_network("10.0.0.0/8"), ip_network("127.0.0.0/8"))
    assert merged.allow_hosts == {"b.example"}
    assert merged.deny_hosts == {"a.example", "c.example"}
    assert merged.enabled


def test_merged_is_disabled_when_either_is() -> None:
    assert not GuardPolicy(enabled=False).merged(GuardPolicy()).enabled


async def test_resolver_drops_forbidden_addresses() -> None:
    inner = StaticResolver({"mixed.example": ["10.0.0.1", "93.184.216.34", "::1", "2606:4700:4700::1111"]})
    results = await GuardedResolver(GuardPolicy(), inner).resolve("mixed.example", 443, socket.AF_UNSPEC)
    assert [r["host"] for r in results] == ["93.184.216.34", "2606:4700:4700::1111"]


async def test_resolver_refuses_when_no_address_remains() -> None:
    inner = StaticResolver({"rebind.example": ["127.0.0.1", "169.254.169.254"]})
    with pytest.raises(BlockedAddress, match=r"127\.0\.0\.1 \(loopback\), 169\.254\.169\.254 \(link-local\)"):
        await GuardedResolver(GuardPolicy(), inner).resolve("rebind.example", 80)


async def test_resolver_keeps_addresses_in_allowed_networks() -> None:
    inner = StaticResolver({"dev.example": ["10.0.0.1", "127.0.0.1"]})
    policy = GuardPolicy.from_lists(["127.0.0.0/8"])
    results = await GuardedResolver(policy, inner).resolve("dev.example", 80)
    assert [r["host"] for r in results] == ["127.0.0.1"]


async def test_resolver_passes_allowed_host_untouched() -> None:
    inner = StaticResolver({"internal.example": ["10.0.0.1"]})
    policy = GuardPolicy.from_lists(allow_hosts=["internal.example"])
    results = await GuardedResolver(policy, inner).resolve("internal.example", 80)
    assert [r["host"] for r in results] == ["10.0.0.1"]


async def test_resolver_refuses_denied_host_without_lookup() -> None:
    inner = StaticResolver({"evil.example": ["93.184.216.34"]})
    policy = GuardPolicy.from_lists(deny_hosts=["evil.example"])
    with pytest.raises(BlockedAddress, match="denied"):
        await GuardedResolver(policy, inner).resolve("evil.example", 80)
    assert inner.lookups == []


async def test_resolver_lets_dns_failure_through_as_os_error() -> None:
    with pytest.raises(OSError, match="not known"):
        await GuardedResolver(GuardPolicy(), StaticResolver({})).resolve("nowhere.example", 80)
