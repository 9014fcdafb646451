"""Tests of the HTTP sender against a real receiver on loopback.

Host names are pointed at loopback through StaticResolver; no request leaves the machine.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Mapping

import pytest
import pytest_asyncio

from taskcenter.errors import ValidationError
from taskcenter.sender import HttpConfig, OutboundRequest, Sender
from taskcenter.ssrf import GuardPolicy
from tests.receiver import Receiver, Reply, StaticResolver

NAMES = ("hook.test", "other.test", "internal.test")
LOOPBACK_ONLY = GuardPolicy.from_lists(["127.0.0.0/8"])


@pytest_asyncio.fixture
async def sender() -> AsyncIterator[Sender]:
    """A sender whose names (hook.test, other.test, internal.test) all resolve to 127.0.0.1."""
    async with Sender(HttpConfig(), lambda: StaticResolver({name: ["127.0.0.1"] for name in NAMES})) as s:
        yield s


def request(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout_s: float = 5.0,
    follow_redirects: bool = False,
    guard: GuardPolicy | None = None,
) -> OutboundRequest:
    return OutboundRequest(method, url, headers or {}, body, timeout_s, follow_redirects, guard)


def named_url(receiver: Receiver, path: str, name: str = "hook.test") -> str:
    return f"http://{name}:{receiver.port}{path}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- requests go out as given ---


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
async def test_each_method_arrives(sender: Sender, receiver: Receiver, method: str) -> None:
    result = await sender.send(request(receiver.url("/m"), method))
    assert result.status_code == 200
    assert [r.method for r in receiver.requests] == [method]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", json.dumps({"order": 123, "name": "Zoë"}).encode()),
        ("application/x-www-form-urlencoded", b"a=1&b=caf%C3%A9&b=2"),
        ("application/xml; charset=utf-8", b'<?xml version="1.0"?><order id="1">\xc3\xa9</order>'),
    ],
)
async def test_body_arrives_byte_exact_with_given_content_type(
    sender: Sender, receiver: Receiver, content_type: str, body: bytes
) -> None:
    await sender.send(request(receiver.url("/b"), "POST", {"Content-Type": content_type}, body))
    [got] = receiver.requests
    assert got.body == body
    assert got.headers["Content-Type"] == content_type


async def test_raw_body_gets_no_content_type_of_its_own(sender: Sender, receiver: Receiver) -> None:
    await sender.send(request(receiver.url("/b"), "PUT", body=b"\x00\x01raw"))
    [got] = receiver.requests
    assert got.body == b"\x00\x01raw"
    assert "Content-Type" not in got.headers


async def test_headers_sent_as_given_without_extras(sender: Sender, receiver: Receiver) -> None:
    headers = {"Idempotency-Key": "5f0c", "X-Task-Attempt": "2", "Authorization": "Bearer t"}
    await sender.send(request(receiver.url("/h"), headers=headers))
    [got] = receiver.requests
    assert {name for name, _ in got.raw_headers} == {*headers, "Host", "User-Agent"}
    assert all(got.headers[name] == value for name, value in headers.items())


async def test_default_user_agent_is_configured_one(receiver: Receiver) -> None:
    async with Sender(HttpConfig(user_agent="taskcenter/9.9")) as sender:
        await sender.send(request(receiver.url("/ua")))
    assert receiver.requests[0].headers["User-Agent"] == "taskcenter/9.9"


async def test_request_user_agent_overrides_default_case_insensitively(
    sender: Sender, receiver: Receiver
) -> None:
    await sender.send(request(receiver.url("/ua"), headers={"user-agent": "mine/1"}))
    assert receiver.requests[0].headers.getall("User-Agent") == ["mine/1"]


async def test_sequential_requests_reuse_keep_alive_connection(sender: Sender, receiver: Receiver) -> None:
    for _ in range(3):
        await sender.send(request(receiver.url("/k")))
    assert len({r.client_port for r in receiver.requests}) == 1


# --- responses ---


async def test_response_status_headers_and_body_returned(sender: Sender, receiver: Receiver) -> None:
    receiver.script(
        "/r", Reply(status=503, body="busy", headers={"Retry-After": "7", "X-Task-Retry": "stop"})
    )
    result = await sender.send(request(receiver.url("/r")))
    assert (result.status_code, result.body, result.truncated) == (503, "busy", False)
    assert (result.error, result.error_kind) == (None, None)
    assert result.header("retry-after") == "7"
    assert result.headers["X-Task-Retry"] == "stop"


async def test_response_decoded_with_declared_charset(sender: Sender, receiver: Receiver) -> None:
    receiver.script(
        "/c", Reply(body="café".encode("latin-1"), headers={"Content-Type": "text/plain; charset=latin-1"})
    )
    assert (await sender.send(request(receiver.url("/c")))).body == "café"


async def test_undecodable_body_is_replaced_not_fatal(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/c", Reply(body=b"ok\xff", headers={"Content-Type": "text/plain; charset=no-such"}))
    assert (await sender.send(request(receiver.url("/c")))).body == "ok\ufffd"


async def test_oversized_body_truncated_at_cap_and_flagged(receiver: Receiver) -> None:
    receiver.script("/big", Reply.oversized(5_000_000))
    async with Sender(HttpConfig(max_response_bytes=1000)) as sender:
        result = await sender.send(request(receiver.url("/big")))
    assert (result.status_code, len(result.body), result.truncated) == (200, 1000, True)


async def test_body_exactly_at_cap_is_not_truncated(receiver: Receiver) -> None:
    receiver.script("/cap", Reply(body=b"y" * 1000))
    async with Sender(HttpConfig(max_response_bytes=1000)) as sender:
        result = await sender.send(request(receiver.url("/cap")))
    assert (len(result.body), result.truncated) == (1000, False)


async def test_slow_body_is_read_whole(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/slow", Reply.slow(b"abcdef", chunk_size=2, interval_s=0.05))
    result = await sender.send(request(receiver.url("/slow")))
    assert (result.body, result.truncated) == ("abcdef", False)
    assert result.duration_ms >= 90


async def test_head_has_empty_body(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/head", Reply(body=b"not for HEAD"))
    result = await sender.send(request(receiver.url("/head"), "HEAD"))
    assert (result.status_code, result.body) == (200, "")


async def test_duration_covers_receiver_delay(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/d", Reply.delayed(0.2))
    assert (await sender.send(request(receiver.url("/d")))).duration_ms >= 200


# --- failures ---


async def test_late_answer_is_timeout(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/late", Reply.delayed(5))
    result = await sender.send(request(receiver.url("/late"), timeout_s=0.3))
    assert (result.status_code, result.error_kind) == (None, "timeout")
    assert 250 <= result.duration_ms < 2000


async def test_slow_body_past_timeout_is_timeout(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/trickle", Reply.slow(b"x" * 50, chunk_size=1, interval_s=0.05))
    result = await sender.send(request(receiver.url("/trickle"), timeout_s=0.5))
    assert result.error_kind == "timeout"


async def test_dropped_connection_is_network_error(sender: Sender, receiver: Receiver) -> None:
    receiver.set_default(Reply.dropped())
    result = await sender.send(request(receiver.url("/drop"), "POST", body=b"x"))
    assert (result.status_code, result.error_kind) == (None, "network_error")
    assert result.error == "server closed the connection without a response"


async def test_refused_port_is_network_error(sender: Sender) -> None:
    port = free_port()
    result = await sender.send(request(f"http://127.0.0.1:{port}/"))
    assert (result.error_kind, result.error) == ("network_error", f"connection refused: 127.0.0.1:{port}")


async def test_unknown_name_is_network_error(sender: Sender) -> None:
    result = await sender.send(request("http://nowhere.test/"))
    assert result.error_kind == "network_error"
    assert result.error is not None and result.error.startswith("DNS lookup failed: nowhere.test")


async def test_malformed_url_is_network_error_not_exception(sender: Sender) -> None:
    result = await sender.send(request("http://[zz/"))
    assert result.error_kind == "network_error"


def test_unsupported_method_is_refused_when_built() -> None:
    with pytest.raises(ValidationError):
        request("http://127.0.0.1/", "TRACE")


async def test_send_after_close_raises() -> None:
    sender = Sender(HttpConfig())
    await sender.close()
    with pytest.raises(RuntimeError):
        await sender.send(request("http://127.0.0.1/"))


async def test_final_url_is_the_url_as_sent_every_time(sender: Sender, receiver: Receiver) -> None:
    # The sender keeps each URL's parsed form; the second request must not differ from the first.
    given = named_url(receiver, "/a b?x=é", "HOOK.test")
    sent = f"http://hook.test:{receiver.port}/a%20b?x=%C3%A9"
    first = await sender.send(request(given))
    second = await sender.send(request(given))
    assert (first.status_code, first.final_url, second.final_url) == (200, sent, sent)
    assert [r.path for r in receiver.requests] == ["/a b", "/a b"]


async def test_blocked_url_is_reported_as_given(sender: Sender) -> None:
    given = "ftp://Example.com/a b"
    for _ in range(2):
        result = await sender.send(request(given, guard=LOOPBACK_ONLY))
        assert (result.error_kind, result.final_url) == ("blocked", given)
        assert result.error == f"scheme 'ftp' is not allowed: {given}"


# --- redirects ---


async def test_redirect_not_followed_by_default(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/from", Reply.redirect("/to", 302))
    result = await sender.send(request(receiver.url("/from")))
    assert (result.status_code, result.header("Location"), result.final_url) == (
        302,
        "/to",
        receiver.url("/from"),
    )
    assert receiver.requests_for("/to") == []


async def test_307_redirect_followed_keeps_method_and_body(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/from", Reply.redirect("/to", 307))
    headers = {"Content-Type": "application/json"}
    result = await sender.send(request(receiver.url("/from"), "POST", headers, b"{}", follow_redirects=True))
    assert (result.status_code, result.final_url) == (200, receiver.url("/to"))
    [hop] = receiver.requests_for("/to")
    assert (hop.method, hop.body, hop.headers["Content-Type"]) == ("POST", b"{}", "application/json")


async def test_303_redirect_turns_into_get_without_body(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/from", Reply.redirect("/to", 303))
    headers = {"Content-Type": "application/json"}
    await sender.send(request(receiver.url("/from"), "PUT", headers, b"{}", follow_redirects=True))
    [hop] = receiver.requests_for("/to")
    assert (hop.method, hop.body, hop.headers.get("Content-Type")) == ("GET", b"", None)


async def test_302_redirect_turns_post_into_get(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/from", Reply.redirect(receiver.url("/to"), 302))
    await sender.send(request(receiver.url("/from"), "POST", body=b"a=1", follow_redirects=True))
    assert receiver.requests_for("/to")[0].method == "GET"


async def test_redirect_limit_returns_last_redirect_with_error(receiver: Receiver) -> None:
    receiver.set_default(Reply.redirect("/loop"), path="/loop")
    async with Sender(HttpConfig(max_redirects=3)) as sender:
        result = await sender.send(request(receiver.url("/loop"), follow_redirects=True))
    assert (result.status_code, result.error_kind, result.error) == (302, None, "too many redirects (max 3)")
    assert len(receiver.requests) == 4


async def test_authorization_dropped_on_cross_host_redirect(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/from", Reply.redirect(named_url(receiver, "/to", "other.test")))
    auth = {"Authorization": "Bearer secret", "X-Other": "kept"}
    await sender.send(request(named_url(receiver, "/from"), headers=auth, follow_redirects=True))
    [hop] = receiver.requests_for("/to")
    assert ("Authorization" in hop.headers, hop.headers["X-Other"]) == (False, "kept")


async def test_authorization_kept_on_same_host_redirect(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/from", Reply.redirect("/to"))
    auth = {"Authorization": "Bearer secret"}
    await sender.send(request(named_url(receiver, "/from"), headers=auth, follow_redirects=True))
    assert receiver.requests_for("/to")[0].headers["Authorization"] == "Bearer secret"


async def test_total_timeout_spans_redirect_hops(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/a", Reply(status=302, headers={"Location": "/b"}, delay_s=0.25))
    receiver.script("/b", Reply.delayed(0.25))
    result = await sender.send(request(receiver.url("/a"), timeout_s=0.4, follow_redirects=True))
    assert result.error_kind == "timeout"


# --- SSRF guard ---


async def test_guard_blocks_loopback_literal_and_nothing_arrives(sender: Sender, receiver: Receiver) -> None:
    result = await sender.send(request(receiver.url("/x"), "POST", body=b"x", guard=GuardPolicy()))
    assert (result.status_code, result.error_kind) == (None, "blocked")
    assert result.error is not None and "loopback" in result.error
    await asyncio.sleep(0.05)
    assert receiver.requests == []


async def test_guard_blocks_name_resolving_to_loopback(sender: Sender, receiver: Receiver) -> None:
    result = await sender.send(request(named_url(receiver, "/x"), guard=GuardPolicy()))
    assert (result.error_kind, result.error) == (
        "blocked",
        "hook.test resolves only to forbidden addresses: 127.0.0.1 (loopback)",
    )
    await asyncio.sleep(0.05)
    assert receiver.requests == []


@pytest.mark.parametrize("name", ["127.0.0.1", "hook.test"])
async def test_guard_with_allowed_network_delivers(sender: Sender, receiver: Receiver, name: str) -> None:
    result = await sender.send(request(named_url(receiver, "/ok", name), guard=LOOPBACK_ONLY))
    assert (result.status_code, result.error_kind) == (200, None)
    assert len(receiver.requests_for("/ok")) == 1


async def test_disabled_guard_delivers_to_loopback(sender: Sender, receiver: Receiver) -> None:
    result = await sender.send(request(receiver.url("/ok"), guard=GuardPolicy(enabled=False)))
    assert result.status_code == 200


async def test_guard_blocks_redirect_hop_to_forbidden_name(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/start", Reply.redirect(named_url(receiver, "/secret", "internal.test")))
    guard = GuardPolicy.from_lists(allow_hosts=["hook.test"])
    result = await sender.send(request(named_url(receiver, "/start"), guard=guard, follow_redirects=True))
    assert (result.status_code, result.error_kind) == (None, "blocked")
    assert result.final_url == named_url(receiver, "/secret", "internal.test")
    assert [r.path for r in receiver.requests] == ["/start"]


async def test_guard_blocks_redirect_hop_to_loopback_literal(sender: Sender, receiver: Receiver) -> None:
    receiver.script("/start", Reply.redirect(receiver.url("/secret")))
    guard = GuardPolicy.from_lists(allow_hosts=["hook.test"])
    result = await sender.send(request(named_url(receiver, "/start"), guard=guard, follow_redirects=True))
    assert result.error_kind == "blocked"
    assert [r.path for r in receiver.requests] == ["/start"]


@pytest_asyncio.fixture
async def twin_receivers() -> AsyncIterator[tuple[Receiver, Receiver]]:
    """Receivers on 127.0.0.1 and ::1 sharing one port, so one URL can reach either."""
    async with Receiver("127.0.0.1") as v4, Receiver("::1", port=v4.port) as v6:
        yield v4, v6


async def test_unguarded_name_connects_to_first_resolved_address(
    twin_receivers: tuple[Receiver, Receiver],
) -> None:
    """The premise of the next test: without the guard, ::1 (listed first) gets the request."""
    v4, v6 = twin_receivers
    async with Sender(HttpConfig(), lambda: StaticResolver({"twin.test": ["::1", "127.0.0.1"]})) as sender:
        await sender.send(request(f"http://twin.test:{v4.port}/"))
    assert (len(v6.requests), len(v4.requests)) == (1, 0)


async def test_guard_connects_only_to_vetted_addresses(twin_receivers: tuple[Receiver, Receiver]) -> None:
    v4, v6 = twin_receivers
    guard = GuardPolicy.from_lists(["127.0.0.1/32"])
    async with Sender(HttpConfig(), lambda: StaticResolver({"twin.test": ["::1", "127.0.0.1"]})) as sender:
        result = await sender.send(request(f"http://twin.test:{v4.port}/", guard=guard))
    assert result.status_code == 200
    assert (len(v6.requests), len(v4.requests)) == (0, 1)
