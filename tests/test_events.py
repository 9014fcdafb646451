"""Lifecycle events for in-process listeners: created, attempted, succeeded, failed, cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa

from taskcenter import PermanentFailure, RetryPolicy, TaskCenter, ValidationError
from tests.conftest import make_settings
from tests.receiver import Receiver, Reply
from tests.test_library import wait_status, working

Seen = list[tuple[str, dict[str, Any]]]


@pytest_asyncio.fixture
async def atc(db_url: str) -> AsyncIterator[TaskCenter]:
    async with TaskCenter(settings=make_settings(db_url), business="shop") as center:
        yield center


def recorder(seen: Seen) -> Any:
    def handler(event: str, data: dict[str, Any]) -> None:
        seen.append((event, data))

    return handler


def async_recorder(seen: Seen) -> Any:
    async def handler(event: str, data: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        seen.append((event, data))

    return handler


async def settle(seen: Seen, count: int, timeout: float = 5) -> None:
    """Events are emitted after the result is written: wait for them rather than racing the writer."""
    async with asyncio.timeout(timeout):
        while len(seen) < count:
            await asyncio.sleep(0.02)


async def test_created_handler_receives_the_new_task(atc: TaskCenter) -> None:
    seen: Seen = []
    atc.on("created", recorder(seen))
    task = await atc.acreate_task("POST", "http://127.0.0.1:9/", business_id="e-1", metadata={"m": 1})
    [(event, data)] = seen
    assert event == "created" and data["id"] == task.id and data["status"] == "pending"
    assert data["business_id"] == "e-1" and data["metadata"] == {"m": 1}
    assert isinstance(data["created_at"], str)  # JSON-ready, like the API representation


async def test_attempted_then_succeeded_reach_sync_and_async_handlers(
    atc: TaskCenter, receiver: Receiver
) -> None:
    seen: Seen = []
    for event in ("attempted", "succeeded", "failed"):
        atc.on(event, recorder(seen))
        atc.on(event, async_recorder(seen))
    task = await atc.acreate_task("POST", receiver.url("/ok"), business_id="e-1")
    async with working(atc):
        await wait_status(atc, task.id, "succeeded")
        await settle(seen, 4)
    assert [event for event, _ in seen] == ["attempted", "attempted", "succeeded", "succeeded"]
    data = seen[-1][1]
    assert data["id"] == task.id and data["business_id"] == "e-1" and data["attempt"] == 1
    assert data["status"] == "succeeded" and data["outcome"] == "success"
    assert data["last_response"]["status_code"] == 200
    assert set(data["last_response"]) == {"status_code", "headers", "body", "truncated", "duration_ms"}
    assert isinstance(data["last_response"]["duration_ms"], int)


async def test_attempted_fires_for_every_attempt_and_failed_once(atc: TaskCenter, receiver: Receiver) -> None:
    seen: Seen = []
    for event in ("attempted", "succeeded", "failed"):
        atc.on(event, recorder(seen))
    receiver.set_default(Reply(status=503), "/down")
    task = await atc.acreate_task(
        "POST", receiver.url("/down"), business_id="e-1", retry=RetryPolicy.from_intervals([0.05])
    )
    async with working(atc):
        await wait_status(atc, task.id, "failed")
        await settle(seen, 3)
    assert [(e, d["attempt"], d["status"]) for e, d in seen] == [
        ("attempted", 1, "retrying"),
        ("attempted", 2, "failed"),
        ("failed", 2, "failed"),
    ]
    assert seen[-1][1]["outcome"] == "server_error"


async def test_processor_failure_emits_failed_with_outcome_stopped(atc: TaskCenter) -> None:
    seen: Seen = []
    atc.on("failed", async_recorder(seen))

    @atc.processor("boom")
    async def boom(payload: Any) -> None:
        raise PermanentFailure("no")

    task = await atc.acreate_task(type="boom", payload={}, business_id="e-1")
    async with working(atc):
        await wait_status(atc, task.id, "failed")
        await settle(seen, 1)
    [(_, data)] = seen
    assert data["id"] == task.id and data["outcome"] == "stopped"


async def test_cancelled_handler_receives_the_cancelled_task(atc: TaskCenter) -> None:
    seen: Seen = []
    atc.on("cancelled", async_recorder(seen))
    task = await atc.acreate_task("POST", "http://127.0.0.1:9/", business_id="e-1", delay=60)
    await atc.acancel(task.id)
    [(event, data)] = seen
    assert event == "cancelled" and data["id"] == task.id and data["status"] == "cancelled"


async def test_raising_handlers_do_not_break_delivery(
    atc: TaskCenter, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    seen: Seen = []

    def bad_sync(event: str, data: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    async def bad_async(event: str, data: dict[str, Any]) -> None:
        raise RuntimeError("async listener bug")

    for event in ("created", "attempted", "succeeded"):
        atc.on(event, bad_sync)
        atc.on(event, bad_async)
        atc.on(event, recorder(seen))  # registered after the raising ones: still called
    with caplog.at_level(logging.ERROR, logger="taskcenter.events"):
        task = await atc.acreate_task("POST", receiver.url("/ok"), business_id="e-1")
        async with working(atc):
            await wait_status(atc, task.id, "succeeded")
            await settle(seen, 3)
    assert [event for event, _ in seen] == ["created", "attempted", "succeeded"]
    assert len(receiver.requests_for("/ok")) == 1
    assert sum("event handler for" in r.getMessage() for r in caplog.records) == 6


async def test_unknown_event_name_is_refused(atc: TaskCenter) -> None:
    with pytest.raises(ValidationError) as info:
        atc.on("finished", recorder([]))
    assert info.value.field == "event"


async def test_a_handler_that_is_not_callable_is_refused_when_registered(atc: TaskCenter) -> None:
    """It used to register, then fail (logged only) at every event."""
    with pytest.raises(ValidationError) as info:
        atc.on("failed", "notify_ops")  # type: ignore[arg-type]
    assert info.value.field == "handler"
    assert not atc.events.wants("failed")


def test_sync_surface_emits_created_and_cancelled(db_url: str) -> None:
    seen: Seen = []
    with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
        tc.on("created", recorder(seen))
        tc.on("cancelled", async_recorder(seen))
        task = tc.create_task("POST", "http://127.0.0.1:9/", business_id="e-1")
        tc.cancel(task.id)
    assert [(event, data["id"]) for event, data in seen] == [("created", task.id), ("cancelled", task.id)]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sync_outbox_create_emits_created_like_every_create_path(db_url: str) -> None:
    seen: Seen = []
    engine = sa.create_engine(db_url)
    try:
        with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
            tc.on("created", recorder(seen))
            with engine.begin() as conn:
                task = tc.create_task("POST", "http://127.0.0.1:9/", business_id="e-1", connection=conn)
    finally:
        engine.dispose()
    assert [(event, data["id"]) for event, data in seen] == [("created", task.id)]
