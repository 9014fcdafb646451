"""End to end: tasks stored, claimed, sent to a real loopback receiver, retried, recorded — on both backends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from taskcenter.dispatcher import Dispatcher
from taskcenter.runtime import Runtime
from taskcenter.service import Business
from tests.receiver import Receiver, Reply


@contextlib.asynccontextmanager
async def running(rt: Runtime, **kwargs: object) -> AsyncIterator[Dispatcher]:
    dispatcher = rt.dispatcher(**kwargs)  # type: ignore[arg-type]
    task = asyncio.create_task(rt.run_dispatcher(dispatcher))
    try:
        yield dispatcher
    finally:
        dispatcher.stop()
        await asyncio.wait_for(task, timeout=15)


async def wait_status(rt: Runtime, biz: Business, task_id: str, *statuses: str, timeout: float = 10) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        task = await rt.service.get_task(biz, task_id)
        if task.status in statuses:
            return task.status
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"task stayed {task.status}, expected {statuses}")
        await asyncio.sleep(0.05)


async def test_task_is_delivered_with_the_added_headers(runtime: Runtime, receiver: Receiver) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    task = await runtime.service.create_task(
        biz,
        {
            "business_id": "order-1",
            "url": receiver.url("/hook"),
            "json": {"order": 1},
            "headers": {"X-A": "b"},
        },
    )
    async with running(runtime):
        [req] = await receiver.wait_for(1, "/hook", timeout=10)
        await wait_status(runtime, biz, task.id, "succeeded")
    assert req.method == "POST"
    assert req.json() == {"order": 1}
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Idempotency-Key"] == task.id
    assert req.headers["X-Task-Id"] == task.id
    assert req.headers["X-Task-Attempt"] == "1"
    assert req.headers["X-Business-Id"] == "order-1"
    assert req.headers["X-A"] == "b"
    assert req.headers["User-Agent"].startswith("taskcenter/")
    done = await runtime.service.get_task(biz, task.id)
    assert done.attempts == 1 and done.outcome == "success" and done.finished_at is not None
    [attempt] = await runtime.service.attempts(biz, task.id)
    assert attempt.outcome == "success" and attempt.response and attempt.response["status_code"] == 200


async def test_server_error_is_retried_then_succeeds(runtime: Runtime, receiver: Receiver) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    receiver.script("/flaky", Reply(status=503), Reply(status=500), Reply(status=200))
    task = await runtime.service.create_task(
        biz,
        {
            "business_id": "b1",
            "url": receiver.url("/flaky"),
            "retry": {"strategy": "intervals", "intervals": [0.1, 0.1]},
        },
    )
    async with running(runtime):
        await wait_status(runtime, biz, task.id, "succeeded")
    attempts = await runtime.service.attempts(biz, task.id)
    assert [a.outcome for a in attempts] == ["server_error", "server_error", "success"]
    assert [r.headers["X-Task-Attempt"] for r in receiver.requests_for("/flaky")] == ["1", "2", "3"]


async def test_exhausted_retries_fail_the_task(runtime: Runtime, receiver: Receiver) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    receiver.set_default(Reply(status=502), "/down")
    task = await runtime.service.create_task(
        biz,
        {
            "business_id": "b2",
            "url": receiver.url("/down"),
            "retry": {"strategy": "intervals", "intervals": [0.05]},
        },
    )
    async with running(runtime):
        await wait_status(runtime, biz, task.id, "failed")
    done = await runtime.service.get_task(biz, task.id)
    assert done.attempts == 2 and done.outcome == "server_error"
    assert done.last_response is not None and done.last_response["status_code"] == 502
    assert isinstance(done.last_response["duration_ms"], int)


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (Reply(status=404), "client_error"),
        (Reply(status=410), "stopped"),
        (Reply(status=500, headers={"X-Task-Retry": "stop"}), "stopped"),
    ],
)
async def test_final_answers_fail_at_once(
    runtime: Runtime, receiver: Receiver, reply: Reply, outcome: str
) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    receiver.script("/final", reply)
    task = await runtime.service.create_task(biz, {"business_id": "f", "url": receiver.url("/final")})
    async with running(runtime):
        await wait_status(runtime, biz, task.id, "failed")
    done = await runtime.service.get_task(biz, task.id)
    assert done.attempts == 1 and done.outcome == outcome


async def test_many_tasks_are_each_delivered_once(runtime: Runtime, receiver: Receiver) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    items = [{"business_id": f"k{i}", "url": receiver.url("/bulk"), "json": {"i": i}} for i in range(300)]
    results = await runtime.service.create_tasks(biz, items)
    assert all(r["status"] == 201 for r in results)
    async with running(runtime, concurrency=20) as dispatcher:
        await receiver.wait_for(300, "/bulk", timeout=30)
        for _ in range(100):
            if dispatcher.delivered == 300:
                break
            await asyncio.sleep(0.05)
    seen = sorted(r.json()["i"] for r in receiver.requests_for("/bulk"))
    assert seen == list(range(300))
    page, _ = await runtime.service.list_tasks(biz, status=["succeeded"], limit=500)
    assert len(page) == 300


async def test_a_finished_task_notifies_its_notify_url(runtime: Runtime, receiver: Receiver) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    receiver.set_default(Reply(status=404), "/gone")
    ok = await runtime.service.create_task(
        biz, {"business_id": "n1", "url": receiver.url("/hook"), "notify": {"url": receiver.url("/notify")}}
    )
    bad = await runtime.service.create_task(
        biz,
        {
            "business_id": "n2",
            "url": receiver.url("/gone"),
            "notify": {"url": receiver.url("/notify"), "on": ["failed"]},
        },
    )
    quiet = await runtime.service.create_task(
        biz,
        {
            "business_id": "n3",
            "url": receiver.url("/hook"),
            "notify": {"url": receiver.url("/notify"), "on": ["failed"]},
        },
    )
    async with running(runtime):
        notes = await receiver.wait_for(2, "/notify", timeout=15)
        await wait_status(runtime, biz, quiet.id, "succeeded")
        await asyncio.sleep(0.3)
    events = {n.json()["task"]["id"]: n.json() for n in notes}
    assert len(receiver.requests_for("/notify")) == 2, "n3 asked only for failures"
    assert events[ok.id]["type"] == "task.succeeded" and events[ok.id]["task"]["business_id"] == "n1"
    assert events[bad.id]["type"] == "task.failed" and events[bad.id]["task"]["outcome"] == "client_error"
    note = await runtime.service.get_by_business_id(biz, f"notify:{ok.id}:succeeded")
    assert note.status == "succeeded"


async def test_cancelling_notifies_when_asked(runtime: Runtime, receiver: Receiver) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    task = await runtime.service.create_task(
        biz,
        {
            "business_id": "c1",
            "url": receiver.url("/hook"),
            "delay": 60,
            "notify": {"url": receiver.url("/notify"), "on": ["cancelled"]},
        },
    )
    await runtime.service.cancel(biz, task.id)
    async with running(runtime):
        [note] = await receiver.wait_for(1, "/notify", timeout=10)
    assert note.json()["type"] == "task.cancelled"
    assert receiver.requests_for("/hook") == []


async def test_a_response_body_with_a_nul_byte_is_recorded_once(runtime: Runtime, receiver: Receiver) -> None:
    """PostgreSQL's jsonb holds no U+0000: the result of a 200 whose body had one could not be written, the
    lease ran out and the task was sent again, and again. The NUL is kept as U+FFFD, like undecodable bytes."""
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    receiver.set_default(Reply(status=200, body=b"ok\x00bad\xff"), "/nul")
    task = await runtime.service.create_task(biz, {"business_id": "n1", "url": receiver.url("/nul")})
    async with running(runtime):
        await wait_status(runtime, biz, task.id, "succeeded")
    done = await runtime.service.get_task(biz, task.id)
    assert done.last_response is not None and done.last_response["body"] == "ok\ufffdbad\ufffd"
    [attempt] = await runtime.service.attempts(biz, task.id)
    assert attempt.response is not None and attempt.response["body"] == "ok\ufffdbad\ufffd"
    assert len(receiver.requests_for("/nul")) == 1
