"""The storage contract: the same suite on SQLite and PostgreSQL (the ``db_url`` fixture is parametrised).

Claims, leases, results, releases, rescues, live ``business_id`` uniqueness, compare-and-set and pagination.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from multidict import istr

from taskcenter.crypto import SecretBox
from taskcenter.domain.retry import RetryPolicy
from taskcenter.errors import DuplicateTask, InvalidTransition
from taskcenter.intake import Defaults, new_task_row
from taskcenter.service import Business, TaskService
from taskcenter.storage import leases, queue
from taskcenter.storage import results as result_sql
from taskcenter.storage import tasks as task_sql
from taskcenter.storage.database import Database, json_text
from taskcenter.storage.schema import NEXT_DUE_SQL, attempts, tasks

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE_S = 60.0
DEFAULTS = Defaults(retry=RetryPolicy.fixed(interval=10, max_attempts=3))
_ids = itertools.count(1)


@pytest_asyncio.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = Database(db_url)
    yield database
    await database.close()


@pytest_asyncio.fixture
async def service(db: Database) -> TaskService:
    return TaskService(db, clock=lambda: T0)


@pytest_asyncio.fixture
async def business(service: TaskService) -> Business:
    return await service.ensure_business("acme")


def task_row(business_pk: int, business_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A validated row due at T0, with any column overridden."""
    row = new_task_row(
        {"business_id": business_id or f"key-{next(_ids)}", "url": "https://api.example.com/hook"},
        business_pk=business_pk,
        defaults=DEFAULTS,
        box=SecretBox.disabled(),
        now=T0,
    )
    row.update(overrides)
    return row


async def insert(db: Database, business_pk: int, business_id: str | None = None, **overrides: Any) -> int:
    """Insert one task through the one insert path (sync ``insert_row`` run on the async connection)."""
    row = task_row(business_pk, business_id, **overrides)
    async with db.write() as conn:
        return await conn.run_sync(task_sql.insert_row, row)


async def row_of(db: Database, task_id: int) -> sa.RowMapping:
    async with db.read() as conn:
        found = await task_sql.get(conn, row_id=task_id)
    assert found is not None
    return found


async def attempts_of(db: Database, task_id: int) -> list[sa.RowMapping]:
    async with db.read() as conn:
        return await task_sql.list_attempts(conn, task_id)


async def claim(db: Database, worker: str = "w1", *, now: datetime = T0, limit: int = 100) -> list[int]:
    rows = await queue.claim(db, worker=worker, now=now, limit=limit, lease_s=LEASE_S)
    return [r["id"] for r in rows]


def result(
    task_id: int,
    *,
    attempt: int = 1,
    status: str = "succeeded",
    outcome: str = "success",
    next_at: datetime | None = None,
) -> result_sql.Finished:
    finished = T0 + timedelta(seconds=1) if status in ("succeeded", "failed") else None
    return result_sql.Finished(
        task_id=task_id,
        attempt=attempt,
        status=status,
        outcome=outcome,
        started_at=T0,
        duration_ms=12,
        next_attempt_at=next_at,
        finished_at=finished,
        request={"method": "POST", "url": "https://api.example.com/hook"},
        response={"status_code": 200, "body": "ok"},
        error=None,
    )


# -- insert and read --------------------------------------------------------------------------------------


async def test_an_inserted_task_reads_back_with_aware_utc_times(db: Database, business: Business) -> None:
    task_id = await insert(db, business.pk, "order-1", next_attempt_at=T0 + timedelta(minutes=5))
    row = await row_of(db, task_id)
    assert row["business_id"] == "order-1"
    assert row["business_code"] == "acme"
    assert row["status"] == "pending"
    assert row["next_attempt_at"] == T0 + timedelta(minutes=5)
    assert row["next_attempt_at"].tzinfo is not None
    assert row["created_at"] == T0
    assert row["retry"] == DEFAULTS.retry.to_dict()
    async with db.read() as conn:
        by_uuid = await task_sql.get(conn, uuid=str(row["uuid"]))
    assert by_uuid is not None and by_uuid["id"] == task_id


async def test_a_task_of_another_business_is_not_found_when_scoped(
    db: Database, service: TaskService
) -> None:
    mine = await service.ensure_business("mine")
    theirs = await service.ensure_business("theirs")
    task_id = await insert(db, theirs.pk)
    async with db.read() as conn:
        assert await task_sql.get(conn, row_id=task_id, business_pk=mine.pk) is None
        assert await task_sql.get(conn, row_id=task_id, business_pk=theirs.pk) is not None


# -- claim ------------------------------------------------------------------------------------------------


async def test_claim_returns_due_tasks_by_priority_then_due_time(db: Database, business: Business) -> None:
    low_old = await insert(db, business.pk, priority=0, next_attempt_at=T0 - timedelta(minutes=10))
    high_new = await insert(db, business.pk, priority=5, next_attempt_at=T0 - timedelta(minutes=1))
    high_old = await insert(db, business.pk, priority=5, next_attempt_at=T0 - timedelta(minutes=2))
    low_new = await insert(db, business.pk, priority=0, next_attempt_at=T0)
    negative = await insert(db, business.pk, priority=-3, next_attempt_at=T0 - timedelta(days=1))
    assert await claim(db) == [high_old, high_new, low_old, low_new, negative]


async def test_claim_returns_a_batch_in_its_fair_order_across_businesses(
    db: Database, service: TaskService
) -> None:
    """The batch comes back round-robin across businesses, as the claim picked it: a later business's tasks are
    not started after every task of an earlier backlog in the same batch."""
    bulk = await service.ensure_business("bulk")
    urgent = await service.ensure_business("urgent")
    backlog = [await insert(db, bulk.pk, next_attempt_at=T0 - timedelta(minutes=10 - i)) for i in range(4)]
    later = [await insert(db, urgent.pk, next_attempt_at=T0 - timedelta(seconds=30 - i)) for i in range(2)]
    rows = await queue.claim(
        db, worker="w1", now=T0, limit=100, lease_s=LEASE_S, businesses=[bulk.pk, urgent.pk]
    )
    assert [r["id"] for r in rows] == [backlog[0], later[0], backlog[1], later[1], backlog[2], backlog[3]]


async def processor_task(db: Database, business_pk: int, name: str, **overrides: Any) -> int:
    """A task of processor ``name`` (as intake stores one: no request, its host named after the type)."""
    return await insert(
        db, business_pk, type=name, host=f"processor:{name}", method=None, url=None, payload={}, **overrides
    )


