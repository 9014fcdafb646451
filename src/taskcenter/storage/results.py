"""The write of a batch of attempt results — attempts inserted, tasks moved, leases dropped — in one statement on
PostgreSQL, in one hop to the driver's thread on SQLite (where ``queue.finish_and_claim`` adds the next claim)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.storage.database import Database, json_text, sqlite_batch, sqlite_time
from taskcenter.storage.leases import SQLITE_CANCELLED_HELD

if TYPE_CHECKING:
    from taskcenter.storage.traffic import TrafficControl


@dataclass(frozen=True, slots=True)
class Finished:
    """The outcome of one attempt, ready to be written."""

    task_id: int
    attempt: int
    status: str
    outcome: str
    started_at: datetime
    duration_ms: int | None
    next_attempt_at: datetime | None
    finished_at: datetime | None
    request: dict[str, Any] | None
    response: dict[str, Any] | None
    error: str | None
    result: Any = None
    host: str | None = None
    pause_until: float | None = None
    """Epoch seconds until which the receiver asked the whole host to wait (``Retry-After``)."""


@dataclass(frozen=True, slots=True)
class Written:
    """What a batch write did: tasks whose write landed (with their final status) and tasks no longer held."""

    landed: list[tuple[int, str]]
    lost: list[int]
    circuits: dict[str, str] = field(default_factory=dict)
    """Hosts whose circuit changed state with this batch's outcomes, and the new state."""
    outcomes: dict[str, list[str]] = field(default_factory=dict)
    """The landed results' outcomes per host (gathered when ``finish`` was given the breakers)."""
    cancelled: list[int] = field(default_factory=list)
    """SQLite: the tasks the worker still holds that were cancelled, read in the same transaction (a cancel from
    another process has no other way there); PostgreSQL tells workers by NOTIFY instead."""


# The result of an attempt, written to the driver directly (see ``queue._claim_sql`` for why). A task cancelled while its
# attempt was in flight keeps status cancelled (and its finish time, due time and result); the attempt is still
# recorded. Only the holder of the lease writes (compare-and-set on lease_owner and status), and only the result of
# the attempt it claimed (attempts = number - 1): a worker whose lease expired (a stall, a lost database connection)
# may claim the rescued task again, and the result of its cut-off attempt must not land on that new claim.
#
# SQLite: the batch travels as one JSON array of per-result arrays (``_sqlite_batch_row``) and each statement
# reads all of it with json_each — one statement step per statement, where an executemany stepped (and handed the
# GIL to the driver's thread and back) once per row. The JSON-valued fields travel as JSON text inside it, so
# they are stored exactly as SQLAlchemy stores them. ``NOT INDEXED`` leaves the planner only the primary key:
# without it, it walked ix_tasks_status through every task in 'processing' once per result (200 ms a batch).
_SQLITE_RESULTS = """r AS (
    SELECT json_extract(value, '$[0]') AS r_id, json_extract(value, '$[1]') AS r_attempt,
        json_extract(value, '$[2]') AS r_status, json_extract(value, '$[3]') AS r_outcome,
        json_extract(value, '$[4]') AS r_started, json_extract(value, '$[5]') AS r_duration,
        json_extract(value, '$[6]') AS r_next_at, json_extract(value, '$[7]') AS r_finished,
        json_extract(value, '$[8]') AS r_request, json_extract(value, '$[9]') AS r_response,
        json_extract(value, '$[10]') AS r_last_response, json_extract(value, '$[11]') AS r_error,
        json_extract(value, '$[12]') AS r_result
    FROM json_each(?1)
)"""
_SQLITE_HELD = """SELECT json_group_array(json_array(tasks.id, tasks.status, json_extract(r.value, '$[2]')))
FROM json_each(?1) AS r JOIN tasks NOT INDEXED ON tasks.id = json_extract(r.value, '$[0]')
WHERE tasks.lease_owner = ?2 AND tasks.status IN ('processing', 'cancelled')
    AND tasks.attempts = json_extract(r.value, '$[1]') - 1"""
_SQLITE_ATTEMPTS = f"""WITH {_SQLITE_RESULTS}
INSERT INTO attempts (task_id, number, started_at, duration_ms, request, response, outcome, error, worker)
SELECT r_id, r_attempt, r_started, r_duration, r_request, r_response, r_outcome, r_error, ?2
FROM r JOIN tasks NOT INDEXED ON tasks.id = r_id
WHERE tasks.lease_owner = ?2 AND tasks.status IN ('processing', 'cancelled') AND tasks.attempts = r_attempt - 1"""
_SQLITE_FINISH = f"""WITH {_SQLITE_RESULTS}
UPDATE tasks NOT INDEXED SET
    status = CASE WHEN status = 'processing' THEN r_status ELSE status END,
    attempts = r_attempt,
    outcome = r_outcome,
    next_attempt_at = CASE WHEN status = 'processing' THEN coalesce(r_next_at, next_attempt_at)
        ELSE next_attempt_at END,
    last_attempt_at = r_started,
    finished_at = CASE WHEN status = 'processing' THEN r_finished ELSE finished_at END,
    last_response = r_last_response,
    last_error = r_error,
    result = CASE WHEN status = 'processing' THEN r_result ELSE result END,
    lease_owner = NULL,
    lease_expires_at = NULL,
    updated_at = ?3
FROM r
WHERE tasks.id = r_id AND tasks.lease_owner = ?2 AND tasks.status IN ('processing', 'cancelled')
    AND tasks.attempts = r_attempt - 1"""

