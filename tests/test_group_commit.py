"""Single creates that arrive together share one transaction (group commit), yet each caller keeps its own
outcome: its task, a 409 naming the live task, or the error of its own row — never another caller's."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa

from taskcenter.errors import DuplicateTask, StorageError
from taskcenter.runtime import Runtime
from taskcenter.signals import NOTIFY_CHANNEL
from taskcenter.storage import tasks as task_sql
from taskcenter.storage.schema import tasks
from tests.test_api_support import PROBLEM, Api, serving, task_body


@pytest_asyncio.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    async with serving(db_url) as client:
        yield client


async def _stored(runtime: Runtime) -> dict[str, tuple[str, int]]:
    """Every stored task: uuid -> (business_id, business_pk)."""
    async with runtime.db.read() as conn:
        rows = (await conn.execute(sa.select(tasks.c.uuid, tasks.c.business_id, tasks.c.business_pk))).all()
    return {str(r.uuid): (r.business_id, r.business_pk) for r in rows}


async def test_concurrent_creates_share_transactions_and_keep_their_own_results(api: Api) -> None:
    key = await api.business_key("shop")
    first = await api.create(key, "taken")  # also warms the active-task count
    service = api.runtime.service
    commits_before = service.group_commits
    names = [f"order-{n}" for n in range(40)] + ["taken", "taken", "twice", "twice"]
    responses = await asyncio.gather(
        *(api.client.post("/tasks", json=task_body(name), headers=key) for name in names)
    )
    commits = service.group_commits - commits_before
    assert commits < len(names), "concurrent creates were not coalesced"

    by_name: dict[str, list[Any]] = {}
    for name, response in zip(names, responses, strict=True):
        by_name.setdefault(name, []).append(response)
    # Every distinct new business_id is created, each response naming its own task.
    stored = await _stored(api.runtime)
    for n in range(40):
        (response,) = by_name[f"order-{n}"]
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["business_id"] == f"order-{n}"
        assert stored[body["id"]][0] == f"order-{n}"
        assert response.headers["location"] == f"/api/v1/tasks/{body['id']}"
    # A business_id already live answers 409 naming the live task, for each caller.
    for response in by_name["taken"]:
        assert response.status_code == 409 and response.headers["content-type"] == PROBLEM
        problem = response.json()
        assert problem["type"] == "https://taskcenter.dev/problems/duplicate"
        assert problem["existing_id"] == first["id"] and problem["field"] == "business_id"
    # Two callers racing for one new business_id: exactly one wins, the other is told which task holds it.
    statuses = sorted(r.status_code for r in by_name["twice"])
    assert statuses == [201, 409]
    winner = next(r.json() for r in by_name["twice"] if r.status_code == 201)
    loser = next(r.json() for r in by_name["twice"] if r.status_code == 409)
    assert loser["existing_id"] == winner["id"]
    assert sorted(b for b, _ in stored.values()) == sorted({*names})


async def test_a_failing_row_fails_only_its_own_caller(runtime: Runtime) -> None:
    service = runtime.service
    shop = await service.ensure_business("shop")
    # A business the database does not know: its row breaks the foreign key, a real failure of the transaction.
    ghost = dataclasses.replace(shop, pk=shop.pk + 1000, code="ghost")
    with pytest.raises(StorageError):
        await service.create_task(ghost, task_body("warm-ghost"))  # alone; also warms its active count
    await service.create_task(shop, task_body("warm-shop"))
    commits_before = service.group_commits

    names = [f"order-{n}" for n in range(10)]
    calls = [service.create_task(shop, task_body(name)) for name in names[:5]]
    calls.append(service.create_task(ghost, task_body("ghost-1")))
    calls += [service.create_task(shop, task_body(name)) for name in names[5:]]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    assert isinstance(outcomes[5], StorageError)
    created = [o for n, o in enumerate(outcomes) if n != 5]
    assert not any(isinstance(o, BaseException) for o in created), created
    stored = await _stored(runtime)
    for name, task in zip(names, created, strict=True):
        assert not isinstance(task, BaseException)
        assert task.business_id == name and task.business_code == "shop"
        assert stored[task.id] == (name, shop.pk)
        assert (await service.get_task(shop, task.id)).row_id == task.row_id
    assert sorted(b for b, _ in stored.values()) == sorted([*names, "warm-shop"])
    # The group failed once, then every row was retried alone.
    assert service.group_commits - commits_before == 1 + len(calls)


async def test_a_duplicate_inside_one_group_names_the_task_created_in_that_group(runtime: Runtime) -> None:
    service = runtime.service
    shop = await service.ensure_business("shop")
    await service.create_task(shop, task_body("warm"))
    commits_before = service.group_commits
    outcomes = await asyncio.gather(
        service.create_task(shop, task_body("same")),
        service.create_task(shop, task_body("other")),
        service.create_task(shop, task_body("same")),
        return_exceptions=True,
    )
    assert service.group_commits - commits_before == 1
    first, other, second = outcomes
    assert not isinstance(first, BaseException) and not isinstance(other, BaseException)
    assert isinstance(second, DuplicateTask) and second.existing_id == first.id
    assert other.business_id == "other"


async def test_a_caller_cancelled_before_its_group_is_written_stores_nothing(runtime: Runtime) -> None:
    service = runtime.service
    shop = await service.ensure_business("shop")
    await service.create_task(shop, task_body("warm"))
    kept = asyncio.ensure_future(service.create_task(shop, task_body("kept")))
    dropped = asyncio.ensure_future(service.create_task(shop, task_body("dropped")))
    await asyncio.sleep(0)  # both are queued; the flusher has not taken them yet
    dropped.cancel()
    task = await kept
    with pytest.raises(asyncio.CancelledError):
        await dropped
    stored = await _stored(runtime)
    assert stored[task.id][0] == "kept"
    assert "dropped" not in {b for b, _ in stored.values()}


async def test_insert_many_stores_exactly_what_the_single_row_insert_stores(runtime: Runtime) -> None:
    """The batch insert (one unnest statement on PostgreSQL) against the outbox's single-row insert."""
    service = runtime.service
    shop = await service.ensure_business("shop")
    extra: dict[str, Any] = {
        "headers": {"Authorization": "Bearer s3cret", "X-Trace": "1"},
        "metadata": {"k": ["v", 1, None]},
        "notify": {"url": "https://example.com/done"},
        "success_codes": [200, 201],
        "priority": 7,
        "delay": 30,
        "timeout": 2.5,
        "retry": {"strategy": "intervals", "intervals": [1, 2]},
    }
    single = service.prepare(shop, task_body("single", **extra))
    many = [service.prepare(shop, task_body(f"many-{n}", **extra)) for n in range(3)]
    many.append(service.prepare(shop, task_body("no-extras")))
    async with runtime.db.write() as conn:
        await conn.run_sync(task_sql.insert_row, single)
    async with runtime.db.write() as conn:
        stored = await task_sql.insert_many(conn, [*many, dict(many[0], uuid=str(uuid.uuid4()))])
    assert [u for _, u in stored] == [r["uuid"] for r in many]  # the repeated business_id is skipped

    times = ("created_at", "updated_at", "next_attempt_at", "scheduled_at")

    def comparable(row: Any) -> dict[str, Any]:
        out = {
            k: v for k, v in row._mapping.items() if k not in ("id", "uuid", "business_id", "body", *times)
        }
        out.update({k: row._mapping[k] - row.created_at for k in times})  # prepared a few µs apart
        return out

    async with runtime.db.read() as conn:
        rows = {r.business_id: r for r in (await conn.execute(sa.select(tasks))).all()}
        nulls = (
            await conn.execute(sa.select(sa.func.count()).select_from(tasks).where(tasks.c.payload.is_(None)))
        ).scalar_one()
    assert len(rows) == 5
    for n in range(3):
        assert comparable(rows[f"many-{n}"]) == comparable(rows["single"])
        assert rows[f"many-{n}"].body == f'{{"id":"many-{n}"}}'
    assert rows["no-extras"].metadata is None and rows["no-extras"].notify is None
    # Absent JSON values are stored alike by both inserts (JSON null, not SQL NULL): none or all of them.
    assert nulls in (0, 5)