@pytest.mark.parametrize("fair", [False, True])
async def test_claim_takes_http_tasks_and_only_the_processor_types_it_is_given(
    db: Database, service: TaskService, fair: bool
) -> None:
    """A worker claims what it can run: HTTP tasks and the types of its processors; the rest stays due."""
    acme = await service.ensure_business("acme")
    other = await service.ensure_business("other")
    http = await insert(db, acme.pk, next_attempt_at=T0 - timedelta(minutes=1))
    resize = await processor_task(db, acme.pk, "resize", next_attempt_at=T0 - timedelta(minutes=3))
    render = await processor_task(db, other.pk, "render", next_attempt_at=T0 - timedelta(minutes=2))
    keys = [acme.pk, other.pk] if fair else []

    async def take(*types: str) -> list[int]:
        rows = await queue.claim(
            db, worker="w1", now=T0, limit=100, lease_s=LEASE_S, businesses=keys, types=types
        )
        return [r["id"] for r in rows]

    assert await take() == [http]
    assert await take("zoom") == []
    assert await take("resize") == [resize]
    assert (await row_of(db, render))["status"] == "pending"
    assert await take("render", "resize") == [render]


async def test_claim_of_http_and_processor_tasks_is_fair_across_businesses_in_one_order(
    db: Database, service: TaskService
) -> None:
    """With processor types the batch is still round-robin across businesses, each business's HTTP and
    processor tasks together in its own priority and due-time order."""
    bulk = await service.ensure_business("bulk")
    urgent = await service.ensure_business("urgent")
    backlog = [
        await insert(db, bulk.pk, next_attempt_at=T0 - timedelta(minutes=10)),
        await processor_task(db, bulk.pk, "resize", next_attempt_at=T0 - timedelta(minutes=9)),
        await processor_task(db, bulk.pk, "resize", priority=1, next_attempt_at=T0 - timedelta(minutes=1)),
        await insert(db, bulk.pk, next_attempt_at=T0 - timedelta(minutes=8)),
    ]
    later = [
        await processor_task(db, urgent.pk, "resize", next_attempt_at=T0 - timedelta(seconds=30)),
        await insert(db, urgent.pk, next_attempt_at=T0 - timedelta(seconds=20)),
    ]
    rows = await queue.claim(
        db, worker="w1", now=T0, limit=100, lease_s=LEASE_S, businesses=[bulk.pk, urgent.pk], types=["resize"]
    )
    assert [r["id"] for r in rows] == [backlog[2], later[0], backlog[0], later[1], backlog[1], backlog[3]]


async def test_claim_with_a_limit_takes_the_most_urgent(db: Database, business: Business) -> None:
    await insert(db, business.pk, priority=0)
    urgent = await insert(db, business.pk, priority=9)
    assert await claim(db, limit=1) == [urgent]


async def test_claim_never_returns_future_tasks(db: Database, business: Business) -> None:
    due = await insert(db, business.pk, next_attempt_at=T0)
    later = await insert(db, business.pk, next_attempt_at=T0 + timedelta(microseconds=1))
    assert await claim(db) == [due]
    assert await claim(db, now=T0 + timedelta(seconds=1)) == [later]


@pytest.mark.parametrize("status", ["processing", "succeeded", "failed", "cancelled"])
async def test_claim_takes_only_pending_and_retrying_tasks(
    db: Database, business: Business, status: str
) -> None:
    await insert(db, business.pk, status=status)
    retrying = await insert(db, business.pk, status="retrying", attempts=1)
    assert await claim(db) == [retrying]


async def test_claim_puts_the_task_under_the_workers_lease(db: Database, business: Business) -> None:
    task_id = await insert(db, business.pk)
    rows = await queue.claim(db, worker="w1", now=T0, limit=10, lease_s=LEASE_S)
    assert rows[0]["url"] == "https://api.example.com/hook"
    assert rows[0]["attempts"] == 0
    row = await row_of(db, task_id)
    assert row["status"] == "processing"
    assert row["lease_owner"] == "w1"
    assert row["lease_expires_at"] == T0 + timedelta(seconds=LEASE_S)
    assert await claim(db, "w2") == []


async def test_concurrent_claims_never_return_the_same_task(db: Database, business: Business) -> None:
    ids = {await insert(db, business.pk) for _ in range(30)}
    for _ in range(3):
        first, second = await asyncio.gather(claim(db, "w1", limit=20), claim(db, "w2", limit=20))
        assert not set(first) & set(second)
        assert set(first) | set(second) <= ids
    claimed = await _claimed_by(db)
    assert set(claimed) == ids
    assert len(claimed) == len(ids)


async def test_claims_through_two_database_objects_never_return_the_same_task(
    db: Database, db_url: str, business: Business
) -> None:
    """Two processes sharing one database: each has its own engine and pool."""
    ids = {await insert(db, business.pk) for _ in range(40)}
    other = Database(db_url)
    try:
        rounds = await asyncio.gather(
            *(claim(db, f"a{n}", limit=7) for n in range(4)),
            *(claim(other, f"b{n}", limit=7) for n in range(4)),
        )
    finally:
        await other.close()
    everything = [task_id for got in rounds for task_id in got]
    assert len(everything) == len(set(everything))
    assert set(everything) <= ids
    assert len(everything) == min(40, 8 * 7)


async def _claimed_by(db: Database) -> dict[int, str]:
    async with db.read() as conn:
        rows = await conn.execute(
            sa.select(tasks.c.id, tasks.c.lease_owner).where(tasks.c.status == "processing")
        )
        return {r.id: r.lease_owner for r in rows}


# -- finish -----------------------------------------------------------------------------------------------


async def test_finish_records_the_attempt_and_moves_the_task(db: Database, business: Business) -> None:
    task_id = await insert(db, business.pk)
    await claim(db)
    written = await result_sql.finish(db, worker="w1", now=T0, results=[result(task_id)])
    assert written == result_sql.Written(landed=[(task_id, "succeeded")], lost=[])
    row = await row_of(db, task_id)
    assert (row["status"], row["attempts"], row["outcome"]) == ("succeeded", 1, "success")
    assert row["lease_owner"] is None and row["lease_expires_at"] is None
    assert row["finished_at"] == T0 + timedelta(seconds=1)
    # The task keeps the response with the attempt's duration (DESIGN: last_response {…, duration_ms}).
    assert row["last_response"] == {"status_code": 200, "body": "ok", "duration_ms": 12}
    [attempt] = await attempts_of(db, task_id)
    assert (attempt["number"], attempt["outcome"], attempt["worker"]) == (1, "success", "w1")


