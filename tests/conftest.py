"""Shared fixtures: a real database per test (SQLite file, and PostgreSQL when TASKCENTER_TEST_PG_URL is set),
a runtime wired to it, and the loopback receiver."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from taskcenter.config import Settings
from taskcenter.runtime import Runtime
from taskcenter.storage.database import Database
from taskcenter.storage.schema import metadata
from tests.receiver import Receiver, receiver  # noqa: F401  (fixture)
from tests.smtp_server import mail_server  # noqa: F401  (fixture)

PG_URL = os.environ.get("TASKCENTER_TEST_PG_URL")
REQUIRE_PG = os.environ.get("TASKCENTER_REQUIRE_PG") == "1"
BACKENDS = ["sqlite", "postgres"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "postgres":
            item.add_marker(pytest.mark.postgres)


async def _pg_reachable(url: str) -> str | None:
    db = Database(url)
    try:
        await db.ping()
        return None
    except Exception as exc:
        return str(exc)
    finally:
        await db.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of this test session's own, migrated once, dropped at the end.

    It is made next to the one TASKCENTER_TEST_PG_URL names, so concurrent test runs never share tables.
    Skips without TASKCENTER_TEST_PG_URL, fails instead when TASKCENTER_REQUIRE_PG=1 (CI).
    """
    if not PG_URL:
        if REQUIRE_PG:
            pytest.fail("TASKCENTER_REQUIRE_PG=1 but TASKCENTER_TEST_PG_URL is not set")
        pytest.skip("PostgreSQL leg off: set TASKCENTER_TEST_PG_URL (python3 dev.py test --pg)")
    problem = asyncio.run(_pg_reachable(PG_URL))
    if problem:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL required but unreachable: {problem}")
        pytest.skip(f"PostgreSQL unreachable: {problem}")
    base = sa.make_url(PG_URL)
    name = f"{base.database}_s{os.getpid()}"
    admin_url = base.set(drivername="postgresql+asyncpg", database="postgres")

    async def admin(sql: str) -> None:
        engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
        async with engine.connect() as conn:
            await conn.execute(sa.text(sql))
        await engine.dispose()

    async def create() -> None:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin(f'CREATE DATABASE "{name}"')
        db = Database(url)
        await db.migrate()
        await db.close()

    url = base.set(database=name).render_as_string(hide_password=False)
    asyncio.run(create())
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test copies (migrating per test would cost more than the test)."""
    path = tmp_path_factory.mktemp("template") / "template.db"

    async def make() -> None:
        db = Database(f"sqlite:///{path}")
        await db.migrate()
        await db.close()

    asyncio.run(make())
    return path


def _truncate_sql() -> str:
    names = ", ".join(t.name for t in reversed(metadata.sorted_tables))
    return f"TRUNCATE {names} RESTART IDENTITY CASCADE"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A clean, migrated database of the parametrised backend."""
    if backend == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        target = tmp_path / "taskcenter.db"
        shutil.copy(template, target)
        yield f"sqlite:///{target}"
        return
    url = request.getfixturevalue("pg_url")

    async def truncate() -> None:
        db = Database(url)
        async with db.write() as conn:
            await conn.execute(sa.text(_truncate_sql()))
        await db.close()

    asyncio.run(truncate())
    yield url


@pytest.fixture
def quiet_gc() -> Iterator[None]:
    """For tests that time arrivals: keep the test process's own full GC collections short.

    After a thousand tests this process holds millions of objects, and one full collection can stall its event
    loop for a few hundred milliseconds. The dispatcher under test and the receiver recording arrival times share
    that loop, so a stall between a request leaving and the receiver reading it bunches arrivals that left
    properly spaced (a real receiver in another process would not see that). Freezing what exists now keeps the
    collections that run during the test down to the test's own objects; they are unfrozen (and collectable
    again) afterwards.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def make_settings(db_url: str, **overrides: Any) -> Settings:
    """Settings for tests: the loopback receiver is allowed through the SSRF guard, polling is quick."""
    values: dict[str, Any] = {
        "database_url": db_url,
        "allow_networks": "127.0.0.0/8,::1/128",
        "poll_interval_s": 1.0,
        "rescue_interval_s": 0.5,
        "shutdown_grace_s": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest_asyncio.fixture
async def runtime(db_url: str) -> AsyncIterator[Runtime]:
    rt = Runtime(make_settings(db_url))
    await rt.start()
    yield rt
    await rt.close()