@pytest.mark.parametrize("shapes_left", [True, False])
async def test_insert_many_stores_each_rows_own_values_where_rows_differ(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, shapes_left: bool
) -> None:
    """Columns all rows share go once, the others per row; JSON that Python holds equal (1 == 1.0 == True) stays
    apart, as does every other differing column. The same when no new statement shape may be made."""
    monkeypatch.setattr(task_sql, "_SHAPES", {})
    monkeypatch.setattr(task_sql, "MAX_SHAPES", 100 if shapes_left else 0)
    service = runtime.service
    shop = await service.ensure_business("shop")
    given: list[dict[str, Any]] = [
        {"metadata": {"v": 1}, "priority": 1},
        {"metadata": {"v": 1.0}, "priority": 1},
        {"metadata": {"v": True}, "priority": 1},
        {"metadata": {"v": 1}, "priority": 2, "timeout": 3},
        {"metadata": {"v": 1}, "priority": 1, "url": "https://other.example.com/x"},
    ]
    rows = [service.prepare(shop, task_body(f"d-{n}", **extra)) for n, extra in enumerate(given)]
    async with runtime.db.write() as conn:
        stored = await task_sql.insert_many(conn, rows)
    assert [u for _, u in stored] == [r["uuid"] for r in rows]
    async with runtime.db.read() as conn:
        found = {r.business_id: r for r in (await conn.execute(sa.select(tasks))).all()}
    assert [repr(found[f"d-{n}"].metadata) for n in range(5)] == [
        "{'v': 1}",
        "{'v': 1.0}",
        "{'v': True}",
        "{'v': 1}",
        "{'v': 1}",
    ]
    assert [found[f"d-{n}"].priority for n in range(5)] == [1, 1, 1, 2, 1]
    assert [found[f"d-{n}"].timeout for n in range(5)] == [30.0, 30.0, 30.0, 3.0, 30.0]
    assert [found[f"d-{n}"].host for n in range(5)] == ["api.example.com:443"] * 4 + ["other.example.com:443"]
    assert [found[f"d-{n}"].body for n in range(5)] == [f'{{"id":"d-{n}"}}' for n in range(5)]


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # the split is PostgreSQL's statement
async def test_past_max_shapes_a_new_shape_goes_as_arrays_and_is_not_remembered(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    shapes: dict[Any, None] = {}
    monkeypatch.setattr(task_sql, "_SHAPES", shapes)
    monkeypatch.setattr(task_sql, "MAX_SHAPES", 1)
    service = runtime.service
    shop = await service.ensure_business("shop")
    first = [service.prepare(shop, task_body(f"s-{n}")) for n in range(2)]
    other = [service.prepare(shop, task_body(f"o-{n}", priority=n)) for n in range(2)]  # priority varies too
    async with runtime.db.write() as conn:
        stored = await task_sql.insert_many(conn, first)
    assert len(shapes) == 1
    varying, shared, values = task_sql._split_columns(tuple(other[0].keys()), other)
    assert shared == [] and varying == list(other[0].keys()) and all(len(v) == 2 for v in values)
    async with runtime.db.write() as conn:
        stored += await task_sql.insert_many(conn, other)
    assert len(stored) == 4 and len(shapes) == 1
    async with runtime.db.read() as conn:
        priorities = dict((await conn.execute(sa.select(tasks.c.business_id, tasks.c.priority))).all())
    assert priorities == {"s-0": 0, "s-1": 0, "o-0": 0, "o-1": 1}


async def test_the_tasks_of_one_batch_share_their_creation_time(runtime: Runtime) -> None:
    service = runtime.service
    shop = await service.ensure_business("shop")
    results = await service.create_tasks(shop, [task_body(f"t-{n}") for n in range(3)])
    created = {r["task"].created_at for r in results} | {r["task"].next_attempt_at for r in results}
    assert len(created) == 1
    async with runtime.db.read() as conn:
        stored = (await conn.execute(sa.select(tasks.c.created_at, tasks.c.updated_at))).all()
    assert {t for row in stored for t in row} == created


async def _drained(received: asyncio.Queue[str]) -> None:
    """Let notifications still on their way arrive, then drop them (a late one would be counted later)."""
    await asyncio.sleep(0.2)
    while not received.empty():
        received.get_nowait()


@contextlib.asynccontextmanager
async def _notifications(runtime: Runtime) -> AsyncIterator[asyncio.Queue[str]]:
    """The payloads of NOTIFY on the dispatchers' channel, as another process's listener receives them."""
    import asyncpg

    url = sa.make_url(runtime.db.url)
    listener = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database=url.database
    )
    received: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(NOTIFY_CHANNEL, lambda *args: received.put_nowait(args[3]))
    try:
        yield received
    finally:
        await listener.close()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # NOTIFY is PostgreSQL's