@pytest.mark.parametrize(
    "value",
    [None, 'text with "quotes", \\ and ünïcode', 7, 2.5, True, [1, "x", None], {"nested": {"a": [1, 2]}}],
)
async def test_finish_stores_every_json_value_as_sqlalchemy_reads_it(
    db: Database, business: Business, value: Any
) -> None:
    # SQLite writes a batch's results as one JSON document that its statements take apart (json_each): each
    # value, whatever its JSON type, must read back as it was given (a processor's result can be any of them).
    task_id = await insert(db, business.pk)
    await claim(db)
    done = replace(
        result(task_id),
        result=value,
        error='boom \u2013 "quoted"',
        # Header names come from multidict as istr, a str subclass.
        request={
            "method": "POST",
            "url": "https://api.example.com/hook",
            "headers": {istr("X-Ä"): "v"},
            "body": value,
        },
        response={"status_code": 200, "headers": {"X-Ünï": "v"}, "body": "ok\n\t"},
    )
    await result_sql.finish(db, worker="w1", now=T0, results=[done])
    row = await row_of(db, task_id)
    assert row["result"] == value
    assert row["last_error"] == done.error
    assert row["last_response"] == {**done.response, "duration_ms": 12}
    [attempt] = await attempts_of(db, task_id)
    assert (attempt["request"], attempt["response"], attempt["error"]) == (
        done.request,
        done.response,
        done.error,
    )
    if not db.is_postgres:
        # SQLite keeps the JSON text as written: the driver's path must store what SQLAlchemy's would, byte for
        # byte (ünïcode unescaped, no spaces), since both write these columns.
        async with db.read() as conn:
            stored = (
                await conn.execute(
                    sa.text(
                        "SELECT a.request, a.response, t.result, t.last_response FROM attempts a"
                        " JOIN tasks t ON t.id = a.task_id WHERE t.id = :i"
                    ),
                    {"i": task_id},
                )
            ).one()
        expected = (done.request, done.response, value, {**done.response, "duration_ms": 12})
        assert tuple(stored) == tuple(
            v if isinstance(v, int | float) and not isinstance(v, bool) else json_text(v) for v in expected
        )
    assert attempt["started_at"] == T0


async def test_a_claimed_row_holds_what_sqlalchemys_column_types_read(
    db: Database, business: Business
) -> None:
    # The claim goes to the driver directly and decodes its rows itself: they must equal a plain SQLAlchemy read.
    task_id = await insert(
        db,
        business.pk,
        headers={"X-Custom": "yes"},
        success_codes=[200, 201],
        retry_on=[418],
        payload={"nested": [1, "two", None]},
        follow_redirects=True,
        next_attempt_at=T0 - timedelta(microseconds=250),
    )
    [claimed] = await queue.claim(db, worker="w1", now=T0, limit=10, lease_s=LEASE_S)
    async with db.read() as conn:
        expected = (await conn.execute(sa.select(*queue.CLAIM_COLUMNS).where(tasks.c.id == task_id))).one()
    assert dict(claimed) == dict(expected._mapping)
    assert [type(claimed[k]) for k in ("uuid", "follow_redirects", "next_attempt_at")] == [
        type(expected.uuid),
        bool,
        datetime,
    ]


@pytest.mark.parametrize("types", [(), ("render", "resize")])
@pytest.mark.parametrize("businesses", [(), (1, 2)])
def test_the_sqlite_claim_reads_only_the_due_indexes(
    tmp_path: Any, businesses: tuple[int, ...], types: tuple[str, ...]
) -> None:
    # Without statistics SQLite planned the claim over ix_tasks_status (every pending task, sorted, per claim).
    import asyncio
    import sqlite3

    from sqlalchemy.dialects.sqlite import aiosqlite

    url = f"sqlite:///{tmp_path / 'plan.db'}"
    database = Database(url)
    asyncio.run(database.migrate())
    asyncio.run(database.close())
    sql, names, fixed = queue._sqlite_due_sql(aiosqlite.dialect(), businesses, types)
    values = {**fixed, "b_now": "2030-01-01 00:00:00.000000", "b_limit": 100}
    conn = sqlite3.connect(tmp_path / "plan.db")
    try:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, [values[n] for n in names])]
        next_due = [
            row[3]
            for row in conn.execute("EXPLAIN QUERY PLAN " + queue.next_due_sql(types, sqlite=True), types)
            if row[3].startswith(("SEARCH tasks", "SCAN tasks"))
        ]
        # The lease, the read-back and the finish find their tasks by primary key, whatever the table holds (the
        # finish once walked ix_tasks_status through every task in 'processing', once per result).
        by_id = [
            [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement, params)]
            for statement, params in (
                (queue._SQLITE_LEASE, ("[1]", "w", None, None)),
                (queue._SQLITE_CLAIMED_ROWS, ("[1]",)),
                (result_sql._SQLITE_HELD, ("[[1]]", "w")),
                (result_sql._SQLITE_ATTEMPTS, ("[[1]]", "w")),
                (result_sql._SQLITE_FINISH, ("[[1]]", "w", None)),
            )
        ]
    finally:
        conn.close()
    for steps in by_id:
        assert any("tasks USING INTEGER PRIMARY KEY (rowid=?)" in step for step in steps), steps
        assert not any(step.startswith("SCAN tasks") or " INDEX ix_" in step for step in steps), steps
    reads = [step for step in plan if "INDEX" in step and "PRIMARY KEY" not in step]
    expected = "ix_tasks_due_business" if businesses or types else "ix_tasks_due"
    per_kind = len(businesses) + 1 if businesses or types else 1
    http = [step for step in reads if f"USING INDEX {expected} " in f"{step} "]
    # Each processor type reads its own part of its own index: never the HTTP tasks', never another type's.
    typed = [step for step in reads if "USING INDEX ix_tasks_due_type (type=? AND business_pk" in step]
    assert (len(http), len(typed), len(reads)) == (
        per_kind,
        per_kind * len(types),
        per_kind * (1 + len(types)),
    ), plan
    assert next_due == ["SEARCH tasks USING INDEX ix_tasks_due_time"] + [
        "SEARCH tasks USING INDEX ix_tasks_due_type_time (type=?)"
    ] * len(types), next_due


_DUE_COPIES = """INSERT INTO tasks (uuid, business_pk, business_id, type, status, method, url, host, headers, body,
    content_type, retry, attempts, max_attempts, timeout, priority, follow_redirects, next_attempt_at, created_at,
    updated_at)
SELECT md5('due-' || g)::uuid, business_pk, 'due-' || g, type, 'pending', method, url, host, headers, body,
    content_type, retry, 0, max_attempts, timeout, priority, follow_redirects,
    next_attempt_at - g * interval '1 millisecond', created_at, updated_at
FROM tasks, generate_series(1, 3000) AS g WHERE id = $1"""


