"""SQLite's WAL checkpoints: taken off the writer's commits and done by a connection of their own."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from taskcenter.storage.database import CHECKPOINT_SQL, SQLITE_WRITER_AUTOCHECKPOINT, Database


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


async def test_the_checkpointer_keeps_the_wal_from_growing_while_the_writer_writes(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    db = Database(f"sqlite:///{path}")
    loop = asyncio.create_task(db.checkpoints(interval_s=0.01))
    try:
        for _ in range(20):
            await _write_rows(db, 500)
            await asyncio.sleep(0.02)
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


async def test_a_busy_sqlite_database_is_a_storage_error_not_a_crash(tmp_path: Path) -> None:
    from taskcenter.errors import StorageError

    path = tmp_path / "b.db"
    db = Database(f"sqlite:///{path}")
    other = None
    try:
        await _write_rows(db, 1)
        async with db.write() as conn:  # the writer's busy timeout, lowered for this test
            await conn.exec_driver_sql("PRAGMA busy_timeout=50")
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
