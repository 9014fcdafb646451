"""The dispatcher as a process: several workers on one database, a killed worker's leases, graceful shutdown,
and wake-ups that do not wait for the poll interval."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from taskcenter.errors import StorageError
from taskcenter.runtime import Runtime
from taskcenter.storage import leases, queue
from taskcenter.storage.schema import attempts as attempts_table
from taskcenter.storage.schema import tasks as tasks_table
from tests.conftest import make_settings
from tests.processes import WorkerProcess
from tests.receiver import Receiver, Reply
from tests.test_delivery import running, wait_status


async def _count(rt: Runtime, status: str) -> int:
    async with rt.db.read() as conn:
        return int(
            (
                await conn.execute(
                    sa.select(sa.func.count()).select_from(tasks_table).where(tasks_table.c.status == status)
                )
            ).scalar_one()
        )


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_worker_processes_never_send_the_same_attempt_twice(
    runtime: Runtime, receiver: Receiver, db_url: str, workers: int
) -> None:
    """Several real worker processes share one PostgreSQL queue: each (task, attempt) arrives exactly once."""
    receiver.set_default(Reply(status=200, delay_s=0.005))
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    total = 900
    procs = [WorkerProcess(db_url, concurrency=20) for _ in range(workers)]
    # All workers up and waiting before any task exists, so that each has a fair chance at the queue.
    await asyncio.gather(*(asyncio.to_thread(p.wait_ready) for p in procs))
    for start in range(0, total, 300):
        items = [{"business_id": f"k{i}", "url": receiver.url("/multi")} for i in range(start, start + 300)]
        await runtime.service.create_tasks(biz, items)
    try:
        await receiver.wait_for(total, "/multi", timeout=60)
        for _ in range(200):
            if await _count(runtime, "succeeded") == total:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # anything sent twice would have arrived by now
    finally:
        codes = [p.terminate() for p in procs]
    pairs = collections.Counter(
        (r.headers["X-Task-Id"], r.headers["X-Task-Attempt"]) for r in receiver.requests_for("/multi")
    )
    assert len(pairs) == total
    assert max(pairs.values()) == 1, [p for p, n in pairs.items() if n > 1][:5]
    async with runtime.db.read() as conn:
        by_worker = (
            await conn.execute(
                sa.select(attempts_table.c.worker, sa.func.count()).group_by(attempts_table.c.worker)
            )
        ).all()
    assert len(by_worker) >= 2, "the work should have been shared between processes"
    assert sum(n for _, n in by_worker) == total
    assert await _count(runtime, "succeeded") == total
    assert codes == [0] * workers


async def test_killed_worker_leases_are_rescued_and_the_attempt_recorded_as_interrupted(
    runtime: Runtime, receiver: Receiver, db_url: str
) -> None:
    hold = asyncio.Event()
    receiver.set_default(Reply(status=200, hold=hold), "/slow")
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    await runtime.service.create_tasks(
        biz, [{"business_id": f"r{i}", "url": receiver.url("/slow")} for i in range(5)]
    )
    victim = WorkerProcess(db_url, lease_s=2, rescue_interval_s=0.5)
    try:
        await receiver.wait_for(5, "/slow", timeout=20)
    finally:
        victim.kill()  # SIGKILL: no goodbye, leases stay behind
    hold.set()
    receiver.set_default(Reply(status=200), "/slow")
    rt = Runtime(make_settings(db_url, lease_s=2, rescue_interval_s=0.3))
    await rt.start()
    try:
        async with running(rt):
            await receiver.wait_for(10, "/slow", timeout=20)
            for n in range(5):
                task = await rt.service.get_by_business_id(biz, f"r{n}")
                await wait_status(rt, biz, task.id, "succeeded", timeout=10)
        task = await rt.service.get_by_business_id(biz, "r0")
        tries = await rt.service.attempts(biz, task.id)
        assert [a.outcome for a in tries] == ["interrupted", "success"]
        assert task.attempts == 2
        second = [r for r in receiver.requests_for("/slow") if r.headers["X-Task-Id"] == task.id]
        assert [r.headers["X-Task-Attempt"] for r in second] == ["1", "2"]
    finally:
        await rt.close()


async def test_a_task_failed_by_the_lease_rescue_notifies_like_any_other_failure(
    db_url: str, receiver: Receiver
) -> None:
    """A lost worker's last allowed attempt fails the task (the rescue charges it); that end is terminal like any
    other: the task's ``notify`` webhook goes out and library listeners hear ``failed``."""
    rt = Runtime(make_settings(db_url, rescue_interval_s=0.2))
    await rt.start()
    heard: list[dict[str, Any]] = []
    rt.events.on("failed", lambda _event, data: heard.append(data))
    try:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
        task = await rt.service.create_task(
            biz,
            {
                "business_id": "last",
                "url": receiver.url("/never"),
                "retry": {"strategy": "intervals", "intervals": []},
                "notify": {"url": receiver.url("/notified"), "on": ["failed"]},
            },
        )
        # A worker that claims the task and is never heard from again (its lease runs out in 0.3 s).
        claimed = await queue.claim(rt.db, worker="lost", now=datetime.now(UTC), limit=1, lease_s=0.3)
        assert [row["id"] for row in claimed] == [task.row_id]
        async with running(rt):
            [notice] = await receiver.wait_for(1, "/notified", timeout=10)
        done = await rt.service.get_task(biz, task.id)
        assert (done.status, done.outcome, done.attempts) == ("failed", "interrupted", 1)
        body = json.loads(notice.body)
        assert body["type"] == "task.failed" and body["task"]["id"] == task.id
        assert [(e["id"], e["status"], e["outcome"]) for e in heard] == [(task.id, "failed", "interrupted")]
        assert receiver.requests_for("/never") == []
    finally:
        await rt.close()


