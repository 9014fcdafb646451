"""Custom processors: a JSON payload in, a JSON result out; an exception retries, PermanentFailure fails now."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from taskcenter import PermanentFailure, RetryPolicy, TaskCenter, ValidationError
from taskcenter.domain.task import rfc3339
from taskcenter.stats import StatsService
from taskcenter.storage import queue
from tests.conftest import make_settings
from tests.receiver import Receiver
from tests.test_library import wait_status, working

FAST = RetryPolicy.from_intervals([0.1, 0.1])


@pytest_asyncio.fixture
async def atc(db_url: str) -> AsyncIterator[TaskCenter]:
    async with TaskCenter(settings=make_settings(db_url), business="shop") as center:
        yield center


async def test_async_processor_result_is_stored_and_the_task_succeeds(atc: TaskCenter) -> None:
    seen: list[Any] = []

    @atc.processor("create_server", retry=FAST)
    async def create_server(payload: dict[str, Any]) -> dict[str, Any]:
        seen.append(payload)
        return {"server_id": 42, "name": payload["name"]}

    task = await atc.acreate_task(type="create_server", payload={"name": "web-1"}, business_id="s-1")
    assert task.type == "create_server" and task.request is None and task.payload == {"name": "web-1"}
    async with working(atc):
        done = await wait_status(atc, task.id, "succeeded", "failed")
    assert done.status == "succeeded" and done.outcome == "success" and done.attempts == 1
    assert done.result == {"server_id": 42, "name": "web-1"}
    assert seen == [{"name": "web-1"}]


async def test_sync_processor_runs_off_the_event_loop_and_its_result_is_stored(atc: TaskCenter) -> None:
    threads: list[str] = []

    @atc.processor("create_server", retry=FAST)
    def create_server(payload: dict[str, Any]) -> list[int]:
        threads.append(threading.current_thread().name)
        return [payload["n"], payload["n"] * 2]

    task = await atc.acreate_task(type="create_server", payload={"n": 3}, business_id="s-1")
    async with working(atc):
        done = await wait_status(atc, task.id, "succeeded", "failed")
    assert done.status == "succeeded" and done.result == [3, 6]
    assert threads and threads[0] != threading.current_thread().name


async def test_exception_twice_then_success_takes_three_attempts(atc: TaskCenter) -> None:
    calls = 0

    @atc.processor("create_server", retry=FAST)
    async def create_server(payload: Any) -> dict[str, bool]:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError(f"cloud API down ({calls})")
        return {"ok": True}

    task = await atc.acreate_task(type="create_server", payload=None, business_id="s-1")
    async with working(atc):
        done = await wait_status(atc, task.id, "succeeded", "failed")
    assert done.status == "succeeded" and done.attempts == 3 and done.result == {"ok": True}
    attempts = await atc.aattempts(task.id)
    assert [a.outcome for a in attempts] == ["server_error", "server_error", "success"]
    assert attempts[0].error == "RuntimeError: cloud API down (1)"


async def test_exceptions_past_the_budget_fail_the_task(atc: TaskCenter) -> None:
    @atc.processor("create_server", retry=FAST)
    def create_server(payload: Any) -> None:
        raise ValueError("no capacity")

    task = await atc.acreate_task(type="create_server", payload={}, business_id="s-1")
    async with working(atc):
        done = await wait_status(atc, task.id, "failed", "succeeded")
    assert done.status == "failed" and done.attempts == 3 and done.last_error == "ValueError: no capacity"


async def test_cancelled_error_raised_by_a_processor_is_an_ordinary_failure_not_a_shutdown(
    atc: TaskCenter,
) -> None:
    """It used to be recorded as "worker shut down", retried at once past the budget, left `retrying`."""
    calls = 0

    @atc.processor("create_server", retry=FAST)
    async def create_server(payload: Any) -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    task = await atc.acreate_task(type="create_server", payload={}, business_id="s-1")
    async with working(atc):
        done = await wait_status(atc, task.id, "failed")
    assert done.attempts == 3 == calls and done.outcome == "server_error"
    assert done.last_error is not None and done.last_error.startswith("CancelledError")


async def test_permanent_failure_fails_after_one_attempt_with_outcome_stopped(atc: TaskCenter) -> None:
    @atc.processor("create_server", retry=FAST)
    async def create_server(payload: Any) -> None:
        raise PermanentFailure("quota exceeded for good")

    task = await atc.acreate_task(type="create_server", payload={}, business_id="s-1")
    async with working(atc):
        done = await wait_status(atc, task.id, "failed", "succeeded")
    assert done.status == "failed" and done.attempts == 1 and done.outcome == "stopped"
    assert done.last_error == "quota exceeded for good"


async def test_processor_slower_than_the_task_timeout_is_a_timeout(atc: TaskCenter) -> None:
    @atc.processor("slow", retry=RetryPolicy.none())
    async def slow(payload: Any) -> None:
        await asyncio.sleep(5)

    task = await atc.acreate_task(type="slow", payload={}, business_id="s-1", timeout=0.2)
    async with working(atc):
        done = await wait_status(atc, task.id, "failed", "succeeded")
    assert done.outcome == "timeout" and done.attempts == 1


async def test_sync_processors_hung_past_their_timeout_leave_dns_for_http_tasks_alone(
    atc: TaskCenter, receiver: Receiver
) -> None:
    """Hung sync processors used to fill the loop's default executor, which aiohttp resolves host names on."""
    release = threading.Event()

    @atc.processor("stuck", retry=RetryPolicy.none())
    def stuck(payload: Any) -> None:
        release.wait(30)

    try:
        default_pool = min(32, (os.cpu_count() or 1) + 4)  # ThreadPoolExecutor's default size
        hung = [
            await atc.acreate_task(type="stuck", payload={}, business_id=f"stuck-{i}", timeout=0.2)
            for i in range(default_pool + 1)
        ]
        async with working(atc):
            for task in hung:
                assert (await wait_status(atc, task.id, "failed")).outcome == "timeout"
            by_name = receiver.url("/named").replace("127.0.0.1", "localhost")  # resolved through DNS
            task = await atc.acreate_task("POST", by_name, business_id="named", timeout=5)
            done = await wait_status(atc, task.id, "succeeded", "failed", "retrying", timeout=15)
        assert done.status == "succeeded", done.last_error
    finally:
        release.set()