def _scans(plan: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Every scan of ``tasks`` in an EXPLAIN (ANALYZE, FORMAT JSON) plan: (node, index, rows it returned)."""
    found = []
    if plan.get("Relation Name") == "tasks" and "Scan" in plan["Node Type"]:
        found.append(
            (plan["Node Type"], plan.get("Index Name", ""), plan["Actual Rows"] * plan["Actual Loops"])
        )
    for child in plan.get("Plans", ()):
        found.extend(_scans(child))
    return found


def _compared(plan: dict[str, Any]) -> int:
    """Rows a plan's joins compared and threw away (``Rows Removed by Join Filter``), all nodes together."""
    removed = int(plan.get("Rows Removed by Join Filter", 0)) * int(plan.get("Actual Loops", 1))
    return removed + sum(_compared(child) for child in plan.get("Plans", ()))


def _node(plan: dict[str, Any], kind: str) -> dict[str, Any]:
    """The first node of type ``kind`` in a plan, depth first."""
    if plan["Node Type"] == kind:
        return plan
    for child in plan.get("Plans", ()):
        with contextlib.suppress(LookupError):
            return _node(child, kind)
    raise LookupError(kind)


@pytest.mark.parametrize("backend", ["postgres"])  # PostgreSQL's planner (SQLite's claim names its indexes)
@pytest.mark.parametrize("businesses", [(), "acme"])
async def test_the_postgres_claim_reads_one_batch_even_with_statistics_from_before_the_backlog(
    db: Database, business: Business, businesses: Any
) -> None:
    # ANALYZE ran when no task was due; then 3,000 fell due. With ix_tasks_due_time usable by the claim, the
    # planner (expecting one due row) read every due task through it and sorted them to take a batch of 100.
    for _ in range(50):
        template = await insert(db, business.pk, status="succeeded")
    async with db.write() as conn:
        await conn.exec_driver_sql("ANALYZE tasks")
    async with db.write() as conn:
        await conn.exec_driver_sql(_DUE_COPIES, (template,))
    keys = (business.pk,) if businesses else ()
    sql, names, fixed = queue._claim_sql(db.write_engine.dialect, keys)
    values = {**fixed, "b_now": T0, "b_limit": 100, "b_worker": "w", "b_until": T0 + timedelta(seconds=60)}
    plan = await _explain_analyze(db, sql, tuple(values[n] for n in names))
    async with db.write() as conn:
        next_due = (
            await conn.execute(
                sa.text("EXPLAIN (FORMAT JSON) SELECT min(next_attempt_at) FROM tasks WHERE " + NEXT_DUE_SQL)
            )
        ).scalar()
    scans = _scans(plan)
    assert scans, plan
    # The claim's UPDATE, under the aggregate that turns its rows into one JSON value.
    assert _node(plan, "ModifyTable")["Actual Rows"] == 100
    due_reads = [s for s in scans if s[1] != "pk_tasks"]
    assert all(rows <= 100 for _, _, rows in due_reads), due_reads  # a batch, not the backlog (3,000)
    assert "ix_tasks_due_time" not in {index for _, index, _ in scans}
    next_plan = json.dumps(json.loads(next_due) if isinstance(next_due, str) else next_due)
    assert "ix_tasks_due_time" in next_plan


def _removed(plan: dict[str, Any]) -> int:
    """Rows a plan's scans read and threw away (``Rows Removed by Filter``), all nodes together."""
    removed = int(plan.get("Rows Removed by Filter", 0)) * int(plan.get("Actual Loops", 1))
    return removed + sum(_removed(child) for child in plan.get("Plans", ()))


async def _explain_analyze(db: Database, sql: str, params: Any) -> dict[str, Any]:
    """PostgreSQL's plan of ``sql`` as it ran (``EXPLAIN ANALYZE``, inside a write transaction), top node."""
    async with db.write() as conn:
        raw = (await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)).scalar()
    return (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("backend", ["postgres"])  # PostgreSQL's planner (SQLite's claim names its indexes)
@pytest.mark.parametrize("types", [(), ("resize",)])
async def test_the_postgres_claim_never_reads_the_due_tasks_of_types_it_does_not_claim(
    db: Database, business: Business, types: tuple[str, ...]
) -> None:
    """3,000 due tasks of processor ``render`` wait for a worker that has it: a claim by a worker without it (HTTP
    only, or another processor) reads none of them, neither returned nor read and filtered out."""
    template = await processor_task(db, business.pk, "render", next_attempt_at=T0 - timedelta(hours=1))
    async with db.write() as conn:
        await conn.exec_driver_sql(_DUE_COPIES, (template,))
    mine = [await insert(db, business.pk, next_attempt_at=T0 - timedelta(minutes=1)) for _ in range(3)]
    mine += [await processor_task(db, business.pk, name, next_attempt_at=T0) for name in types]
    async with db.write() as conn:
        await conn.exec_driver_sql("ANALYZE tasks")
    sql, names, fixed = queue._claim_sql(db.write_engine.dialect, (business.pk,), types)
    values = {**fixed, "b_now": T0, "b_limit": 100, "b_worker": "w", "b_until": T0 + timedelta(seconds=60)}
    plan = await _explain_analyze(db, sql, tuple(values[n] for n in names))
    assert _node(plan, "ModifyTable")["Actual Rows"] == len(mine)
    due_reads = [s for s in _scans(plan) if s[1] != "pk_tasks"]
    assert sum(rows for _, _, rows in due_reads) == len(mine), due_reads
    assert _removed(plan) == 0, plan
    assert (await row_of(db, template))["status"] == "pending"


@pytest.mark.parametrize("backend", ["postgres"])  # PostgreSQL's planner (SQLite's finish names its index)
async def test_the_postgres_finish_never_compares_every_held_task_with_every_result(
    db: Database, business: Business
) -> None:
    # ANALYZE ran when no task was in 'processing'; then 1,500 were claimed and a batch of 500 results is written.
    # A form of the finish that read its batch from one JSON document (which the planner takes for 100 rows) was
    # planned as a nested loop comparing each held task with every result: 0.5-1 s a batch in the delivery
    # benchmark, slower as unwritten results piled up; with its lease and status test wrapped in ``IS TRUE`` (to
    # keep them from being index conditions), 750,000 rows compared here. Neither was kept.
    for _ in range(50):
        template = await insert(db, business.pk, status="succeeded")
    async with db.write() as conn:
        await conn.exec_driver_sql("ANALYZE tasks")
        await conn.exec_driver_sql(_DUE_COPIES, (template,))
    held = await claim(db, limit=1500)
    assert len(held) == 1500
    params = result_sql._postgres_finish_params("w1", T0, [result(i) for i in held[:500]])
    plan = await _explain_analyze(db, result_sql._PG_FINISH, params)
    assert _node(plan, "ModifyTable")["Actual Rows"] == 500
    assert _compared(plan) == 0, plan


async def test_finish_stores_times_and_json_as_sqlalchemy_reads_them(
    db: Database, business: Business
) -> None:
    # The finish writes through the driver: times with and without microseconds must compare and read back
    # exactly, JSON (None included) must read back as written.
    task_id = await insert(db, business.pk)
    await claim(db)
    started = T0 + timedelta(microseconds=7)
    later = T0 + timedelta(seconds=10)
    await result_sql.finish(
        db,
        worker="w1",
        now=T0,
        results=[
            result_sql.Finished(
                task_id=task_id,
                attempt=1,
                status="retrying",
                outcome="server_error",
                started_at=started.astimezone(timezone(timedelta(hours=5))),
                duration_ms=None,
                next_attempt_at=later,
                finished_at=None,
                request={"method": "POST", "headers": {"A": "b"}},
                response=None,
                error="boom",
                result={"k": [1, 2]},
            )
        ],
    )
    row = await row_of(db, task_id)
    assert (row["last_attempt_at"], row["next_attempt_at"], row["finished_at"]) == (started, later, None)
    assert (row["last_response"], row["last_error"], row["result"]) == (None, "boom", {"k": [1, 2]})
    [attempt] = await attempts_of(db, task_id)
    assert (attempt["started_at"], attempt["duration_ms"], attempt["response"]) == (started, None, None)
    assert attempt["request"] == {"method": "POST", "headers": {"A": "b"}}
    assert await claim(db, now=later - timedelta(microseconds=1)) == []
    assert await claim(db, now=later) == [task_id]


@pytest.mark.parametrize(
    "value",
    [
        datetime(2030, 1, 1, 12, 0, tzinfo=UTC),
        datetime(2030, 1, 1, 12, 0, 0, 1, tzinfo=UTC),
        datetime(2030, 6, 30, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-7))),
        datetime(999, 1, 2, 3, 4, 5, 60, tzinfo=UTC),
    ],
)
def test_sqlite_time_is_the_text_sqlalchemy_stores(value: datetime) -> None:
    from sqlalchemy.dialects import sqlite

    from taskcenter.storage.database import sqlite_time

    stored = tasks.c.next_attempt_at.type._cached_bind_processor(sqlite.dialect())  # type: ignore[attr-defined]
    assert sqlite_time(value) == stored(value)


