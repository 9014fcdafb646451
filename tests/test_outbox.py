"""Transactional outbox: ``create_task(connection=…)`` joins the caller's own SQLAlchemy transaction.

The async leg (``AsyncConnection``) runs on SQLite and PostgreSQL. The sync leg (``sa.Connection``) runs on
SQLite only: no synchronous PostgreSQL driver (psycopg, psycopg2, pg8000) is installed here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from taskcenter import DuplicateTask, LimitExceeded, TaskCenter, ValidationError
from taskcenter.errors import StorageError
from taskcenter.storage.database import async_url
from taskcenter.storage.schema import businesses
from tests.conftest import make_settings
from tests.receiver import Receiver
from tests.test_library import wait_status, working

app_meta = sa.MetaData()
orders = sa.Table(
    "app_orders", app_meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("note", sa.String(50))
)


@pytest_asyncio.fixture
async def atc(db_url: str) -> AsyncIterator[TaskCenter]:
    async with TaskCenter(settings=make_settings(db_url), business="shop") as center:
        yield center


@pytest_asyncio.fixture
async def app_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """The application's own async engine on the same database, with a table of its own."""
    engine = create_async_engine(async_url(db_url))
    async with engine.begin() as conn:
        await conn.run_sync(app_meta.drop_all)
        await conn.run_sync(app_meta.create_all)
    yield engine
    async with engine.begin() as conn:
        await conn.run_sync(app_meta.drop_all)
    await engine.dispose()


@pytest.fixture
def sync_engine(db_url: str) -> Iterator[sa.Engine]:
    """The application's own sync engine (SQLite) with a table of its own."""
    engine = sa.create_engine(db_url)
    app_meta.create_all(engine)
    yield engine
    engine.dispose()


class Rollback(Exception):
    """Raised inside a transaction block to roll it back."""


# -- async connection (both backends) ---------------------------------------------------------------------


async def test_async_rolled_back_transaction_leaves_no_task_and_sends_nothing(
    atc: TaskCenter, app_engine: AsyncEngine, receiver: Receiver
) -> None:
    async with working(atc):
        with pytest.raises(Rollback):
            async with app_engine.begin() as conn:
                await conn.execute(sa.insert(orders).values(id=1, note="lost"))
                await atc.acreate_task("POST", receiver.url("/lost"), business_id="o-1", connection=conn)
                raise Rollback
        # A control task proves the worker was polling all along.
        await atc.acreate_task("POST", receiver.url("/control"), business_id="control")
        await receiver.wait_for(1, "/control", timeout=10)
        await asyncio.sleep(1.2)  # longer than the poll interval
    assert receiver.requests_for("/lost") == []
    tasks, _ = await atc.alist_tasks()
    assert [t.business_id for t in tasks] == ["control"]
    async with app_engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(orders))).scalar() == 0


async def test_async_committed_transaction_is_delivered_by_a_running_worker(
    atc: TaskCenter, app_engine: AsyncEngine, receiver: Receiver
) -> None:
    async with working(atc):
        async with app_engine.begin() as conn:
            await conn.execute(sa.insert(orders).values(id=1, note="kept"))
            task = await atc.acreate_task(
                "POST", receiver.url("/kept"), json={"order": 1}, business_id="o-1", connection=conn
            )
            assert task.status == "pending"
        [request] = await receiver.wait_for(1, "/kept", timeout=10)
        await wait_status(atc, task.id, "succeeded")
    assert request.json() == {"order": 1} and request.headers["X-Task-Id"] == task.id


async def test_async_task_is_invisible_to_others_until_the_caller_commits(
    atc: TaskCenter, app_engine: AsyncEngine, receiver: Receiver
) -> None:
    async with app_engine.begin() as conn:
        task = await atc.acreate_task("POST", receiver.url("/x"), business_id="o-1", connection=conn)
        assert (await atc.alist_tasks())[0] == []
    assert (await atc.aget_task(task.id)).status == "pending"


async def test_async_duplicate_in_transaction_raises_and_leaves_the_transaction_usable(
    atc: TaskCenter, app_engine: AsyncEngine, receiver: Receiver
) -> None:
    existing = await atc.acreate_task("POST", receiver.url("/d"), business_id="dup")
    async with app_engine.begin() as conn:
        with pytest.raises(DuplicateTask) as info:
            await atc.acreate_task("POST", receiver.url("/d"), business_id="dup", connection=conn)
        await conn.execute(sa.insert(orders).values(id=7, note="still fine"))
    assert info.value.existing_id == existing.id
    async with app_engine.connect() as conn:
        assert (await conn.execute(sa.select(orders.c.note))).scalar() == "still fine"


async def test_async_a_session_or_engine_for_connection_is_a_validation_error_naming_it(
    atc: TaskCenter, app_engine: AsyncEngine
) -> None:
    """It used to be an AttributeError ('AsyncSession' has no attribute 'dialect') from inside the insert."""
    async with AsyncSession(app_engine) as session:
        with pytest.raises(ValidationError) as info:
            await atc.acreate_task("POST", "http://127.0.0.1:9/", business_id="s", connection=session)  # type: ignore[arg-type]
    assert info.value.field == "connection" and "session.connection()" in str(info.value)
    with pytest.raises(ValidationError):
        await atc.acreate_task("POST", "http://127.0.0.1:9/", business_id="e", connection=app_engine)  # type: ignore[arg-type]
    assert (await atc.alist_tasks())[0] == []