async def test_creates_notify_other_processes_on_postgresql(runtime: Runtime, backend: str) -> None:
    """One NOTIFY per stored group or batch (folded into the insert), none when nothing was stored."""
    service = runtime.service
    shop = await service.ensure_business("shop")
    async with _notifications(runtime) as received:
        await asyncio.gather(*(service.create_task(shop, task_body(f"n-{n}")) for n in range(5)))
        await asyncio.wait_for(received.get(), timeout=5)
        await _drained(received)  # the creates may have gone in two groups, each notifying
        await service.create_tasks(shop, [task_body("b-1"), task_body("b-2")])
        await asyncio.wait_for(received.get(), timeout=5)
        await _drained(received)
        with pytest.raises(DuplicateTask):
            await service.create_task(shop, task_body("n-1"))
        await service.create_tasks(shop, [task_body("b-1")])
        await service.create_task(shop, task_body("last"))
        assert await asyncio.wait_for(received.get(), timeout=5) == ""
        await asyncio.sleep(0.2)
        assert received.empty(), "a create that stored nothing notified"


async def test_a_group_is_never_larger_than_one_statement(runtime: Runtime) -> None:
    """A group is written in autocommit as one statement, so it must fit one (SQLite's parameter limit)."""
    service = runtime.service
    shop = await service.ensure_business("shop")
    await service.create_task(shop, task_body("warm"))
    per_statement = task_sql.rows_per_statement(runtime.db.dialect)
    count = min(per_statement + 10, 1000 + 10)
    commits_before = service.group_commits
    created = await asyncio.gather(*(service.create_task(shop, task_body(f"g-{n}")) for n in range(count)))
    assert len({t.id for t in created}) == count
    assert service.group_commits - commits_before >= 2
    assert len(await _stored(runtime)) == count + 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)  # NOTIFY is PostgreSQL's