def test_sqlite_time_refuses_a_naive_datetime() -> None:
    from taskcenter.storage.database import sqlite_time

    with pytest.raises(ValueError, match="naive"):
        sqlite_time(datetime(2030, 1, 1))


async def test_finish_with_a_retry_sets_the_next_attempt_time(db: Database, business: Business) -> None:
    task_id = await insert(db, business.pk)
    await claim(db)
    later = T0 + timedelta(seconds=10)
    await result_sql.finish(
        db,
        worker="w1",
        now=T0,
        results=[result(task_id, status="retrying", outcome="server_error", next_at=later)],
    )
    row = await row_of(db, task_id)
    assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("retrying", 1, later)
    assert await claim(db, now=later - timedelta(seconds=1)) == []
    assert await claim(db, now=later) == [task_id]


async def test_finish_by_the_wrong_worker_writes_nothing(db: Database, business: Business) -> None:
    task_id = await insert(db, business.pk)
    await claim(db, "w1")
    written = await result_sql.finish(db, worker="intruder", now=T0, results=[result(task_id)])
    assert written == result_sql.Written(landed=[], lost=[task_id])
    row = await row_of(db, task_id)
    assert (row["status"], row["attempts"], row["lease_owner"]) == ("processing", 0, "w1")
    assert await attempts_of(db, task_id) == []


async def test_finish_of_a_batch_lands_the_held_and_reports_the_lost(
    db: Database, business: Business
) -> None:
    mine = await insert(db, business.pk)
    await claim(db, "w1")
    theirs = await insert(db, business.pk)
    await claim(db, "w2")
    written = await result_sql.finish(db, worker="w1", now=T0, results=[result(mine), result(theirs)])
    assert written == result_sql.Written(landed=[(mine, "succeeded")], lost=[theirs])
    assert (await row_of(db, theirs))["status"] == "processing"


async def test_finish_and_claim_writes_the_results_then_claims_what_is_due(
    db: Database, business: Business
) -> None:
    done, again = await insert(db, business.pk), await insert(db, business.pk)
    assert await claim(db, "w1", limit=2) == [done, again]
    waiting = await insert(db, business.pk)
    theirs = await insert(db, business.pk)
    assert await claim(db, "w2", limit=1) == [waiting]
    results = [
        result(done),
        result(again, status="retrying", outcome="server_error", next_at=T0),  # due again at once
        result(theirs),  # never claimed by w1: lost
    ]
    written, rows = await queue.finish_and_claim(
        db, worker="w1", now=T0, results=results, limit=10, lease_s=LEASE_S
    )
    assert written.landed == [(done, "succeeded"), (again, "retrying")]
    assert written.lost == [theirs]
    # The claim sees the results it follows: the retry due now is claimed back, with its attempt counted.
    assert sorted(r["id"] for r in rows) == sorted([again, theirs])
    assert {r["id"]: r["attempts"] for r in rows}[again] == 1
    assert [a["number"] for a in await attempts_of(db, done)] == [1]
    assert [a["number"] for a in await attempts_of(db, again)] == [1]
    assert await attempts_of(db, theirs) == []
    assert ((await row_of(db, done))["status"], (await row_of(db, again))["lease_owner"]) == (
        "succeeded",
        "w1",
    )
    assert (await row_of(db, waiting))["lease_owner"] == "w2"


async def test_finish_and_claim_is_one_transaction_on_sqlite_and_two_on_postgresql(
    db: Database, business: Business
) -> None:
    """An admission that fails rolls the claim back; on SQLite the results it followed go with it (the dispatcher
    then writes them again), on PostgreSQL they were written by a statement of their own before the claim."""
    held = await insert(db, business.pk)
    await claim(db, "w1")
    due = await insert(db, business.pk)

    async def failing(*_args: Any) -> Any:
        raise RuntimeError("admission broke")

    with pytest.raises(RuntimeError, match="admission broke"):
        await queue.finish_and_claim(
            db, worker="w1", now=T0, results=[result(held)], limit=10, lease_s=LEASE_S, admission=failing
        )
    assert (await row_of(db, due))["lease_owner"] is None
    row = await row_of(db, held)
    if db.is_postgres:
        assert (row["status"], len(await attempts_of(db, held))) == ("succeeded", 1)
    else:
        assert (row["status"], row["lease_owner"], await attempts_of(db, held)) == ("processing", "w1", [])