# PostgreSQL: the whole batch in one statement of one array per field — tasks moved, attempts inserted for the
# tasks moved, (id, status as written) returned — so one round trip and one executor start per batch, not two
# per result. JSON travels as text[] cast by the server (the driver's jsonb codec is a Python call per value).
# An attempt is inserted only for the result that moved its task (same id and attempt number): a batch may hold
# two results of one task — a stale attempt cut off by a rescue, and the attempt of the same worker's claim of
# it since (a stall past its lease) — and the stale one must not be recorded beside the interrupted one.
_PG_FINISH = """WITH r (id, attempt, status, outcome, started, duration, next_at, finished, request, response,
        last_response, error, result) AS (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::timestamptz[], $6::int[],
        $7::timestamptz[], $8::timestamptz[], $9::text[]::jsonb[], $10::text[]::jsonb[], $11::text[]::jsonb[],
        $12::text[], $13::text[]::jsonb[])
), done AS (
    UPDATE tasks AS t SET
        status = CASE WHEN t.status = 'processing' THEN r.status ELSE t.status END,
        attempts = r.attempt,
        outcome = r.outcome,
        next_attempt_at = CASE WHEN t.status = 'processing' THEN coalesce(r.next_at, t.next_attempt_at)
            ELSE t.next_attempt_at END,
        last_attempt_at = r.started,
        finished_at = CASE WHEN t.status = 'processing' THEN r.finished ELSE t.finished_at END,
        last_response = r.last_response,
        last_error = r.error,
        result = CASE WHEN t.status = 'processing' THEN r.result ELSE t.result END,
        lease_owner = NULL,
        lease_expires_at = NULL,
        updated_at = $15
    FROM r
    WHERE t.id = r.id AND t.lease_owner = $14 AND t.status IN ('processing', 'cancelled')
        AND t.attempts = r.attempt - 1
    RETURNING t.id, t.status, t.attempts
), logged AS (
    INSERT INTO attempts (task_id, number, started_at, duration_ms, request, response, outcome, error, worker)
    SELECT r.id, r.attempt, r.started, r.duration, r.request, r.response, r.outcome, r.error, $14
    FROM r JOIN done ON done.id = r.id AND done.attempts = r.attempt
)
SELECT id, status FROM done"""


def _last_response(r: Finished) -> dict[str, Any] | None:
    return {**r.response, "duration_ms": r.duration_ms} if r.response is not None else None


async def _finish_postgres(
    conn: AsyncConnection, worker: str, now: datetime, results: Sequence[Finished]
) -> Any:
    return (await conn.exec_driver_sql(_PG_FINISH, _postgres_finish_params(worker, now, results))).all()


def _postgres_finish_params(worker: str, now: datetime, results: Sequence[Finished]) -> tuple[Any, ...]:
    """``_PG_FINISH``'s parameters for a batch: one array per field, then the worker and the time."""
    return (
        [r.task_id for r in results],
        [r.attempt for r in results],
        [r.status for r in results],
        [r.outcome for r in results],
        [r.started_at for r in results],
        [r.duration_ms for r in results],
        [r.next_attempt_at for r in results],
        [r.finished_at for r in results],
        [json_text(r.request) for r in results],
        [json_text(r.response) for r in results],
        [json_text(_last_response(r)) for r in results],
        [r.error for r in results],
        [json_text(r.result) for r in results],
        worker,
        now,
    )


def _sqlite_batch_row(r: Finished) -> list[Any]:
    """One result as a row of the batch's JSON (the order ``_SQLITE_RESULTS`` reads)."""
    started = sqlite_time(r.started_at)
    return [
        r.task_id,
        r.attempt,
        r.status,
        r.outcome,
        started,
        r.duration_ms,
        sqlite_time(r.next_attempt_at),
        sqlite_time(r.finished_at),
        json_text(r.request),
        json_text(r.response),
        json_text(_last_response(r)),
        r.error,
        json_text(r.result),
    ]


def sqlite_write(
    batch: bytes, worker: str, updated_at: str | None, commit: bool
) -> Callable[[sqlite3.Connection], tuple[list[list[Any]], str]]:
    """The batch's statements for one hop to the driver's thread; then which of the tasks the worker still holds
    were cancelled (one step into a nearly empty index)."""

    def work(connection: sqlite3.Connection) -> tuple[list[list[Any]], str]:
        (held,) = connection.execute(_SQLITE_HELD, (batch, worker)).fetchone()
        landed: list[list[Any]] = orjson.loads(held)
        if landed:
            connection.execute(_SQLITE_ATTEMPTS, (batch, worker))
            connection.execute(_SQLITE_FINISH, (batch, worker, updated_at))
        (cancelled,) = connection.execute(SQLITE_CANCELLED_HELD, (worker,)).fetchone()
        if commit:
            connection.commit()
        return landed, cancelled

    return work