async def test_a_public_batch_stores_all_at_once_or_reports_each_duplicate(
    runtime: Runtime, backend: str
) -> None:
    """The API's batch (public form): all new -> one statement and one NOTIFY; one live duplicate -> nothing
    stored by that statement, then each item reported as usual (409 naming the live task), still one NOTIFY,
    and none when nothing at all was stored."""
    service = runtime.service
    shop = await service.ensure_business("shop")
    async with _notifications(runtime) as received:
        first = await service.create_tasks(shop, [task_body("p-1"), task_body("p-2")], public=True)
        assert [r["status"] for r in first] == [201, 201]
        await asyncio.wait_for(received.get(), timeout=5)
        mixed = await service.create_tasks(shop, [task_body("p-3"), task_body("p-1")], public=True)
        assert [r["status"] for r in mixed] == [201, 409]
        assert mixed[1]["existing_id"] == first[0]["task"]["id"]
        await asyncio.wait_for(received.get(), timeout=5)
        again = await service.create_tasks(shop, [task_body("p-2"), task_body("p-3")], public=True)
        assert [r["status"] for r in again] == [409, 409]
        await asyncio.sleep(0.2)
        assert received.empty(), "a batch that stored nothing notified"
    stored = await _stored(runtime)
    assert sorted(b for b, _ in stored.values()) == ["p-1", "p-2", "p-3"]
    assert {r["task"]["id"] for r in first + mixed if r["status"] == 201} == set(stored)


async def test_groups_in_flight_one_on_sqlite_two_on_postgresql_and_creates_join_a_waiting_group(
    runtime: Runtime, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second group starts only while the first is being written, and never on SQLite (one writer); creates
    that arrive while a flusher waits for its connection go in with that flusher's group."""
    service = runtime.service
    shop = await service.ensure_business("shop")
    await service.create_task(shop, task_body("warm"))
    writing = most = 0
    sizes: list[int] = []
    groups = service._creation.groups
    insert_group = groups._insert_group

    async def slow_insert(conn: Any, rows: list[dict[str, Any]]) -> dict[int, BaseException | None]:
        nonlocal writing, most
        writing += 1
        most = max(most, writing)
        sizes.append(len(rows))
        try:
            await asyncio.sleep(0.05)
            return await insert_group(conn, rows)
        finally:
            writing -= 1

    monkeypatch.setattr(groups, "_insert_group", slow_insert)
    first = asyncio.ensure_future(service.create_task(shop, task_body("first")))
    await asyncio.sleep(0.01)  # the first group is being written
    rest = [asyncio.ensure_future(service.create_task(shop, task_body(f"r-{n}"))) for n in range(6)]
    created = await asyncio.gather(first, *rest)
    assert len({t.id for t in created}) == 7
    assert most == (2 if backend == "postgres" else 1)
    assert sizes == [1, 6]  # the six created together went in one group, whichever flusher took them
    assert not groups._flushers