# -- sync connection (SQLite only: no sync PostgreSQL driver is installed) --------------------------------


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sync_rolled_back_transaction_leaves_no_task_and_sends_nothing(
    db_url: str, atc: TaskCenter, sync_engine: sa.Engine, receiver: Receiver
) -> None:
    with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
        with pytest.raises(Rollback), sync_engine.begin() as conn:
            conn.execute(sa.insert(orders).values(id=1, note="lost"))
            tc.create_task("POST", receiver.url("/lost"), business_id="o-1", connection=conn)
            raise Rollback
        assert tc.list_tasks() == ([], None)
    async with working(atc):
        await atc.acreate_task("POST", receiver.url("/control"), business_id="control")
        await receiver.wait_for(1, "/control", timeout=10)
        await asyncio.sleep(1.2)
    assert receiver.requests_for("/lost") == []
    with sync_engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(orders)).scalar() == 0


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sync_committed_transaction_is_delivered_by_a_running_worker(
    db_url: str, atc: TaskCenter, sync_engine: sa.Engine, receiver: Receiver
) -> None:
    async with working(atc):
        with TaskCenter(settings=make_settings(db_url), business="shop") as tc, sync_engine.begin() as conn:
            conn.execute(sa.insert(orders).values(id=1, note="kept"))
            task = tc.create_task(
                "POST", receiver.url("/kept"), json={"n": 1}, business_id="o-1", connection=conn
            )
        [request] = await receiver.wait_for(1, "/kept", timeout=10)
        await wait_status(atc, task.id, "succeeded")
    assert request.json() == {"n": 1}


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sync_duplicate_in_transaction_raises_and_leaves_the_transaction_usable(
    db_url: str, sync_engine: sa.Engine
) -> None:
    with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
        existing = tc.create_task("POST", "http://127.0.0.1:9/", business_id="dup")
        with sync_engine.begin() as conn:
            with pytest.raises(DuplicateTask) as info:
                tc.create_task("POST", "http://127.0.0.1:9/", business_id="dup", connection=conn)
            conn.execute(sa.insert(orders).values(id=7, note="still fine"))
    assert info.value.existing_id == existing.id
    with sync_engine.connect() as conn:
        assert conn.execute(sa.select(orders.c.note)).scalar() == "still fine"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sync_outbox_obeys_the_active_task_limit(db_url: str, sync_engine: sa.Engine) -> None:
    """The sync outbox path runs the same checks as every other create path."""
    now = datetime.now(UTC)
    with sync_engine.begin() as conn:
        conn.execute(
            sa.insert(businesses).values(
                code="shop", name="Shop", max_active_tasks=1, created_at=now, updated_at=now
            )
        )
    with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
        tc.create_task("POST", "http://127.0.0.1:9/", business_id="one")
        with pytest.raises(LimitExceeded), sync_engine.begin() as conn:
            tc.create_task("POST", "http://127.0.0.1:9/", business_id="two", connection=conn)
        assert len(tc.list_tasks()[0]) == 1


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sync_a_session_or_engine_for_connection_is_a_validation_error_naming_it(
    db_url: str, sync_engine: sa.Engine
) -> None:
    """It used to be an AttributeError ('Session' object has no attribute 'run_sync')."""
    with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
        for wrong in (Session(sync_engine), sync_engine):
            with pytest.raises(ValidationError) as info:
                tc.create_task("POST", "http://127.0.0.1:9/", business_id="w", connection=wrong)
            assert info.value.field == "connection"
        with Session(sync_engine) as session, session.begin():
            tc.create_task("POST", "http://127.0.0.1:9/", business_id="ok", connection=session.connection())
        assert [t.business_id for t in tc.list_tasks()[0]] == ["ok"]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sync_first_use_inside_a_writing_transaction_says_to_start_first(
    db_url: str, sync_engine: sa.Engine
) -> None:
    """The documented SQLite limit used to surface as a bare "cannot read the schema version: database is
    locked", which says nothing of the cause."""
    tc = TaskCenter(settings=make_settings(db_url), business="shop")
    try:
        with pytest.raises(StorageError) as info, sync_engine.begin() as conn:
            conn.execute(sa.insert(orders).values(id=1, note="writes first"))
            tc.create_task("POST", "http://127.0.0.1:9/", business_id="o-1", connection=conn)
        assert "start the TaskCenter" in str(info.value)
        with sync_engine.begin() as conn:  # started now: the same transaction works
            tc.list_tasks()
            conn.execute(sa.insert(orders).values(id=1, note="writes first"))
            tc.create_task("POST", "http://127.0.0.1:9/", business_id="o-1", connection=conn)
        assert len(tc.list_tasks()[0]) == 1
    finally:
        tc.close()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sync_a_connection_to_another_database_is_a_storage_error_saying_so(
    db_url: str, tmp_path: Path
) -> None:
    """It used to be SQLAlchemy's OperationalError (no such table: tasks) with its SQL, out of the library."""
    elsewhere = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    try:
        with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
            with pytest.raises(StorageError) as info, elsewhere.begin() as conn:
                tc.create_task("POST", "http://127.0.0.1:9/", business_id="o-1", connection=conn)
            assert "no such table: tasks" in info.value.message
            assert "taskcenter's own database" in info.value.message
            assert isinstance(info.value.__cause__, sa.exc.SQLAlchemyError)
    finally:
        elsewhere.dispose()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_async_a_connection_to_another_database_is_a_storage_error_saying_so(
    atc: TaskCenter, tmp_path: Path
) -> None:
    elsewhere = create_async_engine(async_url(f"sqlite:///{tmp_path / 'app.db'}"))
    try:
        with pytest.raises(StorageError, match="taskcenter's own database"):
            async with elsewhere.begin() as conn:
                await atc.acreate_task("POST", "http://127.0.0.1:9/", business_id="o-1", connection=conn)
    finally:
        await elsewhere.dispose()
