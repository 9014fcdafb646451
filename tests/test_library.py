"""The library surface: ``TaskCenter``'s sync methods (plain functions, private loop) and its async twins."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from taskcenter import (
    DuplicateTask,
    InvalidTransition,
    RetryPolicy,
    Task,
    TaskCenter,
    TaskNotFound,
    ValidationError,
)
from taskcenter.errors import ConfigError
from tests.conftest import make_settings
from tests.receiver import Receiver, Reply
from tests.test_worker_endpoint import fetch, free_port, port_closed, wait_metrics

ROOT = Path(__file__).resolve().parents[1]


# -- helpers shared by the library test modules ----------------------------------------------------------


@contextlib.asynccontextmanager
async def working(tc: TaskCenter, **kwargs: int) -> AsyncIterator[None]:
    """Run ``tc.arun_worker`` for the duration of the block and stop it cleanly afterwards."""
    stop = asyncio.Event()
    job = asyncio.create_task(tc.arun_worker(stop=stop, **kwargs))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(job, timeout=15)


async def wait_status(tc: TaskCenter, task_id: str, *statuses: str, timeout: float = 10) -> Task:
    """Poll until the task reaches one of ``statuses``; fail the test otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        task = await tc.aget_task(task_id)
        if task.status in statuses:
            return task
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"task stayed {task.status} (attempts {task.attempts}), expected {statuses}")
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def atc(db_url: str) -> AsyncIterator[TaskCenter]:
    """An async TaskCenter for business ``shop`` on a clean database."""
    async with TaskCenter(settings=make_settings(db_url), business="shop") as center:
        yield center


@pytest.fixture
def tc(db_url: str) -> Iterator[TaskCenter]:
    """A sync TaskCenter for business ``shop`` on a clean database."""
    center = TaskCenter(settings=make_settings(db_url), business="shop")
    try:
        yield center
    finally:
        center.close()


URL = "http://127.0.0.1:9/hook"  # never contacted: no worker runs in the sync tests


# -- sync API (plain, non-async tests) --------------------------------------------------------------------


def test_sync_create_returns_a_pending_task_readable_by_uuid_row_id_and_business_id(tc: TaskCenter) -> None:
    task = tc.create_task("POST", URL, json={"order": 1}, business_id="order-1", metadata={"k": "v"})
    assert task.status == "pending" and task.business_code == "shop" and task.type == "http"
    assert task.request is not None and task.request["body"] == '{"order":1}'
    assert tc.get_task(task.id) == tc.get_task(task.row_id)
    assert tc.get_task(task.id).metadata == {"k": "v"}
    assert tc.get_by_business_id("order-1").id == task.id


def test_sync_list_is_newest_first_and_filters_by_status(tc: TaskCenter) -> None:
    first = tc.create_task("POST", URL, business_id="a")
    second = tc.create_task("POST", URL, business_id="b")
    tc.cancel(first.id)
    everything, cursor = tc.list_tasks()
    assert [t.id for t in everything] == [second.id, first.id] and cursor is None
    cancelled, _ = tc.list_tasks(status=["cancelled"])
    assert [t.id for t in cancelled] == [first.id]
    assert tc.list_tasks(status="cancelled") == (cancelled, None)  # one status, not the letters of one
    page, cursor = tc.list_tasks(limit=1)
    assert [t.id for t in page] == [second.id]
    rest, _ = tc.list_tasks(limit=1, cursor=cursor)
    assert [t.id for t in rest] == [first.id]


def test_sync_update_changes_a_pending_task(tc: TaskCenter) -> None:
    task = tc.create_task("POST", URL, business_id="u")
    updated = tc.update_task(task.id, priority=7, retry=RetryPolicy.fixed(interval=5, max_attempts=3))
    assert updated.status == "pending"
    assert updated.priority == 7 and updated.max_attempts == 3 and updated.retry["strategy"] == "fixed"
    assert tc.get_task(task.id).priority == 7


