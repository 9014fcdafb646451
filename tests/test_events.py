"""Lifecycle events for in-process listeners: created, attempted, succeeded, failed, cancelled."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
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


async def wait_until(condition: Any, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_created_handler_receives_the_new_task(atc: TaskCenter) -> None:
    seen: Seen = []
    atc.on("created", recorder(seen))
    task = await atc.acreate_task("POST", "http://127.0.0.1:9/", business_id="e-1", metadata={"m": 1})
    await settle(seen, 1)
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
    await settle(seen, 1)
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


# -- delivery never holds up the dispatcher ------------------------------------------------------------------


async def test_a_hanging_async_handler_holds_up_neither_the_writing_of_results_nor_other_tasks(
    db_url: str, receiver: Receiver
) -> None:
    """The handler of one task's ``attempted`` never returns: other tasks are still sent and their results written.

    It used to be awaited inside the dispatcher's write loop, so later results waited for it — for ever on
    PostgreSQL, and on SQLite until the claim loop next woke up to claim (here, the 60 s poll)."""
    entered = asyncio.Event()
    hang = asyncio.Event()

    async def hanging(_event: str, data: dict[str, Any]) -> None:
        if data["business_id"] == "first":
            entered.set()
            await hang.wait()

    async with TaskCenter(settings=make_settings(db_url, poll_interval_s=60), business="shop") as atc:
        atc.on("attempted", hanging)
        first = await atc.acreate_task("POST", receiver.url("/ok"), business_id="first")
        async with working(atc):
            await wait_status(atc, first.id, "succeeded")
            await asyncio.wait_for(entered.wait(), timeout=10)
            later = [
                await atc.acreate_task("POST", receiver.url("/ok"), business_id=f"later-{n}")
                for n in range(3)
            ]
            for task in later:
                await wait_status(atc, task.id, "succeeded")
            assert not hang.is_set()
            hang.set()


async def test_a_blocking_sync_handler_runs_off_the_event_loop(atc: TaskCenter, receiver: Receiver) -> None:
    """A sync handler that blocks (a slow HTTP call, a lock) used to block the event loop, and with it everything."""
    entered = threading.Event()
    release = threading.Event()
    returned = threading.Event()
    threads: list[threading.Thread] = []

    def blocking(_event: str, data: dict[str, Any]) -> None:
        threads.append(threading.current_thread())
        if data["business_id"] == "first":
            entered.set()
            release.wait(timeout=15)
            returned.set()

    atc.on("attempted", blocking)
    first = await atc.acreate_task("POST", receiver.url("/ok"), business_id="first")
    try:
        async with working(atc):
            await wait_status(atc, first.id, "succeeded")
            await wait_until(entered.is_set)
            later = await atc.acreate_task("POST", receiver.url("/ok"), business_id="later")
            await wait_status(atc, later.id, "succeeded")
            assert not returned.is_set(), "the loop waited for the blocking handler"
            release.set()
    finally:
        release.set()
    assert threading.current_thread() not in threads


async def test_events_of_one_task_keep_their_order_when_a_handler_is_slow(
    atc: TaskCenter, receiver: Receiver
) -> None:
    seen: Seen = []

    async def slow(event: str, data: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)
        seen.append((event, data))

    atc.on("attempted", slow)
    atc.on("failed", recorder(seen))
    atc.on("succeeded", async_recorder(seen))
    receiver.set_default(Reply(status=503), "/down")
    tasks = [
        await atc.acreate_task(
            "POST", receiver.url("/down"), business_id=f"e-{n}", retry=RetryPolicy.from_intervals([0.01])
        )
        for n in range(3)
    ]
    async with working(atc):
        for task in tasks:
            await wait_status(atc, task.id, "failed")
        await settle(seen, 9)
    for task in tasks:
        mine = [(event, data["attempt"]) for event, data in seen if data["id"] == task.id]
        assert mine == [("attempted", 1), ("attempted", 2), ("failed", 2)]


async def test_when_handlers_cannot_keep_up_new_events_are_dropped_counted_and_logged(
    atc: TaskCenter, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    release = asyncio.Event()
    seen: Seen = []

    async def stuck(event: str, data: dict[str, Any]) -> None:
        await release.wait()
        seen.append((event, data))

    atc.events.max_queued = 2
    atc.on("attempted", stuck)
    tasks = [await atc.acreate_task("POST", receiver.url("/ok"), business_id=f"e-{n}") for n in range(6)]
    with caplog.at_level(logging.WARNING, logger="taskcenter.events"):
        async with working(atc):
            for task in tasks:
                await wait_status(atc, task.id, "succeeded")  # written all the same
            await wait_until(lambda: atc.events.dropped["attempted"] > 0)
            release.set()
    # Those taken for delivery and the two queued behind them reach the handler; the rest were dropped.
    dropped = atc.events.dropped["attempted"]
    assert len(seen) + dropped == 6 and len(seen) >= 2
    assert "event handlers cannot keep up" in caplog.text
    metric = f'taskcenter_events_dropped_total{{event="attempted"}} {dropped:.1f}'
    assert metric in atc.runtime.metrics.render().decode()


async def test_queued_events_are_delivered_when_the_worker_stops(atc: TaskCenter, receiver: Receiver) -> None:
    seen: Seen = []

    async def slow(event: str, data: dict[str, Any]) -> None:
        await asyncio.sleep(0.1)
        seen.append((event, data))

    atc.on("attempted", slow)
    atc.on("succeeded", slow)
    tasks = [await atc.acreate_task("POST", receiver.url("/ok"), business_id=f"e-{n}") for n in range(5)]
    async with working(atc):
        for task in tasks:
            await wait_status(atc, task.id, "succeeded")
    assert len(seen) == 10  # all delivered by the time the worker has stopped


async def test_events_still_queued_after_the_grace_period_are_dropped_and_logged(
    db_url: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    async with TaskCenter(settings=make_settings(db_url, shutdown_grace_s=0.3), business="shop") as atc:
        entered = asyncio.Event()

        async def hanging(_event: str, _data: dict[str, Any]) -> None:
            entered.set()
            await asyncio.sleep(3600)

        atc.on("attempted", hanging)
        task = await atc.acreate_task("POST", receiver.url("/ok"), business_id="e-1")
        with caplog.at_level(logging.WARNING, logger="taskcenter.events"):
            started = time.monotonic()
            async with working(atc):
                await wait_status(atc, task.id, "succeeded")
                await asyncio.wait_for(entered.wait(), timeout=10)
            assert time.monotonic() - started < 14  # the worker stopped; it did not wait on the handler
    assert "did not finish within 0.3 s" in caplog.text


async def test_each_handler_gets_its_own_copy_of_the_data(atc: TaskCenter, receiver: Receiver) -> None:
    """Two handlers of one event used to share one dict: what the first changed, the second saw."""
    seen: Seen = []

    def meddler(event: str, data: dict[str, Any]) -> None:
        data["status"] = "meddled"
        data["last_response"]["headers"].clear()
        if "metadata" in data:
            data["metadata"]["m"] = "meddled"

    for event in ("created", "attempted", "succeeded"):
        atc.on(event, meddler)
        atc.on(event, recorder(seen))
    task = await atc.acreate_task("POST", receiver.url("/ok"), business_id="e-1", metadata={"m": 1})
    async with working(atc):
        await wait_status(atc, task.id, "succeeded")
        await settle(seen, 3)
    created, attempted, succeeded = (data for _, data in seen)
    assert created["status"] == "pending" and created["metadata"] == {"m": 1}
    assert attempted["status"] == succeeded["status"] == "succeeded"
    assert attempted["last_response"]["headers"] and succeeded["last_response"]["headers"]


async def test_without_handlers_no_delivery_task_is_started(atc: TaskCenter, receiver: Receiver) -> None:
    atc.on("cancelled", recorder([]))  # a handler of another event
    task = await atc.acreate_task("POST", receiver.url("/ok"), business_id="e-1")
    async with working(atc):
        await wait_status(atc, task.id, "succeeded")
    assert atc.events._delivery is None


def test_a_sync_handler_may_call_the_sync_api(db_url: str) -> None:
    """Sync handlers run in a thread, not on the instance's private loop, so the sync methods work there."""
    statuses: list[str] = []
    with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
        tc.on("created", lambda _event, data: statuses.append(tc.get_task(data["id"]).status))
        tc.create_task("POST", "http://127.0.0.1:9/", business_id="e-1", delay=60)
        deadline = time.monotonic() + 10
        while not statuses and time.monotonic() < deadline:
            time.sleep(0.02)
    assert statuses == ["pending"]
