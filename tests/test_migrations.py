"""The Alembic migrations, applied to an empty database, build exactly the declared schema (SQLite and PostgreSQL).

Two empty databases per backend: one migrated, one built by ``metadata.create_all``. Alembic's autogenerate
compares the migrated one with the metadata; the catalogs of the two are compared too, which covers what
autogenerate cannot see (partial ``WHERE`` clauses, the ``priority DESC`` expression indexes).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from taskcenter.errors import SchemaOutOfDate
from taskcenter.storage.database import MIGRATIONS, Database, async_url
from taskcenter.storage.schema import metadata
from tests.conftest import BACKENDS, PG_URL, REQUIRE_PG

T = TypeVar("T")
ALEMBIC_TABLE = "alembic_version"
#: Indexes over expressions (``priority DESC``): autogenerate cannot reflect them on every backend.
EXPRESSION_INDEXES = frozenset(
    ix.name
    for table in metadata.tables.values()
    for ix in table.indexes
    if ix.name and any(not isinstance(e, sa.Column) for e in ix.expressions)
)


# -- empty databases --------------------------------------------------------------------------------------


def _pg_admin(statements: list[str]) -> None:
    """Run CREATE/DROP DATABASE statements (outside a transaction) on the test server."""
    assert PG_URL is not None

    async def run() -> None:
        engine = create_async_engine(async_url(PG_URL), isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as conn:
                for statement in statements:
                    await conn.execute(sa.text(statement))
        finally:
            await engine.dispose()

    asyncio.run(run())


def _pg_url_for(name: str) -> str:
    assert PG_URL is not None
    return make_url(PG_URL).set(database=name).render_as_string(hide_password=False)


def _require_pg() -> None:
    if not PG_URL:
        if REQUIRE_PG:
            pytest.fail("TASKCENTER_REQUIRE_PG=1 but TASKCENTER_TEST_PG_URL is not set")
        pytest.skip("PostgreSQL leg off: set TASKCENTER_TEST_PG_URL")


def empty_databases(backend: str, where: Path, *labels: str) -> Iterator[list[str]]:
    """Fresh, empty databases of ``backend``, one per label, dropped afterwards."""
    if backend == "sqlite":
        yield [f"sqlite:///{where / label}.db" for label in labels]
        return
    _require_pg()
    # Per process, so two test runs on one server cannot trip over each other.
    names = [f"taskcenter_migr_{os.getpid()}_{label}" for label in labels]
    _pg_admin([f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)' for n in names])
    _pg_admin([f'CREATE DATABASE "{n}"' for n in names])
    try:
        yield [_pg_url_for(n) for n in names]
    finally:
        _pg_admin([f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)' for n in names])


def on(url: str, fn: Callable[[sa.Connection], T]) -> T:
    """Run ``fn`` on a sync connection to ``url`` inside one committed transaction."""

    async def run() -> T:
        db = Database(url)
        try:
            async with db.write() as conn:
                return await conn.run_sync(fn)
        finally:
            await db.close()

    return asyncio.run(run())


def alembic(conn: sa.Connection, action: str, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    getattr(command, action)(cfg, revision)


# -- catalog ----------------------------------------------------------------------------------------------


def _clean(sql: str) -> str:
    return re.sub(r"\s+", " ", sql.replace('"', "")).strip()


def _top_level_items(create_table: str) -> list[str]:
    """The column and constraint clauses of a CREATE TABLE, in a stable order."""
    body = create_table[create_table.index("(") + 1 : create_table.rindex(")")]
    items, depth, current = [], 0, ""
    for char in body:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return sorted(items)


def indexes(conn: sa.Connection) -> dict[str, str]:
    """Index name → its definition as the database reports it."""
    if conn.dialect.name == "sqlite":
        rows = conn.execute(
            sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        )
    else:
        rows = conn.execute(
            sa.text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()")
        )
    return {name: _clean(sql) for name, sql in rows if ALEMBIC_TABLE not in sql}


def tables_and_constraints(conn: sa.Connection) -> dict[str, Any]:
    """Table name → sorted clauses (SQLite), or constraint name → definition (PostgreSQL)."""
    if conn.dialect.name == "sqlite":
        rows = conn.execute(sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'table'"))
        return {name: _top_level_items(_clean(sql)) for name, sql in rows if name != ALEMBIC_TABLE}
    rows = conn.execute(
        sa.text(
            "SELECT c.conrelid::regclass::text || '.' || c.conname, pg_get_constraintdef(c.oid) "
            "FROM pg_constraint c WHERE c.connamespace = current_schema()::regnamespace"
        )
    )
    return {name: definition for name, definition in rows if not name.startswith(ALEMBIC_TABLE)}


def table_names(conn: sa.Connection) -> set[str]:
    return set(sa.inspect(conn).get_table_names())


def autogenerate_diff(conn: sa.Connection) -> list[Any]:
    """Alembic's differences between the database and the metadata, less the expression indexes.

    Server defaults are compared on PostgreSQL only: on SQLite alembic reports ``''`` against ``""`` as a
    change; there the CREATE TABLE comparison with ``create_all`` checks defaults exactly instead.
    """
    opts = {"compare_type": True, "compare_server_default": conn.dialect.name == "postgresql"}
    context = MigrationContext.configure(conn, opts=opts)
    return [d for d in compare_metadata(context, metadata) if _index_name(d) not in EXPRESSION_INDEXES]


def _index_name(diff: Any) -> str | None:
    if isinstance(diff, tuple) and diff[0] in ("add_index", "remove_index"):
        return str(diff[1].name)
    return None


@dataclass(frozen=True)
class Built:
    """What the migrations built, beside what ``metadata.create_all`` builds."""

    backend: str
    diff: list[Any]
    migrated_indexes: dict[str, str]
    declared_indexes: dict[str, str]
    migrated_tables: dict[str, Any]
    declared_tables: dict[str, Any]
    revision: str | None
    head: str | None


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def built(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    for migrated, declared in empty_databases(
        backend, tmp_path_factory.mktemp("migr"), "migrated", "declared"
    ):
        revision, head = asyncio.run(_migrate(migrated))
        on(declared, metadata.create_all)
        yield Built(
            backend=backend,
            diff=on(migrated, autogenerate_diff),
            migrated_indexes=on(migrated, indexes),
            declared_indexes=on(declared, indexes),
            migrated_tables=on(migrated, tables_and_constraints),
            declared_tables=on(declared, tables_and_constraints),
            revision=revision,
            head=head,
        )


# -- the schema -------------------------------------------------------------------------------------------


def test_migrations_have_a_single_head() -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert len(ScriptDirectory.from_config(cfg).get_heads()) == 1


def test_an_empty_database_migrates_to_head(built: Built) -> None:
    assert built.revision is not None
    assert built.revision == built.head


def test_autogenerate_finds_no_difference_between_migrations_and_metadata(built: Built) -> None:
    """Expression indexes are left to the catalog comparison below (SQLite cannot reflect them)."""
    assert built.diff == []


def test_migrated_indexes_are_exactly_the_declared_ones(built: Built) -> None:
    assert built.migrated_indexes == built.declared_indexes


def test_migrated_tables_and_constraints_are_exactly_the_declared_ones(built: Built) -> None:
    assert built.migrated_tables == built.declared_tables


def test_every_declared_index_exists(built: Built) -> None:
    declared = {ix.name for table in metadata.tables.values() for ix in table.indexes}
    assert declared <= set(built.migrated_indexes)


# -- the indexes the issue asks for -----------------------------------------------------------------------


def _where(definition: str) -> str:
    assert " WHERE " in definition.upper(), f"not a partial index: {definition}"
    return definition[definition.upper().index(" WHERE ") :]


def test_the_claim_index_is_partial_on_due_tasks_and_orders_priority_descending(built: Built) -> None:
    definition = built.migrated_indexes["ix_tasks_due"]
    assert "priority DESC" in definition
    assert definition.index("priority DESC") < definition.index("next_attempt_at")
    where = _where(definition)
    assert "'pending'" in where and "'retrying'" in where
    assert "'processing'" not in where


def test_the_due_time_index_is_partial_on_due_tasks(built: Built) -> None:
    where = _where(built.migrated_indexes["ix_tasks_due_time"])
    assert "'pending'" in where and "'retrying'" in where
    assert "'processing'" not in where


def test_the_due_indexes_hold_http_tasks_and_processor_tasks_apart(built: Built) -> None:
    """A worker claims only the task types it can run: HTTP tasks' due indexes and processor tasks' (by type)."""
    for name in ("ix_tasks_due", "ix_tasks_due_business", "ix_tasks_due_time"):
        assert re.search(r"type\)?(::text)?\s*=\s*'http'", _where(built.migrated_indexes[name])), name
    for name in ("ix_tasks_due_type", "ix_tasks_due_type_time"):
        definition = built.migrated_indexes[name]
        assert re.search(r"\(\s*type\s*,", definition), definition
        assert re.search(r"type\)?(::text)?\s*<>\s*'http'", _where(definition)), definition


def test_live_business_id_index_is_unique_among_live_tasks_only(built: Built) -> None:
    definition = built.migrated_indexes["uq_tasks_live_business_id"]
    assert definition.upper().startswith("CREATE UNIQUE INDEX")
    assert re.search(r"\(\s*business_pk\s*,\s*business_id\s*\)", definition)
    where = _where(definition)
    assert all(f"'{s}'" in where for s in ("pending", "processing", "retrying"))
    assert not any(f"'{s}'" in where for s in ("succeeded", "failed", "cancelled"))


@pytest.mark.parametrize(
    ("name", "columns"),
    [("ix_tasks_status", "status"), ("ix_tasks_created_at", "created_at")],
)
def test_status_and_created_at_are_indexed(built: Built, name: str, columns: str) -> None:
    assert re.search(rf"\(\s*{columns}\b", built.migrated_indexes[name])


def test_task_uuid_is_unique(built: Built) -> None:
    if built.backend == "sqlite":
        assert "CONSTRAINT uq_tasks_uuid UNIQUE (uuid)" in built.migrated_tables["tasks"]
    else:
        assert built.migrated_tables["tasks.uq_tasks_uuid"] == "UNIQUE (uuid)"


# -- downgrade --------------------------------------------------------------------------------------------


@pytest.fixture
def fresh(backend: str, tmp_path: Path) -> Iterator[str]:
    for (url,) in empty_databases(backend, tmp_path, "roundtrip"):
        yield url


def test_downgrade_to_base_removes_every_table_and_upgrade_rebuilds_them(fresh: str) -> None:
    asyncio.run(_migrate(fresh))
    assert set(metadata.tables) <= on(fresh, table_names)
    on(fresh, lambda conn: alembic(conn, "downgrade", "base"))
    assert on(fresh, table_names) <= {ALEMBIC_TABLE}
    on(fresh, lambda conn: alembic(conn, "upgrade", "head"))
    assert set(metadata.tables) <= on(fresh, table_names)
    assert on(fresh, autogenerate_diff) == []


def test_each_migration_steps_down_and_up_again(fresh: str) -> None:
    """Every revision's downgrade undoes its upgrade: walk down one step at a time, then back up."""
    asyncio.run(_migrate(fresh))
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    steps = len(list(ScriptDirectory.from_config(cfg).walk_revisions()))
    for _ in range(steps):
        on(fresh, lambda conn: alembic(conn, "downgrade", "-1"))
    assert on(fresh, table_names) <= {ALEMBIC_TABLE}
    on(fresh, lambda conn: alembic(conn, "upgrade", "head"))
    assert set(metadata.tables) <= on(fresh, table_names)