def test_sync_cancel_then_retry_makes_the_task_pending_again(tc: TaskCenter) -> None:
    task = tc.create_task("POST", URL, business_id="c", retry=RetryPolicy.from_intervals([1, 1]))
    cancelled = tc.cancel(task.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    again = tc.retry(task.id)
    assert again.status == "pending" and again.finished_at is None
    assert again.max_attempts == 3  # nothing was spent, so the renewed budget is the policy's


def test_sync_get_of_unknown_task_raises_task_not_found(tc: TaskCenter) -> None:
    with pytest.raises(TaskNotFound):
        tc.get_task("6f1c1d1e-0000-4000-8000-000000000000")
    with pytest.raises(TaskNotFound):
        tc.get_task(424242)


def test_sync_duplicate_business_id_raises_with_the_existing_id(tc: TaskCenter) -> None:
    first = tc.create_task("POST", URL, business_id="dup")
    with pytest.raises(DuplicateTask) as info:
        tc.create_task("POST", URL, business_id="dup")
    assert info.value.existing_id == first.id


def test_sync_business_id_is_free_again_once_its_task_finished(tc: TaskCenter) -> None:
    first = tc.create_task("POST", URL, business_id="again")
    tc.cancel(first.id)
    second = tc.create_task("POST", URL, business_id="again")
    assert second.id != first.id and second.status == "pending"


def test_sync_update_of_cancelled_task_raises_invalid_transition(tc: TaskCenter) -> None:
    task = tc.create_task("POST", URL, business_id="x")
    tc.cancel(task.id)
    with pytest.raises(InvalidTransition) as info:
        tc.update_task(task.id, priority=1)
    assert info.value.current == "cancelled"


def test_sync_retry_of_pending_task_raises_invalid_transition(tc: TaskCenter) -> None:
    task = tc.create_task("POST", URL, business_id="p")
    with pytest.raises(InvalidTransition):
        tc.retry(task.id)


def test_sync_bad_input_raises_validation_error_naming_the_field(tc: TaskCenter) -> None:
    with pytest.raises(ValidationError) as info:
        tc.create_task("POST", "ftp://example.com/x", business_id="v")
    assert info.value.field == "url"


def test_sync_close_stops_the_private_loop_thread(db_url: str) -> None:
    center = TaskCenter(settings=make_settings(db_url), business="shop")
    center.create_task("POST", URL, business_id="close")
    threads = [t for t in threading.enumerate() if t.name == "taskcenter-loop"]
    assert threads
    center.close()
    assert not any(t.is_alive() for t in threads)
    center.close()  # a second close is harmless


def test_sync_use_after_close_starts_afresh(db_url: str) -> None:
    center = TaskCenter(settings=make_settings(db_url), business="shop")
    task = center.create_task("POST", URL, business_id="reopen")
    center.close()
    try:
        assert center.get_task(task.id).id == task.id
    finally:
        center.close()


def test_sync_context_manager_starts_and_closes(db_url: str) -> None:
    with TaskCenter(settings=make_settings(db_url), business="shop") as center:
        assert center.list_tasks() == ([], None)
    assert center._private_loop.thread is None


@pytest.mark.timeout(30)
def test_sync_call_from_an_async_event_handler_raises_instead_of_hanging(tc: TaskCenter) -> None:
    """Async handlers run on the private loop: a sync call there would wait on that loop for ever.
    (Sync handlers run in a thread of their own, where the sync methods work: see test_events.)"""
    errors: list[Exception] = []

    async def handler(_event: str, data: dict[str, Any]) -> None:
        try:
            tc.get_task(data["id"])
        except RuntimeError as exc:
            errors.append(exc)

    tc.on("created", handler)
    task = tc.create_task("POST", URL, business_id="reentrant")
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(errors) == 1 and "aget_task" in str(errors[0])
    assert tc.get_task(task.id).status == "pending"  # the instance is still usable


def test_close_from_another_thread_stops_a_run_worker_running_in_a_thread(tc: TaskCenter) -> None:
    """No signal reaches a worker thread: close() is how an application (Flask, Django) stops it."""
    tc.create_task("POST", URL, business_id="later", delay=3600)
    worker = threading.Thread(target=tc.run_worker, name="app-worker", daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while tc._dispatcher is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tc._dispatcher is not None, "the worker never started"
    tc.close()
    worker.join(timeout=10)
    assert not worker.is_alive(), "run_worker still running after close()"
    assert not any(t.name == "taskcenter-loop" and t.is_alive() for t in threading.enumerate())
    assert tc.get_task(tc.get_by_business_id("later").id).status == "pending"  # reusable afterwards


def test_run_worker_in_a_thread_answers_health_on_its_metrics_port(tc: TaskCenter) -> None:
    """The sync worker of a web application: probed over HTTP while it runs, the port released by close()."""
    tc.create_task("POST", URL, business_id="later", delay=3600)
    port = free_port()
    worker = threading.Thread(target=tc.run_worker, kwargs={"metrics_port": port}, daemon=True)
    worker.start()
    deadline = time.monotonic() + 10
    while port_closed(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        assert response.status == 200
        assert json.loads(response.read()) == {"status": "ok", "database": "ok", "dispatcher": "running"}
    tc.close()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert port_closed(port)


def test_close_lets_a_call_in_flight_on_another_thread_return(
    tc: TaskCenter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call still running when close() stopped the loop used to wait for ever (a web app's request thread)."""
    task = tc.create_task("POST", URL, business_id="in-flight")
    in_call = threading.Event()
    service = tc.runtime.service
    get_task = service.get_task

    async def slow_get_task(*args: Any, **kwargs: Any) -> Task:
        in_call.set()
        await asyncio.sleep(0.5)  # keeps the call in flight on the private loop
        return await get_task(*args, **kwargs)

    monkeypatch.setattr(service, "get_task", slow_get_task)
    read: list[Task] = []
    thread = threading.Thread(
        target=lambda: read.append(tc.get_task(task.id)), name="app-request", daemon=True
    )
    thread.start()
    assert in_call.wait(10)
    tc.close()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the call in flight during close() never returned"
    assert [t.business_id for t in read] == ["in-flight"]


def test_a_call_the_stopped_loop_never_ran_raises_instead_of_waiting_for_ever(tc: TaskCenter) -> None:
    """A call submitted as close() stops the loop (a busy web app's next request) is never run."""
    task = tc.create_task("POST", URL, business_id="late")
    loop, loop_thread = tc._private_loop.loop, tc._private_loop.thread
    assert loop is not None and loop_thread is not None
    loop.call_soon_threadsafe(loop.stop)  # close() stopping the loop ...
    loop_thread.join(timeout=5)
    errors: list[Exception] = []

    def late_call() -> None:
        try:
            tc.get_task(task.id)
        except RuntimeError as exc:
            errors.append(exc)

    caller = threading.Thread(target=late_call, daemon=True)
    caller.start()  # ... as another thread submits a call
    time.sleep(0.2)
    loop.close()
    tc._private_loop.loop = tc._private_loop.thread = None
    caller.join(timeout=10)
    assert not caller.is_alive(), "the call waited for ever on a closed loop"
    assert len(errors) == 1 and "closed" in str(errors[0])


def test_settings_together_with_a_database_url_or_overrides_is_refused(tmp_path: Path) -> None:
    """Both given: the URL and the overrides used to be dropped without a word, tasks went elsewhere."""
    settings = make_settings(f"sqlite:///{tmp_path / 'a.db'}")
    with pytest.raises(ValidationError) as info:
        TaskCenter(f"sqlite:///{tmp_path / 'b.db'}", settings=settings)
    assert info.value.field == "settings" and "database_url" in str(info.value)
    with pytest.raises(ValidationError) as info:
        TaskCenter(settings=settings, concurrency=7)
    assert info.value.field == "settings" and "concurrency" in str(info.value)


def test_a_misspelt_setting_is_refused_not_ignored(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        TaskCenter(f"sqlite:///{tmp_path / 'a.db'}", concurency=5)
    assert info.value.field == "concurency"
    center = TaskCenter(f"sqlite:///{tmp_path / 'a.db'}", concurrency=5)
    assert center.runtime.settings.concurrency == 5


# -- async API --------------------------------------------------------------------------------------------


async def test_acreate_task_is_delivered_by_arun_worker(atc: TaskCenter, receiver: Receiver) -> None:
    task = await atc.acreate_task("POST", receiver.url("/hook"), json={"n": 1}, business_id="a-1")
    async with working(atc):
        [request] = await receiver.wait_for(1, "/hook", timeout=10)
        done = await wait_status(atc, task.id, "succeeded")
    assert request.json() == {"n": 1} and request.headers["Idempotency-Key"] == task.id
    assert done.attempts == 1 and done.outcome == "success"
    [attempt] = await atc.aattempts(task.id)
    assert attempt.outcome == "success"


async def test_arun_worker_returns_when_stop_is_set(atc: TaskCenter) -> None:
    stop = asyncio.Event()
    job = asyncio.create_task(atc.arun_worker(stop=stop))
    await asyncio.sleep(0.2)
    assert not job.done()
    stop.set()
    await asyncio.wait_for(job, timeout=10)


@pytest.mark.parametrize("with_stop", [False, True])
async def test_cancelling_arun_worker_stops_it_gracefully(
    atc: TaskCenter, receiver: Receiver, with_stop: bool
) -> None:
    """DESIGN's "until stop is set (or the task is cancelled)": a cancel used to hang for ever."""
    job = asyncio.create_task(atc.arun_worker(stop=asyncio.Event() if with_stop else None))
    task = await atc.acreate_task("POST", receiver.url("/c"), business_id="c-1")
    await wait_status(atc, task.id, "succeeded")
    job.cancel()
    done, _ = await asyncio.wait({job}, timeout=10)
    assert done, "arun_worker did not return after being cancelled"
    assert job.cancelled()
    again = await atc.acreate_task("POST", receiver.url("/c"), business_id="c-2")
    await asyncio.sleep(0.5)
    assert (await atc.aget_task(again.id)).status == "pending"  # nothing is delivering any more


@pytest.mark.parametrize("concurrency", [0, -1, 10_001])
async def test_arun_worker_refuses_a_concurrency_outside_the_settings_bounds(
    atc: TaskCenter, concurrency: int
) -> None:
    """concurrency=0 used to run a worker that never sent anything, without a word."""
    with pytest.raises(ValidationError) as info:
        await asyncio.wait_for(atc.arun_worker(concurrency=concurrency, stop=asyncio.Event()), timeout=5)
    assert info.value.field == "concurrency"


async def test_arun_worker_serves_metrics_and_health_on_its_metrics_port_then_releases_it(
    atc: TaskCenter, receiver: Receiver
) -> None:
    """An application's worker can be scraped and probed, as ``taskcenter worker --metrics-port`` can."""
    port = free_port()
    task = await atc.acreate_task("POST", receiver.url("/m"), business_id="m-1")
    async with working(atc, metrics_port=port), aiohttp.ClientSession() as session:
        await wait_status(atc, task.id, "succeeded")
        base = f"http://127.0.0.1:{port}"
        await wait_metrics(
            session, f"{base}/metrics", {("taskcenter_attempts_total", (("outcome", "success"),)): 1}
        )
        status, content_type, body = await fetch(session, f"{base}/health")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"status": "ok", "database": "ok", "dispatcher": "running"}
    assert port_closed(port), "the port is released when the worker stops"


async def test_arun_worker_on_a_port_in_use_raises_before_it_claims_anything(
    atc: TaskCenter, receiver: Receiver
) -> None:
    task = await atc.acreate_task("POST", receiver.url("/due"), business_id="due-1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            await asyncio.wait_for(atc.arun_worker(metrics_port=port, stop=asyncio.Event()), timeout=10)
    assert str(info.value) == (
        f"worker metrics endpoint cannot listen on 127.0.0.1:{port}: Address already in use (metrics_port)"
    )
    await asyncio.sleep(0.3)
    assert receiver.requests_for("/due") == []
    assert (await atc.aget_task(task.id)).status == "pending"


@pytest.mark.parametrize(
    ("option", "value"),
    [("metrics_port", -1), ("metrics_port", 65_536), ("metrics_port", True), ("metrics_host", "")],
)
async def test_arun_worker_refuses_a_metrics_port_or_host_that_is_no_address(
    atc: TaskCenter, option: str, value: object
) -> None:
    with pytest.raises(ValidationError) as info:
        await asyncio.wait_for(atc.arun_worker(stop=asyncio.Event(), **{option: value}), timeout=5)  # type: ignore[arg-type]
    assert info.value.field == option


async def test_aretry_of_failed_task_renews_the_budget_and_delivers_again(
    atc: TaskCenter, receiver: Receiver
) -> None:
    receiver.script("/r", Reply(status=500), Reply(status=500), Reply(status=200))
    task = await atc.acreate_task(
        "POST", receiver.url("/r"), business_id="r-1", retry=RetryPolicy.from_intervals([0.05])
    )
    async with working(atc):
        failed = await wait_status(atc, task.id, "failed")
        assert failed.attempts == 2 and failed.max_attempts == 2
        again = await atc.aretry(task.id)
        assert again.status == "pending" and again.max_attempts == 4  # 2 spent + a fresh budget of 2
        done = await wait_status(atc, task.id, "succeeded")
    assert done.attempts == 3 and done.max_attempts == 4
    assert [r.headers["X-Task-Attempt"] for r in receiver.requests_for("/r")] == ["1", "2", "3"]
    assert [a.number for a in await atc.aattempts(task.id)] == [1, 2, 3]


async def test_aupdate_of_a_delayed_task_brings_it_forward(atc: TaskCenter, receiver: Receiver) -> None:
    task = await atc.acreate_task("POST", receiver.url("/later"), business_id="d-1", delay=3600)
    async with working(atc):
        await asyncio.sleep(0.3)
        assert receiver.requests_for("/later") == []
        await atc.aupdate_task(task.id, delay=0)
        await receiver.wait_for(1, "/later", timeout=10)
        await wait_status(atc, task.id, "succeeded")


async def test_acancel_of_a_delayed_task_means_it_is_never_sent(atc: TaskCenter, receiver: Receiver) -> None:
    task = await atc.acreate_task("POST", receiver.url("/never"), business_id="n-1", delay=0.5)
    assert (await atc.acancel(task.id)).status == "cancelled"
    async with working(atc):
        await asyncio.sleep(1.0)
    assert receiver.requests_for("/never") == []
    assert (await atc.aget_task(task.id)).status == "cancelled"


# -- run_worker (sync, blocking): a real script in a subprocess --------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import sys
    from taskcenter import TaskCenter
    from tests.conftest import make_settings

    tc = TaskCenter(settings=make_settings(sys.argv[1]), business="shop")
    task = tc.create_task("POST", sys.argv[2], json={"from": "script"}, business_id="script-1")
    print("created", task.id, flush=True)
    tc.run_worker()
    print("stopped", tc.get_task(task.id).status, flush=True)
    tc.close()
    """
)


async def test_sync_script_creates_then_run_worker_delivers_and_stops_on_sigterm(
    db_url: str, receiver: Receiver
) -> None:
    """A sync script: create_task then run_worker share one loop (PostgreSQL connections cannot move)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SCRIPT, db_url, receiver.url("/script"),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        [request] = await receiver.wait_for(1, "/script", timeout=20)
        await asyncio.sleep(0.3)  # let the result be written before asking the worker to stop
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert request.json() == {"from": "script"}
    lines = out.decode().splitlines()
    assert lines[0].startswith("created ") and lines[-1] == "stopped succeeded", out.decode() + err.decode()


LEFT_OPEN = textwrap.dedent(
    """
    import sys
    from taskcenter import TaskCenter
    from tests.conftest import make_settings

    tc = TaskCenter(settings=make_settings(sys.argv[1]), business="shop")
    tc.create_task("POST", "http://127.0.0.1:9/", business_id="left-open", delay=3600)
    print("exiting without close()", flush=True)
    """
)


async def test_a_script_that_never_closes_exits_cleanly(db_url: str) -> None:
    """Its connections used to be torn down under the running loop at exit: ResourceWarnings (SQLite), a
    traceback from another loop's transport (PostgreSQL), in development mode."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "dev", "-W", "always", "-c", LEFT_OPEN, db_url,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0 and out.decode().strip() == "exiting without close()", err.decode()
    noise = [line for line in err.decode().splitlines() if "Warning" in line or "Error" in line]
    assert noise == [], err.decode()


def test_the_design_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN "Library": a database URL, a RetryPolicy and a timedelta delay, through the sync surface."""
    monkeypatch.chdir(tmp_path)  # no stray ./taskcenter.toml
    tc = TaskCenter(f"sqlite:///{tmp_path / 'taskcenter.db'}")
    try:
        task = tc.create_task(
            "POST", "https://api.example.com/hook", json={"id": 1}, business_id="order-1",
            retry=RetryPolicy.exponential(initial_delay=1, max_attempts=5), delay=timedelta(minutes=10),
        )  # fmt: skip
        assert task.business_code == "default" and task.max_attempts == 5
        assert task.next_attempt_at is not None
        assert task.next_attempt_at - task.created_at == timedelta(minutes=10)
        assert tc.get_task(task.id).status == "pending"
        assert tc.cancel(task.id).status == "cancelled"
        assert tc.retry(task.id).status == "pending"
    finally:
        tc.close()
