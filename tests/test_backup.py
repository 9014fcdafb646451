"""``taskcenter backup`` and ``taskcenter restore``: real processes on real SQLite files (and the real PostgreSQL
with the real pg_dump), a real receiver taking the deliveries while the backup runs."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from taskcenter import TaskCenter
from taskcenter.cli_backup import libpq_target
from taskcenter.storage.database import Database
from tests.conftest import make_settings
from tests.processes import WorkerProcess
from tests.receiver import Receiver, Reply
from tests.test_cli import Cli, one_line_error

TASKCENTER = str(Path(sys.executable).with_name("taskcenter"))
OPERATOR_KEY = "op-backup-test-key-0123456789"


def _env(db_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCENTER_")}
    env.update(TASKCENTER_DATABASE_URL=db_url, TASKCENTER_ALLOW_NETWORKS="127.0.0.0/8", **extra)
    return env


async def _seed(db_url: str, url: str, count: int, *, prefix: str = "t") -> list[str]:
    """``count`` tasks to ``url`` in batches of 1000, each with a 2 KiB body (so the file spans many pages)."""
    keys = [f"{prefix}-{n}" for n in range(count)]
    async with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
        business = await tc.runtime.service.business("shop")
        for start in range(0, count, 1000):
            items = [
                {"business_id": key, "url": url, "json": {"pad": "x" * 2048, "key": key}}
                for key in keys[start : start + 1000]
            ]
            results = await tc.runtime.service.create_tasks(business, items)
            assert all(r["status"] == 201 for r in results), results[:1]
    return keys


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def _run(*args: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> tuple[int, str, str]:
    """Run ``taskcenter …`` without blocking the event loop (the receiver answers from it meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        TASKCENTER, *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _get(url: str, **headers: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as answer:
        return answer.status, await answer.json()


async def test_backup_of_a_delivering_worker_is_consistent_and_restores_into_a_serve_that_has_the_tasks(
    tmp_path: Path, receiver: Receiver
) -> None:
    source = tmp_path / "live.db"
    db_url = f"sqlite:///{source}"
    count = 3000
    receiver.set_default(Reply.delayed(0.05))
    keys = await _seed(db_url, receiver.url("/hook"), count)
    worker = WorkerProcess(db_url, concurrency=10)
    try:
        worker.wait_ready()
        await receiver.wait_for(50, "/hook", timeout=30)
        before = len(receiver.requests_for("/hook"))
        code, out, err = await _run("backup", str(tmp_path / "copy.db"), env=_env(db_url), cwd=tmp_path)
        during = len(receiver.requests_for("/hook")) - before
        assert worker.alive(), worker.output()
    finally:
        worker.terminate()
    assert code == 0, err
    assert "integrity ok" in out and f"{count} tasks" in out, out
    # The worker went on delivering (and so writing) while the copy was made, and had not finished.
    assert during > 0 and before + during < count, (before, during)
    copy = tmp_path / "copy.db"
    assert _rows(copy, "PRAGMA integrity_check") == [("ok",)]
    assert sorted(k for (k,) in _rows(copy, "SELECT business_id FROM tasks")) == sorted(keys)
    assert not Path(f"{copy}-wal").exists()
    statuses = dict(_rows(copy, "SELECT status, count(*) FROM tasks GROUP BY status"))
    assert statuses.get("succeeded", 0) >= before - 10 and statuses.get("pending", 0) > 0, statuses

    restored = tmp_path / "restored" / "new.db"
    restored.parent.mkdir()
    new_url = f"sqlite:///{restored}"
    code, out, err = await _run("restore", str(copy), "--yes", env=_env(new_url), cwd=tmp_path)
    assert code == 0, err
    assert f"{count} tasks" in out and "migrated" not in out, out

    port = _free_port()
    serve_env = _env(new_url, TASKCENTER_PORT=str(port), TASKCENTER_OPERATOR_KEY=OPERATOR_KEY)
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [TASKCENTER, "serve", "--no-worker"], cwd=tmp_path, env=serve_env, stdout=sink, stderr=sink
        )
    try:
        deadline = time.monotonic() + 30
        while "Uvicorn running" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        assert await _get(f"{base}/health") == (
            200, {"status": "ok", "database": "ok", "dispatcher": "off"}
        )  # fmt: skip
        status, figures = await _get(f"{base}/api/v1/stats", Authorization=f"Bearer {OPERATOR_KEY}")
        assert status == 200 and figures["total"] == count, figures
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()


#: Moves one unit of priority from a task at the start of the table to one at its end, commit after commit as
#: fast as SQLite allows: the total never changes, but a copy mixing two moments would see it change.
_SHUFFLER = """
import random, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
ids = [row[0] for row in conn.execute("SELECT id FROM tasks ORDER BY id")]
print("ready", flush=True)
while True:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE tasks SET priority = priority - 1 WHERE id = ?", (random.choice(ids[:200]),))
    conn.execute("UPDATE tasks SET priority = priority + 1 WHERE id = ?", (random.choice(ids[-200:]),))
    conn.execute("COMMIT")
"""


async def test_backup_under_back_to_back_commits_finishes_and_is_one_moment(tmp_path: Path) -> None:
    """Backup steps without one read transaction around them restart whenever another process committed in
    between: against this writer such a copy never finishes. Each step reading the same snapshot does."""
    source = tmp_path / "busy.db"
    await _seed(f"sqlite:///{source}", "http://127.0.0.1:9/hook", 6000)
    [(total,)] = _rows(source, "SELECT sum(priority) FROM tasks")
    writer = subprocess.Popen([sys.executable, "-c", _SHUFFLER, str(source)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
        await asyncio.sleep(0.3)
        code, _, err = await _run(
            "backup", str(tmp_path / "copy.db"), env=_env(f"sqlite:///{source}"), cwd=tmp_path, timeout=60
        )
        assert writer.poll() is None
        [(moved,)] = _rows(source, "SELECT count(*) FROM tasks WHERE priority != 0")
    finally:
        writer.kill()
        writer.wait()
    assert code == 0, err
    assert moved > 0  # the writer really wrote throughout
    assert _rows(tmp_path / "copy.db", "SELECT sum(priority) FROM tasks") == [(total,)]


def _backup_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str = "cli.db") -> Cli:
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("TASKCENTER_")]:
        monkeypatch.delenv(key)
    cli = Cli(f"sqlite:///{tmp_path / name}")
    with cli.center() as tc:
        tc.create_task("POST", "http://127.0.0.1:9/hook", business_id="kept-1")
    return cli


def test_backup_refuses_an_existing_dest_unless_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = _backup_cli(tmp_path, monkeypatch)
    dest = tmp_path / "copy.db"
    dest.write_text("keep me")
    line = one_line_error(cli("backup", str(dest)), 1)
    assert "exists: pass --force" in line and dest.read_text() == "keep me"
    assert "1 tasks" in cli.ok("backup", str(dest), "--force")
    assert _rows(dest, "SELECT business_id FROM tasks") == [("kept-1",)]
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_backup_of_a_database_that_does_not_exist_fails_in_one_line(tmp_path: Path) -> None:
    cli = Cli(f"sqlite:///{tmp_path / 'missing.db'}")
    line = one_line_error(cli("backup", str(tmp_path / "copy.db")), 1)
    assert "missing.db does not exist" in line and not (tmp_path / "missing.db").exists()


def _restore_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src: Path) -> str:
    cli = _backup_cli(tmp_path, monkeypatch, "target.db")
    line = one_line_error(cli("restore", str(src), "--yes"), 1)
    assert _rows(tmp_path / "target.db", "SELECT business_id FROM tasks") == [("kept-1",)]  # untouched
    return line


