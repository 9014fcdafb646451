"""The SSRF guard end to end: guard on and loopback not allowed, a task to a loopback receiver fails ``blocked``
without a single connection being made; per-business allow lists let one business through; deny lists close
hosts again. Only loopback receivers are involved."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio
import sqlalchemy as sa

from taskcenter.runtime import Runtime
from taskcenter.service import Business
from taskcenter.storage.schema import businesses
from tests.conftest import make_settings
from tests.receiver import Receiver
from tests.test_delivery import running, wait_status

FAST = 600_000


class ConnectionCounter:
    """A bare TCP listener on loopback that counts accepted connections (and hangs up on each)."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ConnectionCounter:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()


@pytest_asyncio.fixture
async def counter() -> AsyncIterator[ConnectionCounter]:
    async with ConnectionCounter() as c:
        yield c


@contextlib.asynccontextmanager
async def guarded(db_url: str, **settings: Any) -> AsyncIterator[Runtime]:
    """A runtime whose guard is on and lets no loopback address through (unlike the test default)."""
    rt = Runtime(make_settings(db_url, **{"allow_networks": "", **settings}))
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


async def set_lists(rt: Runtime, biz: Business, **lists: list[str]) -> None:
    """Write a business's own guard lists (allow_networks, allow_hosts, deny_hosts) to its row."""
    async with rt.db.write() as conn:
        await conn.execute(sa.update(businesses).where(businesses.c.id == biz.pk).values(**lists))


async def test_task_to_loopback_fails_blocked_and_no_packet_leaves(
    db_url: str, receiver: Receiver, counter: ConnectionCounter
) -> None:
    async with guarded(db_url) as rt:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=FAST)
        to_receiver = await rt.service.create_task(biz, {"business_id": "r", "url": receiver.url("/hook")})
        to_counter = await rt.service.create_task(
            biz, {"business_id": "c", "url": f"http://127.0.0.1:{counter.port}/"}
        )
        async with running(rt):
            for task in (to_receiver, to_counter):
                await wait_status(rt, biz, task.id, "failed")
        for task in (to_receiver, to_counter):
            done = await rt.service.get_task(biz, task.id)
            assert (done.outcome, done.attempts, done.last_response) == ("blocked", 1, None)
            [attempt] = await rt.service.attempts(biz, task.id)
            assert attempt.outcome == "blocked" and attempt.response is None
            assert attempt.error is not None and "loopback" in attempt.error
    assert receiver.requests == []
    assert counter.connections == 0


async def test_a_name_resolving_to_loopback_is_blocked_after_dns(
    db_url: str, counter: ConnectionCounter
) -> None:
    """The check is on the addresses connected to: ``localhost`` is refused once it resolves."""
    async with guarded(db_url) as rt:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=FAST)
        task = await rt.service.create_task(
            biz, {"business_id": "n", "url": f"http://localhost:{counter.port}/"}
        )
        async with running(rt):
            await wait_status(rt, biz, task.id, "failed")
        done = await rt.service.get_task(biz, task.id)
        assert (done.outcome, done.attempts) == ("blocked", 1)
        assert done.last_error is not None and "localhost" in done.last_error
    assert counter.connections == 0


async def test_business_allow_networks_lets_only_that_business_through(
    db_url: str, receiver: Receiver
) -> None:
    """Set on a running dispatcher: the business's list arrives with the next policy reload (every 2 s)."""
    async with guarded(db_url) as rt:
        trusted = await rt.service.ensure_business("trusted", rate_limit_per_minute=FAST)
        other = await rt.service.ensure_business("other", rate_limit_per_minute=FAST)
        async with running(rt):
            await set_lists(rt, trusted, allow_networks=["127.0.0.0/8"])
            await asyncio.sleep(2.5)  # one reload interval, and a little
            allowed = await rt.service.create_task(
                trusted, {"business_id": "t", "url": receiver.url("/trusted")}
            )
            refused = await rt.service.create_task(other, {"business_id": "o", "url": receiver.url("/other")})
            await wait_status(rt, trusted, allowed.id, "succeeded")
            await wait_status(rt, other, refused.id, "failed")
        assert (await rt.service.get_task(other, refused.id)).outcome == "blocked"
    assert [r.path for r in receiver.requests] == ["/trusted"]


async def test_global_deny_hosts_wins_over_allowed_networks(db_url: str, counter: ConnectionCounter) -> None:
    async with guarded(db_url, allow_networks="127.0.0.0/8,::1/128", deny_hosts="localhost") as rt:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=FAST)
        denied = await rt.service.create_task(
            biz, {"business_id": "d", "url": f"http://localhost:{counter.port}/"}
        )
        async with running(rt):
            await wait_status(rt, biz, denied.id, "failed")
        done = await rt.service.get_task(biz, denied.id)
        assert (done.outcome, done.attempts) == ("blocked", 1)
        assert done.last_error is not None and "denied" in done.last_error
    assert counter.connections == 0


async def test_business_deny_hosts_closes_a_host_for_that_business_only(
    db_url: str, receiver: Receiver
) -> None:
    async with guarded(db_url, allow_networks="127.0.0.0/8") as rt:
        careful = await rt.service.ensure_business("careful", rate_limit_per_minute=FAST)
        other = await rt.service.ensure_business("other", rate_limit_per_minute=FAST)
        await set_lists(rt, careful, deny_hosts=["127.0.0.1"])
        await rt.policies.load()
        refused = await rt.service.create_task(careful, {"business_id": "c", "url": receiver.url("/careful")})
        allowed = await rt.service.create_task(other, {"business_id": "o", "url": receiver.url("/other")})
        async with running(rt):
            await wait_status(rt, careful, refused.id, "failed")
            await wait_status(rt, other, allowed.id, "succeeded")
        assert (await rt.service.get_task(careful, refused.id)).outcome == "blocked"
    assert [r.path for r in receiver.requests] == ["/other"]


async def test_guard_default_lets_the_test_settings_reach_loopback(
    runtime: Runtime, receiver: Receiver
) -> None:
    """Control: the same task is delivered when TASKCENTER_ALLOW_NETWORKS lets loopback through."""
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=FAST)
    task = await runtime.service.create_task(biz, {"business_id": "ok", "url": receiver.url("/hook")})
    async with running(runtime):
        await wait_status(runtime, biz, task.id, "succeeded")
    assert len(receiver.requests) == 1