async def test_sync_processors_run_in_daemon_threads(atc: TaskCenter) -> None:
    """A processor still hung at shutdown must not keep the process alive (pool threads are joined at exit)."""
    daemon: list[bool] = []

    @atc.processor("which", retry=RetryPolicy.none())
    def which(payload: Any) -> None:
        daemon.append(threading.current_thread().daemon)

    task = await atc.acreate_task(type="which", payload={}, business_id="w-1")
    async with working(atc):
        await wait_status(atc, task.id, "succeeded")
    assert daemon == [True]


async def test_result_that_is_not_json_is_a_retryable_error_not_a_stuck_task(atc: TaskCenter) -> None:
    @atc.processor("odd", retry=RetryPolicy.from_intervals([0.1]))
    async def odd(payload: Any) -> dict[str, Any]:
        return {"tags": {"a", "b"}}  # a set: JSON cannot hold it

    task = await atc.acreate_task(type="odd", payload={}, business_id="s-1")
    async with working(atc):
        done = await wait_status(atc, task.id, "failed", "succeeded")
    assert done.attempts == 2 and done.outcome == "server_error"
    assert done.last_error is not None and "not JSON" in done.last_error


async def test_an_object_with_an_async_call_is_awaited_like_an_async_def(atc: TaskCenter) -> None:
    """ProcessorFunc admits any callable returning an awaitable: a processor class used to be run in a thread,
    its coroutine never awaited, the task failed as "not JSON"."""

    class Resizer:
        async def __call__(self, payload: dict[str, int]) -> dict[str, int]:
            return {"resized": payload["w"]}

    atc.processor("resize", retry=RetryPolicy.none())(Resizer())
    task = await atc.acreate_task(type="resize", payload={"w": 3}, business_id="r-1")
    async with working(atc):
        done = await wait_status(atc, task.id, "succeeded", "failed")
    assert done.status == "succeeded" and done.result == {"resized": 3}


async def test_a_sync_processor_returning_an_awaitable_fails_saying_so(atc: TaskCenter) -> None:
    async def resize(payload: Any) -> int:
        return 1

    atc.processor("resize", retry=RetryPolicy.none())(lambda payload: resize(payload))
    task = await atc.acreate_task(type="resize", payload={}, business_id="r-1")
    async with working(atc):
        done = await wait_status(atc, task.id, "failed", "succeeded")
    assert done.last_error is not None and "async def" in done.last_error


async def test_unknown_type_at_create_is_a_validation_error_naming_type(atc: TaskCenter) -> None:
    with pytest.raises(ValidationError) as info:
        await atc.acreate_task(type="nobody_handles_this", payload={}, business_id="s-1")
    assert info.value.field == "type"


async def test_processor_task_refuses_http_fields(atc: TaskCenter) -> None:
    atc.processor("create_server")(lambda payload: None)
    with pytest.raises(ValidationError) as info:
        await atc.acreate_task(type="create_server", payload={}, json={"x": 1}, business_id="s-1")
    assert info.value.field == "json"


async def test_processor_retry_and_priority_become_the_task_defaults(atc: TaskCenter) -> None:
    policy = RetryPolicy.from_intervals([0.1, 0.1])

    @atc.processor("create_server", retry=policy, priority=5)
    async def create_server(payload: Any) -> None:
        return None

    task = await atc.acreate_task(type="create_server", payload={}, business_id="s-1")
    assert task.priority == 5 and task.max_attempts == 3
    assert task.retry == policy.to_dict() and task.retry["intervals"] == [0.1, 0.1]


async def test_explicit_retry_and_priority_override_the_processor_defaults(atc: TaskCenter) -> None:
    atc.processor("create_server", retry=FAST, priority=5)(lambda payload: None)
    task = await atc.acreate_task(
        type="create_server", payload={}, business_id="s-1", priority=-3, retry=RetryPolicy.none()
    )
    assert task.priority == -3 and task.max_attempts == 1