async def _migrate(url: str) -> tuple[str | None, str | None]:
    """Migrate ``url`` to head; return (revision reached, head revision)."""
    db = Database(url)
    try:
        _, after = await db.migrate()
        return after, db.head_revision()
    finally:
        await db.close()


# -- a schema newer than the code -------------------------------------------------------------------------


def _stamp(revision: str) -> Callable[[sa.Connection], None]:
    def stamp(conn: sa.Connection) -> None:
        conn.execute(sa.text(f"UPDATE {ALEMBIC_TABLE} SET version_num = :v"), {"v": revision})

    return stamp


async def _check(url: str, *, auto_migrate: bool) -> None:
    db = Database(url)
    try:
        await db.check_schema(auto_migrate=auto_migrate)
    finally:
        await db.close()


@pytest.mark.parametrize("auto_migrate", [False, True], ids=["cluster", "embedded"])
def test_a_schema_from_a_newer_release_is_refused_in_one_line_without_advising_migrate(
    fresh: str, auto_migrate: bool
) -> None:
    """An older release started on a database a newer one migrated (a rolled-back upgrade) says so: before,
    a cluster process advised `taskcenter migrate` and migrating (or embedded mode) raised Alembic's error."""
    asyncio.run(_migrate(fresh))
    on(fresh, _stamp("9999"))
    with pytest.raises(SchemaOutOfDate) as refused:
        asyncio.run(_check(fresh, auto_migrate=auto_migrate))
    assert "9999, newer than this taskcenter" in refused.value.message
    assert "taskcenter migrate" not in refused.value.message
    with pytest.raises(SchemaOutOfDate, match="newer than this taskcenter"):
        asyncio.run(_migrate(fresh))
