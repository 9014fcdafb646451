"""SQLite's WAL checkpoints (taken off the writer's commits, done by a connection of their own) and its write lock
(taken up front by BEGIN IMMEDIATE, waited for every 1-2 ms when another process holds it)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from taskcenter.errors import ConfigError
from taskcenter.storage import database
from taskcenter.storage.database import (
    CHECKPOINT_SQL,
    SQLITE_WRITER_AUTOCHECKPOINT,
    SQLITE_WRITER_BUSY_MS,
    Database,
)


def _checkpoint(path: Path) -> tuple[int, int, int]:
    conn = sqlite3.connect(path)
    try:
        busy, frames, copied = conn.execute(CHECKPOINT_SQL).fetchone()
    finally:
        conn.close()
    return busy, frames, copied


def _wal_frames(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return wal.stat().st_size if wal.exists() else 0


async def _write_rows(db: Database, rows: int) -> None:
    async with db.write() as conn:
        await conn.execute(sa.text("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)"))
        await conn.execute(sa.text("INSERT INTO t (v) VALUES (:v)"), [{"v": "x" * 500}] * rows)


async def test_the_writer_leaves_checkpoints_to_the_checkpointer(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        async with db.write() as conn:
            value = (await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar()
        async with db.read() as conn:
            read_value = (await conn.exec_driver_sql("PRAGMA wal_autocheckpoint")).scalar()
    finally:
        await db.close()
    assert value == SQLITE_WRITER_AUTOCHECKPOINT
    assert read_value == 1000  # readers never commit, so they never checkpoint by themselves anyway


async def test_a_passive_checkpoint_copies_every_frame_the_writer_left(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = Database(f"sqlite:///{path}")
    try:
        await _write_rows(db, 2000)  # ~1 MB of WAL, below the writer's own threshold: it stays in the WAL
        busy, frames, copied = _checkpoint(path)
    finally:
        await db.close()
    assert busy == 0
    assert frames > 100
    assert copied == frames


async def _checkpoints_after(db: Database, count: int, timeout_s: float = 30.0) -> None:
    target = db.checkpointed + count
    async with asyncio.timeout(timeout_s):
        while db.checkpointed < target:
            await asyncio.sleep(0.005)


async def test_the_checkpointer_keeps_the_wal_from_growing_while_the_writer_writes(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = Database(f"sqlite:///{path}")
    loop = asyncio.create_task(db.checkpoints(interval_s=0.01))
    try:
        for _ in range(20):
            await _write_rows(db, 500)
            # A checkpoint that began after this write committed (the second one to complete from now): waiting
            # for it rather than for a fixed time keeps this test honest on a loaded machine, where a checkpoint
            # thread starved for longer than the writer's pause once let the WAL grow to 5.4 MB.
            await _checkpoints_after(db, 2)
        # Without checkpoints the WAL would hold all ~10,000 rows (~5 MB); with them it is reused from the start.
        assert _wal_frames(path) < 2_000_000
        _busy, frames, copied = _checkpoint(path)
        assert copied == frames
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await db.close()


async def test_cancelling_the_checkpointer_mid_checkpoint_is_safe(tmp_path: Path) -> None:
    # Cancelled while a checkpoint runs on its thread, it must wait for it before closing the connection (closing
    # it under a running checkpoint crashed the process).
    path = tmp_path / "c.db"
    db = Database(f"sqlite:///{path}")
    try:
        for _ in range(20):
            loop = asyncio.create_task(db.checkpoints(interval_s=0))
            await _write_rows(db, 2000)
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
    finally:
        await db.close()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_the_checkpointer_has_nothing_to_do_on_postgres(db_url: str) -> None:
    db = Database(db_url)
    try:
        await asyncio.wait_for(db.checkpoints(interval_s=0.01), timeout=5)
    finally:
        await db.close()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_asyncpgs_numeric_url_parameters_reach_it_as_numbers(db_url: str) -> None:
    """Before, the query's strings went to asyncpg as they were: ``?statement_cache_size=0`` (or ``timeout``,
    ``max_cached_statement_lifetime``, ``max_cacheable_statement_size``) was a TypeError at the first connection."""
    query = "statement_cache_size=0&timeout=7.5&command_timeout=30&max_cacheable_statement_size=2048"
    db = Database(f"{db_url}?{query}")
    try:
        async with db.read() as conn:
            assert (await conn.execute(sa.text("SELECT 1"))).scalar() == 1
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            assert driver._stmt_cache.get_max_size() == 0
            assert driver._config.command_timeout == 30.0
    finally:
        await db.close()


@pytest.mark.parametrize(
    "query",
    [
        "command_timeout=abc",
        "timeout=0",
        "timeout=nan",
        "statement_cache_size=1.5",
        "statement_cache_size=-1",
    ],
)
def test_a_bad_numeric_url_parameter_is_named_when_the_database_is_set_up(query: str) -> None:
    """Before, asyncpg raised ValueError or TypeError at the first connection: a traceback from every command."""
    with pytest.raises(ConfigError, match=f"database_url parameter {query.split('=')[0]} must be"):
        Database(f"postgresql://nobody@127.0.0.1:1/none?{query}")


# -- transactions on SQLite: BEGIN sent to the driver in one hop -----------------------------------------------


async def test_a_sqlite_write_transaction_holds_the_write_lock_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    db = Database(f"sqlite:///{path}")
    try:
        await _write_rows(db, 1)
        async with db.write() as conn:
            # Nothing written yet, but BEGIN IMMEDIATE has taken the lock: another writer is refused at once.
            other = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            finally:
                other.close()
            await conn.execute(sa.text("INSERT INTO t (v) VALUES ('in')"))
        async with db.read() as conn:
            assert (await conn.execute(sa.text("SELECT count(*) FROM t"))).scalar() == 2
    finally:
        await db.close()


async def test_a_failed_sqlite_write_transaction_leaves_the_writer_usable(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        await _write_rows(db, 1)
        with pytest.raises(RuntimeError):
            async with db.write() as conn:
                await conn.execute(sa.text("INSERT INTO t (v) VALUES ('lost')"))
                raise RuntimeError("boom")
        async with db.write() as conn:
            await conn.execute(sa.text("INSERT INTO t (v) VALUES ('kept')"))
        async with db.read() as conn:
            values = (await conn.execute(sa.text("SELECT v FROM t ORDER BY id"))).scalars().all()
    finally:
        await db.close()
    assert values == ["x" * 500, "kept"]


async def test_a_busy_sqlite_database_is_a_storage_error_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskcenter.errors import StorageError

    path = tmp_path / "b.db"
    db = Database(f"sqlite:///{path}")
    other = None
    # How long the writer waits for the lock, lowered for this test.
    monkeypatch.setattr(database, "SQLITE_LOCK_WAIT_S", 0.05)
    try:
        await _write_rows(db, 1)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(StorageError, match="locked"):
            async with db.write() as conn:
                await conn.execute(sa.text("INSERT INTO t (v) VALUES ('no')"))
        other.execute("ROLLBACK")
        async with db.write() as conn:  # and once it lets go, the writer works again
            await conn.execute(sa.text("INSERT INTO t (v) VALUES ('yes')"))
    finally:
        if other is not None:
            other.close()
        await db.close()


# -- waiting for the write lock another process holds ----------------------------------------------------------


def _hold_twice(path: Path, held: threading.Event, gap_s: float, seen: list[int]) -> None:
    """Another process's writer: holds the lock 0.6 s, lets go for ``gap_s``, takes it again (noting how many
    rows it then sees) for 0.3 s."""
    other = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        other.execute("BEGIN IMMEDIATE")
        held.set()
        time.sleep(0.6)
        other.execute("COMMIT")
        time.sleep(gap_s)
        other.execute("BEGIN IMMEDIATE")  # waits (10 s) if the other writer got in during the gap
        seen.append(other.execute("SELECT count(*) FROM t").fetchone()[0])
        time.sleep(0.3)
        other.execute("COMMIT")
    finally:
        other.close()


async def test_a_sqlite_writer_gets_in_during_a_short_gap_in_another_writers_lock(tmp_path: Path) -> None:
    # Another process's dispatcher holds the write lock nearly all the time and lets go for a moment between its
    # batches. SQLite's own busy handler would be asleep for 25-100 ms by then and would seldom try in the gap;
    # the writer looks every 1-2 ms, so it writes in the gap instead of after the next batch.
    path = tmp_path / "g.db"
    db = Database(f"sqlite:///{path}")
    held, seen = threading.Event(), []
    try:
        await _write_rows(db, 1)
        async with db.write() as conn:
            busy_ms = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
        holder = threading.Thread(target=_hold_twice, args=(path, held, 0.025, seen))
        holder.start()
        assert held.wait(10), "the other writer never took the lock"
        async with db.write() as conn:
            await conn.execute(sa.text("INSERT INTO t (v) VALUES ('in the gap')"))
        await asyncio.to_thread(holder.join)
    finally:
        await db.close()
    assert seen == [2]  # the holder's second transaction began after this writer's row was committed
    assert busy_ms == SQLITE_WRITER_BUSY_MS


async def test_a_create_beside_another_processs_write_waits_for_the_lock(tmp_path: Path) -> None:
    # A single create is a lone INSERT outside a transaction (it takes the lock itself): it waits for the lock as
    # BEGIN IMMEDIATE does rather than failing after the write connection's few milliseconds of busy_timeout.
    from taskcenter.runtime import Runtime
    from tests.conftest import make_settings
    from tests.test_api_support import task_body

    path = tmp_path / "create.db"
    rt = Runtime(make_settings(f"sqlite:///{path}"))
    await rt.start()
    other = None
    try:
        shop = await rt.service.ensure_business("shop")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        create = asyncio.create_task(rt.service.create_task(shop, task_body("waits")))
        await asyncio.sleep(0.3)
        assert not create.done()  # waiting, not failed
        other.execute("COMMIT")
        task = await asyncio.wait_for(create, timeout=10)
    finally:
        if other is not None:
            other.close()
        await rt.close()
    assert task.business_id == "waits"


def test_only_a_busy_database_is_waited_for() -> None:
    # Any other error of a statement that takes the lock (a missing table, a constraint) fails at once.
    calls = []

    def broken() -> None:
        calls.append(1)
        raise sqlite3.OperationalError("no such table: nowhere")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        database.sqlite_locked(broken)
    assert calls == [1]