async def test_sigterm_lets_in_flight_requests_finish(
    runtime: Runtime, receiver: Receiver, db_url: str
) -> None:
    receiver.set_default(Reply(status=200, delay_s=1.0), "/finish")
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    await runtime.service.create_tasks(
        biz, [{"business_id": f"g{i}", "url": receiver.url("/finish")} for i in range(4)]
    )
    proc = WorkerProcess(db_url, shutdown_grace_s=10)
    await receiver.wait_for(4, "/finish", timeout=20)
    code = await asyncio.to_thread(proc.terminate)
    assert code == 0, proc.output()
    assert await _count(runtime, "succeeded") == 4


async def test_sigterm_past_the_grace_period_records_interrupted_and_requeues(
    runtime: Runtime, receiver: Receiver, db_url: str
) -> None:
    hold = asyncio.Event()
    receiver.set_default(Reply(status=200, hold=hold), "/stuck")
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    await runtime.service.create_tasks(
        biz, [{"business_id": f"s{i}", "url": receiver.url("/stuck")} for i in range(3)]
    )
    proc = WorkerProcess(db_url, shutdown_grace_s=0.5)
    try:
        await receiver.wait_for(3, "/stuck", timeout=20)
        code = await asyncio.to_thread(proc.terminate)
    finally:
        hold.set()
    assert code == 0, proc.output()
    page, _ = await runtime.service.list_tasks(None, limit=10)
    assert {t.status for t in page} == {"retrying"}
    assert {t.outcome for t in page} == {"interrupted"}
    assert all(t.attempts == 1 for t in page)


async def test_a_new_task_wakes_a_sleeping_dispatcher_at_once(db_url: str, receiver: Receiver) -> None:
    """With a 30 s poll interval, delivery within a few seconds proves the wake-up, not the poll, found it."""
    rt = Runtime(make_settings(db_url, poll_interval_s=30))
    await rt.start()
    try:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
        async with running(rt):
            await asyncio.sleep(0.3)  # let it fall asleep on an empty queue
            await rt.service.create_task(biz, {"business_id": "w", "url": receiver.url("/wake")})
            await receiver.wait_for(1, "/wake", timeout=5)
    finally:
        await rt.close()


async def test_a_retry_due_before_the_poll_interval_is_sent_on_time(db_url: str, receiver: Receiver) -> None:
    """A retry 0.2 s after a failure is sent then, not when a 30 s poll next looks at the queue: the claim loop,
    asleep while the failed attempt was still in flight, is woken when its result schedules the retry."""
    rt = Runtime(make_settings(db_url, poll_interval_s=30))
    await rt.start()
    try:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
        receiver.script("/soon", Reply(status=503), Reply(status=200))
        task = await rt.service.create_task(
            biz,
            {
                "business_id": "r",
                "url": receiver.url("/soon"),
                "retry": {"strategy": "intervals", "intervals": [0.2]},
            },
        )
        async with running(rt):
            first, second = await receiver.wait_for(2, "/soon", timeout=5)
            await wait_status(rt, biz, task.id, "succeeded")
        assert second.arrived_at - first.arrived_at >= 0.2
    finally:
        await rt.close()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_a_task_created_elsewhere_wakes_a_worker_process_through_notify(
    runtime: Runtime, receiver: Receiver, db_url: str
) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    proc = WorkerProcess(db_url, poll_interval_s=30)
    try:
        await asyncio.sleep(2.0)  # started and asleep on the empty queue
        await runtime.service.create_task(biz, {"business_id": "n", "url": receiver.url("/notify")})
        await receiver.wait_for(1, "/notify", timeout=5)
    finally:
        proc.terminate()


async def test_a_delayed_task_is_not_sent_before_its_time(runtime: Runtime, receiver: Receiver) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    task = await runtime.service.create_task(
        biz, {"business_id": "d", "url": receiver.url("/later"), "delay": 1.0}
    )
    async with running(runtime):
        [req] = await receiver.wait_for(1, "/later", timeout=10)
    assert req.arrived_at >= task.created_at.timestamp() + 1.0