def test_restore_refuses_a_src_that_does_not_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "nothing.db does not exist" in _restore_error(tmp_path, monkeypatch, tmp_path / "nothing.db")


def test_restore_refuses_a_src_that_is_not_a_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "notes.txt"
    src.write_text("not a database at all, but long enough to have a header of sorts\n" * 20)
    assert "is not a SQLite database" in _restore_error(tmp_path, monkeypatch, src)


def test_restore_refuses_a_sqlite_file_that_is_not_taskcenters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "other.db"
    with sqlite3.connect(src) as conn:
        conn.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY)")
    assert "is not a taskcenter database" in _restore_error(tmp_path, monkeypatch, src)


def test_restore_refuses_a_backup_from_a_newer_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = _backup_cli(tmp_path, monkeypatch, "source.db")
    src = tmp_path / "newer.db"
    cli.ok("backup", str(src))
    with sqlite3.connect(src) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    line = _restore_error(tmp_path, monkeypatch, src)
    assert "at schema 9999, newer than this taskcenter knows" in line


def test_restore_without_yes_and_without_a_terminal_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = _backup_cli(tmp_path, monkeypatch, "source.db")
    cli.ok("backup", str(tmp_path / "copy.db"))
    target = Cli(f"sqlite:///{tmp_path / 'new.db'}")
    line = one_line_error(target("restore", str(tmp_path / "copy.db")), 1)
    assert "pass --yes" in line and not (tmp_path / "new.db").exists()