def as_written(held: list[list[Any]]) -> list[tuple[int, str]]:
    """The results that landed, ``(task id, status as written)``, from ``_SQLITE_HELD``'s (id, status before,
    result's status)."""
    # As written: a cancelled task stays cancelled, any other moves to the result's status.
    return [(i, was if was == "cancelled" else status) for i, was, status in held]


async def finish(
    db: Database,
    *,
    worker: str,
    now: datetime,
    results: Sequence[Finished],
    breakers: TrafficControl | None = None,
) -> Written:
    """Write a batch of attempt results atomically: attempts inserted, tasks moved, leases dropped.

    Only results whose task this worker still holds land; the others come back as ``lost``. The host breakers
    (``breakers``) get the landed outcomes when they ask for them (``needs_record``): in the same transaction on
    SQLite, right after in one of its own on PostgreSQL (where the results are one statement, sent without a
    transaction around it). The circuits that changed come back in ``Written.circuits``.
    """
    if not results:
        return Written([], [])
    circuits: dict[str, str] = {}
    outcomes: dict[str, list[str]] = {}
    if db.is_postgres:
        # One statement, so no transaction around it: BEGIN and COMMIT would be two more round trips per batch.
        # The breakers' bookkeeping, when there is any, follows in a transaction of its own (a crash between the
        # two loses a batch's worth of breaker evidence, never a task's state).
        async with db.autocommit() as conn:
            landed = [(int(i), status) for i, status in await _finish_postgres(conn, worker, now, results)]
        if breakers is not None and landed:
            outcomes, pauses = _evidence(results, landed)
            if breakers.needs_record(outcomes, pauses):
                async with db.write() as conn:
                    circuits = await breakers.record(conn, outcomes, pauses, now)
    else:
        batch, every, record = prepare_sqlite(results, breakers)
        async with db.write(begin=False) as conn:
            # One hop: BEGIN IMMEDIATE, the batch's three statements and (unless the breakers record) the COMMIT.
            write = sqlite_write(batch, worker, sqlite_time(now), commit=not record)
            held, cancelled = await sqlite_batch(conn, write, begin=True)
            landed = as_written(held)
            circuits, outcomes = await sqlite_breakers(conn, breakers, results, landed, every, record, now)
        return to_written(results, landed, circuits, outcomes, cancelled)
    return to_written(results, landed, circuits, outcomes)


_Evidence = tuple[dict[str, list[str]], dict[str, float]]


def prepare_sqlite(
    results: Sequence[Finished], breakers: TrafficControl | None
) -> tuple[bytes, _Evidence, bool]:
    """What SQLite's write of ``results`` needs before it takes the one writer: the batch as JSON (~3 ms for 400
    results, which the claims would otherwise wait for), every result's evidence, and whether the breakers need a
    record of it. Asked of every result: the landed ones are a subset and need a record only if these do; without
    one, the write commits in the same hop that began it."""
    every = _evidence(results, None) if breakers is not None else ({}, {})
    record = breakers is not None and breakers.needs_record(*every)
    return orjson.dumps([_sqlite_batch_row(r) for r in results]), every, record


async def sqlite_breakers(
    conn: AsyncConnection,
    breakers: TrafficControl | None,
    results: Sequence[Finished],
    landed: list[tuple[int, str]],
    every: _Evidence,
    record: bool,
    now: datetime,
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The circuits that changed (recorded in ``conn``'s transaction, when ``record``) and the landed outcomes."""
    if breakers is None or not landed:
        return {}, {}
    # Usually every result landed: then its evidence is the one already gathered.
    outcomes, pauses = every if len(landed) == len(results) else _evidence(results, landed)
    if record and breakers.needs_record(outcomes, pauses):
        return await breakers.record(conn, outcomes, pauses, now), outcomes
    return {}, outcomes


def to_written(
    results: Sequence[Finished],
    landed: list[tuple[int, str]],
    circuits: dict[str, str],
    outcomes: dict[str, list[str]],
    cancelled: str = "[]",
) -> Written:
    ids = {i for i, _ in landed}
    order = {r.task_id: n for n, r in enumerate(results)}
    landed.sort(key=lambda pair: order[pair[0]])
    lost = [r.task_id for r in results if r.task_id not in ids]
    return Written(landed, lost, circuits, outcomes, orjson.loads(cancelled) if cancelled != "[]" else [])


def _evidence(results: Sequence[Finished], landed: Sequence[tuple[int, str]] | None) -> _Evidence:
    """The landed results' outcomes and pauses per host, for the breakers (``landed=None``: every result's)."""
    ids = {i for i, _ in landed} if landed is not None else None
    outcomes: dict[str, list[str]] = {}
    pauses: dict[str, float] = {}
    for r in results:
        if r.host is not None and (ids is None or r.task_id in ids):
            outcomes.setdefault(r.host, []).append(r.outcome)
            if r.pause_until:
                pauses[r.host] = max(pauses.get(r.host, 0.0), r.pause_until)
    return outcomes, pauses