async def test_finish_on_a_task_cancelled_in_flight_records_the_attempt_and_keeps_it_cancelled(
    db: Database, service: TaskService, business: Business
) -> None:
    task_id = await insert(db, business.pk)
    await claim(db)
    cancelled = await service.cancel(business, task_id)
    assert cancelled.status == "cancelled"
    written = await result_sql.finish(
        db,
        worker="w1",
        now=T0,
        results=[
            result(task_id, status="retrying", outcome="server_error", next_at=T0 + timedelta(seconds=5))
        ],
    )
    assert written.landed == [(task_id, "cancelled")]
    row = await row_of(db, task_id)
    assert (row["status"], row["attempts"], row["outcome"]) == ("cancelled", 1, "server_error")
    assert row["lease_owner"] is None
    [attempt] = await attempts_of(db, task_id)
    assert attempt["outcome"] == "server_error"
    assert await claim(db, now=T0 + timedelta(hours=1)) == []


# -- release ----------------------------------------------------------------------------------------------


async def test_release_puts_an_unsent_task_back_to_pending_without_charging_an_attempt(
    db: Database, business: Business
) -> None:
    task_id = await insert(db, business.pk)
    await claim(db)
    again = T0 + timedelta(seconds=30)
    await leases.release(db, worker="w1", now=T0, deferrals=[(task_id, again)])
    row = await row_of(db, task_id)
    assert (row["status"], row["attempts"], row["next_attempt_at"]) == ("pending", 0, again)
    assert row["lease_owner"] is None
    assert await attempts_of(db, task_id) == []


async def test_release_of_a_claim_leaves_the_same_worker_s_later_claim_of_the_task_alone(
    db: Database, business: Business
) -> None:
    """A give-back that runs after its lease lapsed: the rescue recorded attempt 1 interrupted and the same worker
    claimed the task again (attempt 2 in flight). Giving back the first claim must not release the second, which
    another worker would then send again (attempt 2 twice, seen in tests/test_chaos.py)."""
    task_id = await insert(db, business.pk)
    await claim(db)
    later = T0 + timedelta(seconds=LEASE_S + 1)
    assert await leases.rescue(db, now=later) == [task_id]
    due = later + timedelta(days=2)  # past any retry delay
    assert await claim(db, now=due) == [task_id]
    await leases.release(db, worker="w1", now=due, deferrals=[(task_id, due)], claimed={task_id: 0})
    row = await row_of(db, task_id)
    assert (row["status"], row["attempts"], row["lease_owner"]) == ("processing", 1, "w1")
    await leases.release(db, worker="w1", now=due, deferrals=[(task_id, due)], claimed={task_id: 1})
    assert (await row_of(db, task_id))["status"] == "retrying"


async def test_release_of_a_task_already_tried_puts_it_back_to_retrying(
    db: Database, business: Business
) -> None:
    task_id = await insert(db, business.pk, status="retrying", attempts=1)
    await claim(db)
    await leases.release(db, worker="w1", now=T0, deferrals=[(task_id, T0)])
    row = await row_of(db, task_id)
    assert (row["status"], row["attempts"]) == ("retrying", 1)


async def test_release_by_another_worker_changes_nothing(db: Database, business: Business) -> None:
    task_id = await insert(db, business.pk)
    await claim(db, "w1")
    await leases.release(db, worker="w2", now=T0, deferrals=[(task_id, T0)])
    row = await row_of(db, task_id)
    assert (row["status"], row["lease_owner"]) == ("processing", "w1")


async def test_release_of_a_task_cancelled_while_held_only_drops_the_lease(
    db: Database, service: TaskService, business: Business
) -> None:
    task_id = await insert(db, business.pk)
    await claim(db)
    await service.cancel(business, task_id)
    await leases.release(db, worker="w1", now=T0, deferrals=[(task_id, T0)])
    row = await row_of(db, task_id)
    assert (row["status"], row["lease_owner"]) == ("cancelled", None)


async def test_held_cancelled_names_a_worker_s_leased_tasks_that_were_cancelled(
    db: Database, service: TaskService, business: Business
) -> None:
    mine = [await insert(db, business.pk) for _ in range(3)]
    assert sorted(await claim(db, "w1", limit=3)) == sorted(mine)
    theirs = await insert(db, business.pk)
    await claim(db, "w2")
    for task_id in (mine[0], mine[1], theirs):
        await service.cancel(business, task_id)
    assert sorted(await leases.held_cancelled(db, worker="w1")) == sorted(mine[:2])
    await leases.release(db, worker="w1", now=T0, deferrals=[(mine[0], T0)])
    assert await leases.held_cancelled(db, worker="w1") == [mine[1]]
    # SQLite's write of results reads them in its own transaction (PostgreSQL's workers hear by NOTIFY instead).
    written = await result_sql.finish(db, worker="w1", now=T0, results=[result(mine[2])])
    assert written.cancelled == ([mine[1]] if not db.is_postgres else [])


# -- leases and rescue ------------------------------------------------------------------------------------


async def test_extend_leases_moves_only_the_workers_own_leases(db: Database, business: Business) -> None:
    mine = await insert(db, business.pk)
    await claim(db, "w1")
    theirs = await insert(db, business.pk)
    await claim(db, "w2")
    until = T0 + timedelta(minutes=10)
    assert await leases.extend_leases(db, worker="w1", ids=[mine, theirs], until=until) == 1
    assert (await row_of(db, mine))["lease_expires_at"] == until
    assert (await row_of(db, theirs))["lease_expires_at"] == T0 + timedelta(seconds=LEASE_S)


# SQLite has one writer: a heartbeat and a write never overlap there.
@pytest.mark.parametrize("backend", ["postgres"])
async def test_the_heartbeat_skips_rows_a_write_holds_instead_of_deadlocking_with_it(
    db: Database, business: Business
) -> None:
    # The write loop's finish locks a batch of held rows; the heartbeat runs meanwhile over every held row. Had it
    # waited for the finish's rows while holding others the finish wants next, the two would deadlock (seen in the
    # delivery benchmark: one failed after PostgreSQL's 1 s deadlock_timeout).
    first, second, third = [await insert(db, business.pk) for _ in range(3)]
    assert sorted(await claim(db, "w1")) == [first, second, third]
    until = T0 + timedelta(minutes=10)
    async with db.write() as writer:  # a finish under way: it holds the first and the third
        await writer.exec_driver_sql(
            "UPDATE tasks SET updated_at = updated_at WHERE id = ANY($1::bigint[])", ([first, third],)
        )
        extended = await asyncio.wait_for(
            leases.extend_leases(db, worker="w1", ids=[third, second, first], until=until), timeout=5
        )
    assert extended == 1
    assert (await row_of(db, second))["lease_expires_at"] == until
    assert (await row_of(db, first))["lease_expires_at"] == T0 + timedelta(seconds=LEASE_S)