def test_a_settled_process_collects_young_objects_less_often() -> None:
    """``settle_heap`` (what ``serve`` and ``worker`` call once started) raises the young-generation threshold."""
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gc; from taskcenter.heap import settle_heap, YOUNG_GC_THRESHOLD as T; "
            "before = gc.get_threshold()[0]; settle_heap(); print(before, gc.get_threshold()[0], T, gc.get_freeze_count() > 0)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["700", "10000", "10000", "True"]


async def test_a_result_from_before_the_lease_was_rescued_does_not_land_on_the_task_claimed_again(
    db_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live dispatcher whose heartbeats fail (its database connection in trouble, a stall) loses its lease: the
    attempt in flight is rescued as interrupted and the task claimed again, here by the same dispatcher. The old
    attempt's late result must not land on the new claim (attempt numbers twice, the new send unrecorded), nor
    take the new claim's lease out of the heartbeat."""
    heartbeat = leases.extend_leases
    failing = True

    async def flaky_heartbeat(*args: Any, **kwargs: Any) -> int:
        if failing:
            raise StorageError("database error: connection is closed")
        return await heartbeat(*args, **kwargs)

    monkeypatch.setattr(leases, "extend_leases", flaky_heartbeat)
    hold = asyncio.Event()
    # The second attempt outlasts a lease: it needs the heartbeat that the first one's lost result must not stop.
    receiver.script("/late", Reply(status=200, hold=hold), Reply(status=200, delay_s=1.5))
    rt = Runtime(make_settings(db_url, lease_s=1, rescue_interval_s=0.2))
    await rt.start()
    try:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
        task = await rt.service.create_task(biz, {"business_id": "late", "url": receiver.url("/late")})
        async with running(rt, concurrency=1):
            await receiver.wait_for(1, "/late", timeout=10)
            for _ in range(100):  # rescued (attempt 1 interrupted), then claimed again by the same dispatcher
                again = await rt.service.get_task(biz, task.id)
                if again.status == "processing" and again.attempts == 1:
                    break
                await asyncio.sleep(0.05)
            assert (again.status, again.attempts) == ("processing", 1)
            failing = False
            hold.set()  # the first attempt's response arrives now, after its lease was rescued
            await receiver.wait_for(2, "/late", timeout=10)
            await wait_status(rt, biz, task.id, "succeeded", "retrying", "failed")
            await asyncio.sleep(0.3)  # anything written late would have landed by now
        done = await rt.service.get_task(biz, task.id)
        tries = await rt.service.attempts(biz, task.id)
        assert [(a.number, a.outcome) for a in tries] == [(1, "interrupted"), (2, "success")]
        assert done.attempts == 2
        assert [r.headers["X-Task-Attempt"] for r in receiver.requests_for("/late")] == ["1", "2"]
    finally:
        await rt.close()


async def test_a_worker_stalled_past_its_leases_sends_none_of_the_tasks_rescued_meanwhile(
    runtime: Runtime, receiver: Receiver, db_url: str
) -> None:
    """A worker frozen longer than its lease (SIGSTOP here; a paused VM or a swap storm in life): the rescue records
    its claimed tasks interrupted, another worker may take them, a cancel may end them. Woken, it must not send the
    ones it had claimed and not yet started. Before, it sent all three (attempt 1, already recorded interrupted),
    the cancelled one too, after its cancel had returned (found by tests/test_chaos.py)."""
    hold = asyncio.Event()
    receiver.set_default(Reply(status=200, hold=hold), "/stall")
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    # Retried an hour after the rescue: nothing else sends them within the test.
    items = [
        {
            "business_id": f"s{i}",
            "url": receiver.url("/stall"),
            "retry": {"strategy": "intervals", "intervals": [3600]},
        }
        for i in range(4)
    ]
    await runtime.service.create_tasks(biz, items)
    # One slot: the first task goes (and is held by the receiver), the other three wait in the worker's buffer.
    proc = WorkerProcess(db_url, concurrency=1, lease_s=2, rescue_interval_s=300)
    try:
        await receiver.wait_for(1, "/stall", timeout=20)
        await asyncio.sleep(0.3)
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(2.5)  # past the lease
            rescued = await leases.rescue(runtime.db, now=datetime.now(UTC))
            assert len(rescued) == 4
            cancelled = await runtime.service.get_by_business_id(biz, "s3")
            await runtime.service.cancel(biz, cancelled.id)
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
        hold.set()  # the request in flight at the stall is answered; its slot frees up
        await asyncio.sleep(2.0)
        sent = [
            (r.headers["X-Task-Id"], r.headers["X-Task-Attempt"]) for r in receiver.requests_for("/stall")
        ]
        assert len(sent) == 1, sent
        assert cancelled.id not in {task_id for task_id, _ in sent}
        assert proc.alive(), proc.output()
    finally:
        hold.set()
        proc.kill()
    for n in range(4):
        task = await runtime.service.get_by_business_id(biz, f"s{n}")
        assert task.status in ("retrying", "cancelled"), (n, task.status)
        tries = await runtime.service.attempts(biz, task.id)
        assert [a.outcome for a in tries] == ["interrupted"], (n, [a.outcome for a in tries])