async def test_higher_priority_processor_tasks_run_first(atc: TaskCenter) -> None:
    order: list[str] = []

    @atc.processor("low")
    async def low(payload: Any) -> None:
        order.append("low")

    @atc.processor("high", priority=10)
    async def high(payload: Any) -> None:
        order.append("high")

    low_task = await atc.acreate_task(type="low", payload={}, business_id="l")
    high_task = await atc.acreate_task(type="high", payload={}, business_id="h")
    async with working(atc, concurrency=1):
        await wait_status(atc, low_task.id, "succeeded")
        await wait_status(atc, high_task.id, "succeeded")
    assert order == ["high", "low"]


@pytest.mark.parametrize("name", ["http", "", "x" * 101])
def test_reserved_or_malformed_processor_names_are_refused(name: str) -> None:
    tc = TaskCenter(settings=make_settings("sqlite:///unused.db"))
    with pytest.raises(ValidationError) as info:
        tc.processor(name)(lambda payload: None)
    assert info.value.field == "type"


def test_processor_policy_as_a_dict_and_bad_options_are_checked_at_registration(db_url: str) -> None:
    """A dict policy used to fail each create with an AttributeError; a bad priority or a non-callable
    registered fine and failed later, far from the mistake."""
    with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
        tc.processor("as_dict", retry={"strategy": "intervals", "intervals": [1, 2]})(lambda payload: None)
        task = tc.create_task(type="as_dict", payload={}, business_id="d-1")
        assert task.max_attempts == 3 and task.retry["intervals"] == [1, 2]
        with pytest.raises(ValidationError) as info:
            tc.processor("bad_retry", retry={"strategy": "sometimes"})
        assert info.value.field == "retry.strategy"
        with pytest.raises(ValidationError) as info:
            tc.processor("too_high", priority=5000)
        assert info.value.field == "priority"
        with pytest.raises(ValidationError) as info:
            tc.processor("not_callable")(42)  # type: ignore[type-var]
        assert info.value.field == "type"


def test_the_decorator_returns_the_function_unchanged() -> None:
    tc = TaskCenter(settings=make_settings("sqlite:///unused.db"))

    def create_server(payload: Any) -> int:
        return 1

    assert tc.processor("create_server")(create_server) is create_server


def test_sync_surface_creates_processor_tasks(db_url: str) -> None:
    with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
        tc.processor("create_server", retry=FAST)(lambda payload: payload)
        task = tc.create_task(type="create_server", payload={"a": 1}, business_id="s-1")
        assert tc.get_task(task.id).payload == {"a": 1} and task.max_attempts == 3


async def test_a_worker_without_the_processor_leaves_its_tasks_for_a_worker_with_it(
    atc: TaskCenter, db_url: str, receiver: Receiver
) -> None:
    """A plain worker (no processors) next to an application's worker: each claims only the tasks it can run."""

    @atc.processor("create_server", retry=FAST)
    async def create_server(payload: dict[str, Any]) -> dict[str, Any]:
        return {"server_id": payload["n"]}

    job = await atc.acreate_task(type="create_server", payload={"n": 7}, business_id="s-1")
    hook = await atc.acreate_task("POST", receiver.url("/hook"), business_id="h-1")
    async with TaskCenter(settings=make_settings(db_url), business="shop") as plain, working(plain):
        # The plain worker delivers the HTTP task, claimed in the same look at the queue as the processor's...
        assert (await wait_status(plain, hook.id, "succeeded")).attempts == 1
        await asyncio.sleep(0.5)
        # ... and leaves the processor's task due, untouched, for a worker that can run it.
        waiting = await atc.aget_task(job.id)
        assert (waiting.status, waiting.attempts) == ("pending", 0), waiting
        # The figures say what waits for a worker with the processor, and since when.
        figures = await StatsService(atc.runtime.db).figures(None)
        [due] = figures["processors_due"]
        assert due["type"] == "create_server" and due["due"] == 1
        assert due["oldest_due_at"] == rfc3339(waiting.next_attempt_at)
        async with working(atc):
            done = await wait_status(atc, job.id, "succeeded", "failed")
    assert done.status == "succeeded" and done.attempts == 1 and done.result == {"server_id": 7}


async def test_a_worker_without_the_processor_sleeps_past_an_overdue_task_of_its_type(
    atc: TaskCenter, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overdue task it won't claim must not be the next due task of a worker: it would wake at once, claim
    nothing, and ask again without end."""
    atc.processor("create_server")(lambda payload: payload)
    job = await atc.acreate_task(type="create_server", payload={}, business_id="s-1")
    looks = 0
    real = queue.next_due

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal looks
        looks += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(queue, "next_due", counted)
    async with TaskCenter(settings=make_settings(db_url), business="shop") as plain, working(plain):
        await asyncio.sleep(1.5)  # the poll interval is 1 s: a worker at rest looks two or three times
    assert 1 <= looks <= 4, looks
    assert (await atc.aget_task(job.id)).status == "pending"