async def test_rescue_of_an_expired_lease_records_an_interrupted_attempt_and_sets_retrying(
    db: Database, business: Business
) -> None:
    task_id = await insert(db, business.pk)
    await claim(db, "lost-worker")
    later = T0 + timedelta(seconds=LEASE_S + 1)
    assert await leases.rescue(db, now=later) == [task_id]
    row = await row_of(db, task_id)
    assert (row["status"], row["attempts"], row["outcome"]) == ("retrying", 1, "interrupted")
    assert row["lease_owner"] is None
    assert row["next_attempt_at"] == later
    [attempt] = await attempts_of(db, task_id)
    assert (attempt["number"], attempt["outcome"], attempt["worker"]) == (1, "interrupted", "lost-worker")
    assert await claim(db, "w2", now=later) == [task_id]


async def test_rescue_leaves_live_leases_alone(db: Database, business: Business) -> None:
    task_id = await insert(db, business.pk)
    await claim(db)
    assert await leases.rescue(db, now=T0 + timedelta(seconds=LEASE_S - 1)) == []
    assert (await row_of(db, task_id))["status"] == "processing"


async def test_rescue_of_the_last_attempt_fails_the_task(db: Database, business: Business) -> None:
    """An interrupted attempt counts; with the budget spent there is no further try."""
    task_id = await insert(db, business.pk, status="retrying", attempts=2, max_attempts=3)
    await claim(db)
    later = T0 + timedelta(seconds=LEASE_S + 1)
    assert await leases.rescue(db, now=later) == [task_id]
    row = await row_of(db, task_id)
    assert (row["status"], row["attempts"], row["outcome"]) == ("failed", 3, "interrupted")
    assert row["finished_at"] == later
    assert await claim(db, now=later + timedelta(days=1)) == []


async def test_rescue_of_a_task_cancelled_in_flight_keeps_it_cancelled(
    db: Database, service: TaskService, business: Business
) -> None:
    task_id = await insert(db, business.pk)
    await claim(db)
    await service.cancel(business, task_id)
    assert await leases.rescue(db, now=T0 + timedelta(seconds=LEASE_S + 1)) == [task_id]
    row = await row_of(db, task_id)
    assert (row["status"], row["lease_owner"]) == ("cancelled", None)
    assert [a["outcome"] for a in await attempts_of(db, task_id)] == ["interrupted"]


async def test_a_late_finish_after_rescue_is_lost(db: Database, business: Business) -> None:
    task_id = await insert(db, business.pk)
    await claim(db, "slow")
    await leases.rescue(db, now=T0 + timedelta(seconds=LEASE_S + 1))
    written = await result_sql.finish(db, worker="slow", now=T0, results=[result(task_id)])
    assert written.lost == [task_id]
    assert (await row_of(db, task_id))["status"] == "retrying"


async def test_a_stale_result_written_with_the_new_claims_one_is_not_recorded(
    db: Database, business: Business
) -> None:
    """A worker stalled past its lease (its attempt 1 rescued as interrupted) claims the task again and writes the
    stale attempt's result in one batch with the new attempt's: only attempt 2 lands. (PostgreSQL recorded the
    stale one as well, a second attempt 1 — seen in tests/test_chaos.py after a SIGSTOP.)"""
    task_id = await insert(db, business.pk)
    await claim(db, "stalled")
    later = T0 + timedelta(seconds=LEASE_S + 1)
    assert await leases.rescue(db, now=later) == [task_id]
    assert await claim(db, "stalled", now=later) == [task_id]
    stale = result(task_id, attempt=1, status="failed", outcome="client_error")
    written = await result_sql.finish(
        db, worker="stalled", now=later, results=[stale, result(task_id, attempt=2)]
    )
    assert written.landed == [(task_id, "succeeded")]
    row = await row_of(db, task_id)
    assert (row["status"], row["attempts"], row["outcome"]) == ("succeeded", 2, "success")
    assert [(a["number"], a["outcome"]) for a in await attempts_of(db, task_id)] == [
        (1, "interrupted"),
        (2, "success"),
    ]


# -- live business_id uniqueness --------------------------------------------------------------------------


async def test_a_live_business_id_cannot_be_inserted_twice(db: Database, business: Business) -> None:
    first = await insert(db, business.pk, "order-1")
    uuid = str((await row_of(db, first))["uuid"])
    with pytest.raises(DuplicateTask) as caught:
        await insert(db, business.pk, "order-1")
    assert caught.value.existing_id == uuid


@pytest.mark.parametrize("live", ["pending", "processing", "retrying"])
async def test_every_live_state_holds_the_business_id(db: Database, business: Business, live: str) -> None:
    await insert(db, business.pk, "order-1", status=live)
    with pytest.raises(DuplicateTask):
        await insert(db, business.pk, "order-1")


@pytest.mark.parametrize("final", ["succeeded", "failed", "cancelled"])
async def test_a_business_id_is_free_again_once_its_task_finished(
    db: Database, business: Business, final: str
) -> None:
    first = await insert(db, business.pk, "order-1")
    async with db.write() as conn:
        assert await task_sql.change(conn, first, expected=["pending"], values={"status": final})
    second = await insert(db, business.pk, "order-1")
    assert second != first
    async with db.read() as conn:
        newest = await task_sql.get_by_business_id(conn, business.pk, "order-1")
    assert newest is not None and newest["id"] == second


async def test_the_same_business_id_may_live_in_two_businesses(db: Database, service: TaskService) -> None:
    one = await service.ensure_business("one")
    two = await service.ensure_business("two")
    await insert(db, one.pk, "order-1")
    await insert(db, two.pk, "order-1")


async def test_a_duplicate_inside_a_transaction_leaves_it_usable(db: Database, business: Business) -> None:
    """The outbox case: the caller's transaction survives a duplicate and commits its other work."""
    await insert(db, business.pk, "order-1")
    async with db.write() as conn:
        with pytest.raises(DuplicateTask):
            await conn.run_sync(task_sql.insert_row, task_row(business.pk, "order-1"))
        other = await conn.run_sync(task_sql.insert_row, task_row(business.pk, "order-2"))
    assert (await row_of(db, other))["business_id"] == "order-2"


async def test_a_rolled_back_insert_leaves_no_task(db: Database, business: Business) -> None:
    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with db.write() as conn:
            await conn.run_sync(task_sql.insert_row, task_row(business.pk, "order-1"))
            raise Abort
    await insert(db, business.pk, "order-1")


async def test_batch_insert_skips_live_duplicates_and_stores_the_rest(
    db: Database, service: TaskService, business: Business
) -> None:
    await insert(db, business.pk, "order-1")
    results = await service.create_tasks(
        business,
        [
            {"business_id": "order-1", "url": "https://api.example.com/a"},
            {"business_id": "order-2", "url": "https://api.example.com/b"},
        ],
    )
    assert [r["status"] for r in results] == [409, 201]
    async with db.read() as conn:
        assert await task_sql.count_live(conn, business.pk) == 2


