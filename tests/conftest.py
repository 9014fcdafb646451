"""Shared fixtures: a real database per test (SQLite file, and PostgreSQL when TASKCENTER_TEST_PG_URL is set),
a runtime wired to it, and the loopback receiver."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa

from taskcenter.config import Settings
from taskcenter.runtime import Runtime
from taskcenter.storage.database import Database
from taskcenter.storage.schema import metadata
from tests.receiver import Receiver, receiver  # noqa: F401  (fixture)

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
def pg_url() -> str:
    """The PostgreSQL test database, migrated once per session. Skips without one, fails if CI requires it."""
    if not PG_URL:
        if REQUIRE_PG:
            pytest.fail("TASKCENTER_REQUIRE_PG=1 but TASKCENTER_TEST_PG_URL is not set")
        pytest.skip("PostgreSQL leg off: set TASKCENTER_TEST_PG_URL (python3 dev.py test --pg)")
    problem = asyncio.run(_pg_reachable(PG_URL))
    if problem:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL required but unreachable: {problem}")
        pytest.skip(f"PostgreSQL unreachable: {problem}")

    async def reset() -> None:
        db = Database(PG_URL)
        async with db.write() as conn:
            await conn.execute(sa.text("DROP SCHEMA IF EXISTS public CASCADE"))
            await conn.execute(sa.text("CREATE SCHEMA public"))
        await db.migrate()
        await db.close()

    asyncio.run(reset())
    return PG_URL


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