async def test_restore_refuses_while_a_worker_has_the_target_open(tmp_path: Path) -> None:
    src_url = f"sqlite:///{tmp_path / 'source.db'}"
    await _seed(src_url, "http://127.0.0.1:9/hook", 3, prefix="src")
    code, _, err = await _run("backup", str(tmp_path / "copy.db"), env=_env(src_url), cwd=tmp_path)
    assert code == 0, err
    target_url = f"sqlite:///{tmp_path / 'target.db'}"
    await _seed(target_url, "http://127.0.0.1:9/hook", 1, prefix="live")
    worker = WorkerProcess(target_url, concurrency=2, poll_interval_s=0.2)
    try:
        worker.wait_ready()
        code, _, err = await _run(
            "restore", str(tmp_path / "copy.db"), "--yes", env=_env(target_url), cwd=tmp_path
        )
        assert code == 1 and "in use by another process" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert worker.alive(), worker.output()
    finally:
        assert worker.terminate() == 0, worker.output()
    assert _rows(tmp_path / "target.db", "SELECT business_id FROM tasks") == [("live-0",)]
    code, out, err = await _run(
        "restore", str(tmp_path / "copy.db"), "--yes", env=_env(target_url), cwd=tmp_path
    )
    assert code == 0 and "replace" not in out, err
    assert sorted(_rows(tmp_path / "target.db", "SELECT business_id FROM tasks")) == [
        ("src-0",), ("src-1",), ("src-2",)
    ]  # fmt: skip


async def _killed_with_a_wal(target: Path) -> None:
    """Leave ``target`` as a process killed mid-work leaves it: its last commits only in ``target-wal``."""
    await _seed(f"sqlite:///{target}", "http://127.0.0.1:9/hook", 2, prefix="gone")
    before = target.read_bytes()  # checkpointed: the WAL is empty or gone
    writer = sqlite3.connect(target)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("UPDATE tasks SET business_id = business_id || '-in-the-wal'")
    writer.commit()
    wal = Path(f"{target}-wal").read_bytes()
    writer.close()  # the last connection checkpoints and deletes the WAL: put back what a kill leaves
    target.write_bytes(before)
    Path(f"{target}-wal").write_bytes(wal)