# -- compare-and-set --------------------------------------------------------------------------------------


async def test_change_applies_when_the_status_is_as_expected(db: Database, business: Business) -> None:
    task_id = await insert(db, business.pk)
    async with db.write() as conn:
        assert await task_sql.change(conn, task_id, expected=["pending", "retrying"], values={"priority": 7})
    assert (await row_of(db, task_id))["priority"] == 7


async def test_change_refuses_when_the_status_changed(db: Database, business: Business) -> None:
    task_id = await insert(db, business.pk, priority=1)
    await claim(db)
    async with db.write() as conn:
        applied = await task_sql.change(
            conn, task_id, expected=["pending", "retrying"], values={"priority": 7, "status": "cancelled"}
        )
    assert applied is False
    row = await row_of(db, task_id)
    assert (row["status"], row["priority"]) == ("processing", 1)


async def test_service_update_of_a_task_being_sent_is_a_conflict(
    db: Database, service: TaskService, business: Business
) -> None:
    task_id = await insert(db, business.pk)
    await claim(db)
    with pytest.raises(InvalidTransition):
        await service.update_task(business, task_id, {"priority": 3})


# -- listing ----------------------------------------------------------------------------------------------


async def _pages(
    service: TaskService, business: Business, cursor: str | None, limit: int
) -> tuple[list[int], str | None]:
    page, nxt = await service.list_tasks(business, cursor=cursor, limit=limit)
    return [t.row_id for t in page], nxt


async def test_list_cursor_pagination_is_stable_when_tasks_are_inserted_between_pages(
    db: Database, service: TaskService, business: Business
) -> None:
    original = [await insert(db, business.pk) for _ in range(7)]
    first, cursor = await _pages(service, business, None, 3)
    assert first == original[::-1][:3]
    for _ in range(4):
        await insert(db, business.pk)  # newer tasks land before page one, never inside later pages
    seen = list(first)
    while cursor is not None:
        page, cursor = await _pages(service, business, cursor, 3)
        seen += page
    assert seen == original[::-1]


async def test_list_filters_by_status_host_and_business_id(db: Database, business: Business) -> None:
    a = await insert(db, business.pk, "a", host="a.example:443")
    b = await insert(db, business.pk, "b", host="b.example:443", status="failed")
    async with db.read() as conn:
        assert [r["id"] for r in await task_sql.list_tasks(conn, status=["failed"])] == [b]
        assert [r["id"] for r in await task_sql.list_tasks(conn, host="a.example:443")] == [a]
        assert [r["id"] for r in await task_sql.list_tasks(conn, business_id="b")] == [b]
        assert [r["id"] for r in await task_sql.list_tasks(conn, business_pk=business.pk)] == [b, a]


async def test_list_filters_by_creation_time(db: Database, business: Business) -> None:
    old = await insert(db, business.pk, created_at=T0 - timedelta(days=2))
    new = await insert(db, business.pk, created_at=T0)
    async with db.read() as conn:
        after = await task_sql.list_tasks(conn, created_after=T0 - timedelta(days=1))
        before = await task_sql.list_tasks(conn, created_before=T0 - timedelta(days=1))
    assert [r["id"] for r in after] == [new]
    assert [r["id"] for r in before] == [old]


async def test_attempts_are_listed_oldest_first(db: Database, business: Business) -> None:
    task_id = await insert(db, business.pk)
    for number in (1, 2):
        await claim(db, now=T0 + timedelta(minutes=number))
        await result_sql.finish(
            db,
            worker="w1",
            now=T0,
            results=[result(task_id, attempt=number, status="retrying", outcome="timeout", next_at=T0)],
        )
    assert [a["number"] for a in await attempts_of(db, task_id)] == [1, 2]


# -- next_due ---------------------------------------------------------------------------------------------


async def test_next_due_is_none_without_waiting_tasks(db: Database, business: Business) -> None:
    assert await queue.next_due(db) is None
    await insert(db, business.pk, status="succeeded", next_attempt_at=T0 - timedelta(days=1))
    assert await queue.next_due(db) is None


async def test_next_due_is_the_earliest_waiting_task(db: Database, business: Business) -> None:
    await insert(db, business.pk, next_attempt_at=T0 + timedelta(hours=2))
    await insert(db, business.pk, status="retrying", attempts=1, next_attempt_at=T0 + timedelta(hours=1))
    await insert(db, business.pk, status="failed", next_attempt_at=T0 - timedelta(hours=5))
    due = await queue.next_due(db)
    assert due == T0 + timedelta(hours=1)
    assert due is not None and due.utcoffset() == timedelta(0)


async def test_next_due_ignores_claimed_tasks(db: Database, business: Business) -> None:
    await insert(db, business.pk, next_attempt_at=T0 - timedelta(minutes=1))
    later = await insert(db, business.pk, next_attempt_at=T0 + timedelta(minutes=1))
    await claim(db)
    assert await queue.next_due(db) == (await row_of(db, later))["next_attempt_at"]


async def test_next_due_counts_only_the_tasks_the_worker_would_claim(
    db: Database, business: Business
) -> None:
    """A task of a type the worker has no processor for neither wakes it nor keeps it awake: it would not claim
    it, and an overdue one would otherwise make every sleep until the next due task zero seconds long."""
    overdue = T0 - timedelta(hours=1)
    await processor_task(db, business.pk, "resize", next_attempt_at=overdue)
    assert await queue.next_due(db) is None
    assert await queue.next_due(db, ["render"]) is None
    assert await queue.next_due(db, ["render", "resize"]) == overdue
    await insert(db, business.pk, next_attempt_at=T0 + timedelta(minutes=1))
    await processor_task(db, business.pk, "render", next_attempt_at=T0 + timedelta(minutes=2))
    assert await queue.next_due(db) == T0 + timedelta(minutes=1)
    assert await queue.next_due(db, ["render"]) == T0 + timedelta(minutes=1)
    assert await queue.next_due(db, ["resize"]) == overdue


async def _count(db: Database, table: sa.Table) -> int:
    async with db.read() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(table))).scalar_one())


async def test_attempt_rows_go_with_their_task(db: Database, business: Business) -> None:
    """attempts.task_id cascades: deleting a task (retention purge) deletes its attempts."""
    task_id = await insert(db, business.pk)
    await claim(db)
    await result_sql.finish(db, worker="w1", now=T0, results=[result(task_id)])
    async with db.write() as conn:
        await conn.execute(sa.delete(tasks).where(tasks.c.id == task_id))
    assert await _count(db, attempts) == 0
