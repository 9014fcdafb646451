"""Cancelling a task a worker has claimed but not sent yet: the request never leaves, no attempt is charged.

A dispatcher claims ahead of its free slots and holds those tasks in a buffer. A cancel reaches it in this process
directly, from other processes by NOTIFY (PostgreSQL) or, at the latest, with its next heartbeat's read (SQLite).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import sqlalchemy as sa

from taskcenter import TaskCenter
from taskcenter.errors import InvalidTransition, StorageError
from taskcenter.runtime import Runtime
from taskcenter.service import Business
from taskcenter.signals import CANCEL_CHANNEL, NOTIFY_PAYLOAD_MAX, cancel_payloads, parse_cancel_payload
from taskcenter.storage import leases
from taskcenter.storage.schema import tasks
from tests.conftest import make_settings
from tests.processes import WorkerProcess
from tests.receiver import Receiver, Reply
from tests.test_delivery import running, wait_status
from tests.test_library import wait_status as library_wait_status
from tests.test_library import working

FAST_RETRY = {"strategy": "intervals", "intervals": [0.05, 0.05]}
#: So long that the heartbeat (every quarter lease), which also reads which held tasks were cancelled, never runs
#: during a test: what it checks then is the signal.
NO_HEARTBEAT = 3600.0


@pytest_asyncio.fixture
async def signalled(db_url: str) -> AsyncIterator[Runtime]:
    """A runtime whose dispatchers learn of cancels only by signal (in this process, or NOTIFY)."""
    rt = Runtime(make_settings(db_url, lease_s=NO_HEARTBEAT))
    await rt.start()
    yield rt
    await rt.close()


async def _create(rt: Runtime, biz: Business, receiver: Receiver, count: int) -> list[str]:
    ids = []
    for n in range(count):
        data = {"business_id": f"t{n}", "url": receiver.url("/slow"), "retry": FAST_RETRY}
        ids.append((await rt.service.create_task(biz, data)).id)
    return ids


async def _held(rt: Runtime, biz: Business, count: int) -> set[str]:
    """Wait until ``count`` tasks are claimed (processing), and return their ids."""
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        page, _ = await rt.service.list_tasks(biz, status=["processing"], limit=500)
        if len(page) >= count:
            return {t.id for t in page}
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {len(page)} tasks claimed, expected {count}")
        await asyncio.sleep(0.05)


async def _leases(rt: Runtime, uuids: Sequence[str]) -> dict[str, str | None]:
    async with rt.db.read() as conn:
        rows = (await conn.execute(sa.select(tasks.c.uuid, tasks.c.lease_owner))).all()
    return {str(u): owner for u, owner in rows if str(u) in uuids}


async def _wait_unleased(rt: Runtime, uuids: Sequence[str], timeout: float = 15) -> None:
    """Wait until the worker has let go of these tasks (it drops a cancelled buffered task's lease)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        leases = await _leases(rt, uuids)
        if not any(leases.values()):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still leased: {leases}")
        await asyncio.sleep(0.05)


def _sent_ids(receiver: Receiver) -> list[str]:
    return [r.headers["X-Task-Id"] for r in receiver.requests_for("/slow")]


async def _assert_never_sent(rt: Runtime, biz: Business, receiver: Receiver, uuids: Sequence[str]) -> None:
    for uuid in uuids:
        task = await rt.service.get_task(biz, uuid)
        assert (task.status, task.attempts, task.last_attempt_at) == ("cancelled", 0, None), uuid
        assert await rt.service.attempts(biz, uuid) == []
    assert not set(uuids) & set(_sent_ids(receiver))
    assert not any((await _leases(rt, uuids)).values())


async def test_a_cancelled_task_waiting_in_the_buffer_is_never_sent(
    signalled: Runtime, receiver: Receiver
) -> None:
    """Same process (embedded serve, library): the cancel reaches the dispatcher directly. The task cancelled in
    flight keeps its attempt (its request was sent) and is not tried again although the receiver failed it."""
    runtime = signalled
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    hold = asyncio.Event()
    receiver.set_default(Reply(status=500, hold=hold), "/slow")
    created = await _create(runtime, biz, receiver, 12)
    async with running(runtime, concurrency=2):
        await receiver.wait_for(2, "/slow", timeout=10)
        held = await _held(runtime, biz, 10)  # 2 in flight, 8 in the buffer (4 x concurrency)
        in_flight = _sent_ids(receiver)
        buffered = sorted(held - set(in_flight))
        doomed = buffered[:5]
        for uuid in [*doomed, in_flight[0]]:
            assert (await runtime.service.cancel(biz, uuid)).status == "cancelled"
        await _wait_unleased(runtime, doomed)
        receiver.set_default(Reply(status=200), "/slow")
        hold.set()
        for uuid in set(created) - {*doomed, in_flight[0]}:
            await wait_status(runtime, biz, uuid, "succeeded")
        await wait_status(runtime, biz, in_flight[0], "cancelled")
        await asyncio.sleep(0.5)  # time enough for a wrong retry (0.05 s) to be sent
    await _assert_never_sent(runtime, biz, receiver, doomed)
    assert _sent_ids(receiver).count(in_flight[0]) == 1
    cut = await runtime.service.get_task(biz, in_flight[0])
    assert (cut.status, cut.attempts, cut.outcome) == ("cancelled", 1, "server_error")
    [attempt] = await runtime.service.attempts(biz, in_flight[0])
    assert attempt.response is not None and attempt.response["status_code"] == 500


async def test_a_task_cancelled_while_waiting_for_the_pacer_is_not_sent(
    signalled: Runtime, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A started task may still wait for the per-host pacer: the cancel is looked up just before it leaves."""
    runtime = signalled
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    [uuid] = await _create(runtime, biz, receiver, 1)
    dispatcher = runtime.dispatcher(concurrency=1)
    paced = asyncio.Event()
    go = asyncio.Event()

    async def pacer(_host: str) -> None:  # as if the host's bucket had no token for a while
        paced.set()
        await go.wait()

    monkeypatch.setattr(dispatcher, "_pace", pacer)
    worker = asyncio.create_task(runtime.run_dispatcher(dispatcher))
    try:
        await asyncio.wait_for(paced.wait(), timeout=10)
        await runtime.service.cancel(biz, uuid)
        go.set()
        await _wait_unleased(runtime, [uuid])
    finally:
        dispatcher.stop()
        await asyncio.wait_for(worker, timeout=15)
    await _assert_never_sent(runtime, biz, receiver, [uuid])


async def test_a_cancel_from_another_runtime_reaches_the_worker(
    db_url: str, backend: str, receiver: Receiver
) -> None:
    """Not this process's notifier: NOTIFY on PostgreSQL, the heartbeat's read of the held tasks on SQLite."""
    worker_rt = Runtime(make_settings(db_url, lease_s=1.0 if backend == "sqlite" else NO_HEARTBEAT))
    other = Runtime(make_settings(db_url))
    await worker_rt.start()
    try:
        biz = await other.service.ensure_business("shop", rate_limit_per_minute=600_000)
        hold = asyncio.Event()
        receiver.set_default(Reply(hold=hold), "/slow")
        created = await _create(other, biz, receiver, 6)
        async with running(worker_rt, concurrency=1):
            [first] = await receiver.wait_for(1, "/slow", timeout=10)
            buffered = sorted(await _held(other, biz, 5) - {first.headers["X-Task-Id"]})
            doomed = buffered[:3]
            for uuid in doomed:
                await other.service.cancel(biz, uuid)
            await _wait_unleased(other, doomed)
            hold.set()
            for uuid in set(created) - set(doomed):
                await wait_status(other, biz, uuid, "succeeded")
        await _assert_never_sent(other, biz, receiver, doomed)
    finally:
        await other.close()
        await worker_rt.close()


@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_bulk_cancel_in_another_process_stops_a_worker_process_on_postgres(
    runtime: Runtime, db_url: str, receiver: Receiver
) -> None:
    """The worker is a `taskcenter worker` process; the cancel (several tasks at once) comes from this one."""
    rt = runtime
    biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
    hold = asyncio.Event()
    receiver.set_default(Reply(hold=hold), "/slow")
    created = await _create(rt, biz, receiver, 8)
    worker = WorkerProcess(db_url, concurrency=1, lease_s=NO_HEARTBEAT)
    try:
        worker.wait_ready()
        [first] = await receiver.wait_for(1, "/slow", timeout=15)
        buffered = sorted(await _held(rt, biz, 5) - {first.headers["X-Task-Id"]})
        doomed = [*buffered[:3], created[-1]]  # three buffered, one not claimed yet
        cancelled = await rt.service.cancel_many(biz, doomed)
        assert [t.status for t in cancelled] == ["cancelled"] * 4
        await _wait_unleased(rt, doomed)
        hold.set()
        for uuid in set(created) - set(doomed):
            await wait_status(rt, biz, uuid, "succeeded", timeout=20)
    finally:
        assert worker.terminate() == 0
    await _assert_never_sent(rt, biz, receiver, doomed)


async def test_a_bulk_cancel_is_all_or_nothing(runtime: Runtime, receiver: Receiver) -> None:
    biz = await runtime.service.ensure_business("shop")
    a = await runtime.service.create_task(biz, {"business_id": "a", "url": receiver.url("/a"), "delay": 60})
    b = await runtime.service.create_task(biz, {"business_id": "b", "url": receiver.url("/b"), "delay": 60})
    await runtime.service.cancel(biz, b.id)
    with pytest.raises(InvalidTransition, match="cannot be cancelled"):
        await runtime.service.cancel_many(biz, [a.id, b.id])
    assert (await runtime.service.get_task(biz, a.id)).status == "pending"


def test_cancel_payloads_fit_notify_and_keep_every_id() -> None:
    ids = list(range(10**12, 10**12 + 3000))  # 13 digits each: 42,000 bytes in all
    payloads = cancel_payloads(ids)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= NOTIFY_PAYLOAD_MAX for p in payloads)
    assert [i for p in payloads for i in parse_cancel_payload(p)] == ids
    assert cancel_payloads([]) == []
    assert parse_cancel_payload("1,x,,2, 3") == [1, 2]


async def test_postgres_takes_each_cancel_payload(pg_url: str) -> None:
    """Every payload of a bulk cancel is one PostgreSQL accepts (under 8000 bytes) and delivers whole."""
    conn: Any = await asyncpg.connect(sa.make_url(pg_url).render_as_string(hide_password=False))
    got: list[str] = []
    arrived = asyncio.Event()

    def on_notify(*args: Any) -> None:
        got.append(args[3])
        arrived.set()

    try:
        await conn.add_listener(CANCEL_CHANNEL, on_notify)
        ids = list(range(10**12, 10**12 + 3000))
        payloads = cancel_payloads(ids)
        sender: Any = await asyncpg.connect(sa.make_url(pg_url).render_as_string(hide_password=False))
        try:
            async with sender.transaction():
                for payload in payloads:
                    await sender.execute("SELECT pg_notify($1, $2)", CANCEL_CHANNEL, payload)
        finally:
            await sender.close()
        while len(got) < len(payloads):
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), timeout=5)
        assert [i for p in got for i in parse_cancel_payload(p)] == ids
    finally:
        await conn.close()


async def test_the_library_worker_drops_a_task_cancelled_in_its_buffer(
    db_url: str, receiver: Receiver
) -> None:
    """``tc.cancel()`` beside ``tc.run_worker()`` in one process: the same in-process signal."""
    hold = asyncio.Event()
    receiver.set_default(Reply(hold=hold), "/slow")
    settings = make_settings(db_url, lease_s=NO_HEARTBEAT)
    async with TaskCenter(settings=settings, business="shop") as tc:
        created = [
            (await tc.acreate_task("POST", receiver.url("/slow"), business_id=f"l{n}")).id for n in range(5)
        ]
        async with working(tc, concurrency=1):
            [first] = await receiver.wait_for(1, "/slow", timeout=10)
            page, _ = await tc.alist_tasks(status=["processing"])
            doomed = sorted({t.id for t in page} - {first.headers["X-Task-Id"]})[:2]
            for uuid in doomed:
                await tc.acancel(uuid)
            await _wait_unleased(tc.runtime, doomed)
            hold.set()
            for uuid in set(created) - set(doomed):
                await library_wait_status(tc, uuid, "succeeded")
        assert not set(doomed) & set(_sent_ids(receiver))
        for uuid in doomed:
            task = await tc.aget_task(uuid)
            assert (task.status, task.attempts) == ("cancelled", 0)


async def test_a_task_cancelled_between_its_claim_and_its_buffering_is_not_sent(
    signalled: Runtime, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim has leased the task (so the cancel signals its worker) but has not returned its rows yet: the
    signal is kept for the batch and the task leaves the buffer as soon as it enters it."""
    runtime = signalled
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    [uuid] = await _create(runtime, biz, receiver, 1)
    dispatcher = runtime.dispatcher(concurrency=1)
    claim = dispatcher._claim
    raced: list[str] = []

    async def claim_then_cancel(limit: int) -> list[Any]:
        rows = await claim(limit)
        for row in rows:  # committed, not yet buffered: a cancel from another task of this process lands now
            await runtime.service.cancel(biz, str(row["uuid"]))
            raced.append(str(row["uuid"]))
        return rows

    monkeypatch.setattr(dispatcher, "_claim", claim_then_cancel)
    worker = asyncio.create_task(runtime.run_dispatcher(dispatcher))
    try:
        await wait_status(runtime, biz, uuid, "cancelled")
        await _wait_unleased(runtime, [uuid])
    finally:
        dispatcher.stop()
        await asyncio.wait_for(worker, timeout=15)
    assert raced == [uuid]
    await _assert_never_sent(runtime, biz, receiver, [uuid])


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_a_cancel_from_another_process_is_seen_with_the_next_write_of_results(
    db_url: str, receiver: Receiver
) -> None:
    """No channel between processes on SQLite, and no heartbeat here: the write of the first result reads which
    held tasks were cancelled, in its own transaction, and the buffer lets them go before their turn."""
    worker_rt = Runtime(make_settings(db_url, lease_s=NO_HEARTBEAT))
    other = Runtime(make_settings(db_url))
    await worker_rt.start()
    try:
        biz = await other.service.ensure_business("shop", rate_limit_per_minute=600_000)
        first, second = asyncio.Event(), asyncio.Event()
        receiver.script("/slow", Reply(hold=first), Reply(hold=second))
        created = await _create(other, biz, receiver, 5)
        async with running(worker_rt, concurrency=1):
            await receiver.wait_for(1, "/slow", timeout=10)
            assert await _held(other, biz, 5) == set(created)
            assert _sent_ids(receiver) == created[:1]  # the rest wait in the buffer, in the order created
            doomed = created[2:]  # created[1] starts the moment created[0] is answered, before its write
            for uuid in doomed:
                await other.service.cancel(biz, uuid)
            first.set()
            await _wait_unleased(other, doomed)
            second.set()
            for uuid in created[:2]:
                await wait_status(other, biz, uuid, "succeeded")
        await _assert_never_sent(other, biz, receiver, doomed)
    finally:
        await other.close()
        await worker_rt.close()


async def test_a_dropped_task_stays_leased_until_its_lease_is_given_back(
    db_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When giving back a dropped task's lease fails, the heartbeat keeps the lease (the rescue would charge it an
    interrupted attempt) and tries again with each beat."""
    release = leases.release
    failures = 0
    FAILURES = 8  # the first try and 7 heartbeats (every 0.25 s): well past the 1 s lease

    async def flaky_release(*args: Any, **kwargs: Any) -> None:
        nonlocal failures
        if failures < FAILURES:
            failures += 1
            raise StorageError("database error: connection is closed")
        await release(*args, **kwargs)

    monkeypatch.setattr(leases, "release", flaky_release)
    rt = Runtime(make_settings(db_url, lease_s=1.0, rescue_interval_s=0.2))
    await rt.start()
    try:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
        hold = asyncio.Event()
        receiver.set_default(Reply(hold=hold), "/slow")
        created = await _create(rt, biz, receiver, 3)
        async with running(rt, concurrency=1):
            await receiver.wait_for(1, "/slow", timeout=10)
            await _held(rt, biz, 3)
            doomed = created[2]
            await rt.service.cancel(biz, doomed)
            await _wait_unleased(rt, [doomed])
            hold.set()
            for uuid in created[:2]:
                await wait_status(rt, biz, uuid, "succeeded")
        assert failures == FAILURES
        await _assert_never_sent(rt, biz, receiver, [doomed])
    finally:
        await rt.close()