async def test_restore_over_a_stale_wal_does_not_mix_it_in_and_migrates_an_older_backup(
    tmp_path: Path,
) -> None:
    """Copying a backup over a database file with a stale -wal beside it replays the WAL onto the copy; restore
    does not. The backup here is at 0007 (an older release's), and restore brings it up to this one's head."""
    old = tmp_path / "old.db"
    db = Database(f"sqlite:///{old}")
    await db.migrate("0007")
    head = db.head_revision()
    await db.close()
    with sqlite3.connect(old) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")

    naive = tmp_path / "naive.db"
    await _killed_with_a_wal(naive)
    shutil.copyfile(old, naive)
    mixed = sqlite3.connect(naive)
    try:  # the hazard is real: the stale frames land on the copied file
        assert mixed.execute("PRAGMA integrity_check").fetchall() != [("ok",)] or mixed.execute(
            "SELECT count(*) FROM tasks"
        ).fetchone() != (0,)
    except sqlite3.DatabaseError:
        pass
    finally:
        mixed.close()

    target = tmp_path / "target.db"
    await _killed_with_a_wal(target)
    code, out, err = await _run("restore", str(old), "--yes", env=_env(f"sqlite:///{target}"), cwd=tmp_path)
    assert code == 0, err
    assert f"schema 0007, 0 tasks, migrated from 0007 to {head}" in out, out
    assert _rows(target, "PRAGMA integrity_check") == [("ok",)]
    assert _rows(target, "SELECT count(*) FROM tasks") == [(0,)]
    assert _rows(target, "SELECT version_num FROM alembic_version") == [(head,)]


# -- PostgreSQL -----------------------------------------------------------------------------------------


def test_the_libpq_url_carries_no_password_and_translates_asyncpg_parameters() -> None:
    url, env = libpq_target(
        "postgresql://tc:s3cr%40t@db.example:6432/tasks?ssl=require&timeout=7.5&command_timeout=3"
    )
    assert url == "postgresql://tc@db.example:6432/tasks?connect_timeout=8&sslmode=require"
    assert env == {"PGPASSWORD": "s3cr@t"}


def test_backup_on_postgresql_without_pg_dump_on_path_fails_in_one_line(pg_url: str, tmp_path: Path) -> None:
    cli = Cli(pg_url)
    line = one_line_error(cli("backup", str(tmp_path / "tc.dump"), PATH=str(tmp_path)), 1)
    assert "pg_dump is not on PATH" in line and not (tmp_path / "tc.dump").exists()


def test_restore_on_postgresql_points_to_pg_restore(pg_url: str, tmp_path: Path) -> None:
    line = one_line_error(Cli(pg_url)("restore", str(tmp_path / "tc.dump"), "--yes"), 1)
    assert "pg_restore" in line


async def _pg_counts(url: str) -> dict[str, int]:
    engine = create_async_engine(sa.make_url(url).set(drivername="postgresql+asyncpg"))
    try:
        async with engine.connect() as conn:
            return {
                table: (await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one()
                for table in ("tasks", "attempts", "businesses", "alembic_version")
            }
    finally:
        await engine.dispose()


async def test_backup_on_postgresql_is_a_pg_dump_that_pg_restore_restores(
    pg_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    keys = await _seed(pg_url, receiver.url("/pg"), 40, prefix=f"pg-{os.getpid()}")
    dump = tmp_path / "tc.dump"
    code, out, err = await _run("backup", str(dump), env=_env(pg_url), cwd=tmp_path)
    assert code == 0, err
    source = await _pg_counts(pg_url)
    assert f"{source['tasks']} tasks" in out and "pg_dump -Fc" in out and len(keys) <= source["tasks"], out
    base = sa.make_url(pg_url)
    name = f"{base.database}_restore"
    admin = base.set(database="postgres").render_as_string(hide_password=False)
    env = {**os.environ, "PGPASSWORD": base.password or ""}
    subprocess.run(
        ["dropdb", "--if-exists", "--force", f"--maintenance-db={admin}", name], env=env, check=True
    )
    subprocess.run(["createdb", f"--maintenance-db={admin}", name], env=env, check=True)
    try:
        target = base.set(database=name).render_as_string(hide_password=False)
        libpq, password = libpq_target(target)
        done = subprocess.run(
            ["pg_restore", "--no-owner", f"--dbname={libpq}", str(dump)],
            env={**os.environ, **password}, capture_output=True, text=True,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert await _pg_counts(target) == source
    finally:
        subprocess.run(
            ["dropdb", "--if-exists", "--force", f"--maintenance-db={admin}", name], env=env, check=True
        )
