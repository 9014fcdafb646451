"""Bulk CLI work: ``taskcenter retry`` (many failed tasks at once) and ``taskcenter purge`` (retention)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from taskcenter import TaskCenter
from taskcenter.cli import app
from taskcenter.storage.schema import tasks

runner = CliRunner()


def _env(db: Path) -> dict[str, str]:
    return {"TASKCENTER_DATABASE_URL": f"sqlite:///{db}", "TASKCENTER_LOG_FORMAT": "console"}


def _seed(db: Path) -> TaskCenter:
    tc = TaskCenter(f"sqlite:///{db}", business="shop")
    for i in range(12):
        task = tc.create_task("POST", "https://hooks.example.com/x", business_id=f"k{i}", delay=3600)
        tc.cancel(task.id)
    tc.create_task("POST", "https://hooks.example.com/x", business_id="live", delay=3600)
    return tc


def test_bulk_retry_requeues_every_matching_task_with_a_renewed_budget(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    tc = _seed(db)
    result = runner.invoke(app, ["retry", "--status", "cancelled", "--business", "shop"], env=_env(db))
    assert result.exit_code == 0, result.output
    assert "retried 12 tasks" in result.stdout
    page, _ = tc.list_tasks(status=["pending"], limit=100)
    assert len(page) == 13
    tc.close()


def test_bulk_retry_refuses_statuses_that_cannot_be_retried(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    _seed(db).close()
    result = runner.invoke(app, ["retry", "--status", "pending"], env=_env(db))
    assert result.exit_code == 1
    assert "only failed or cancelled" in result.stderr


@pytest.mark.parametrize("status", ["pending", "bogus", "failed,succeeded"])
def test_bulk_retry_refuses_a_status_in_one_line_before_any_progress_bar(tmp_path: Path, status: str) -> None:
    """A progress bar ('retrying 0/?') was drawn above the error line."""
    db = tmp_path / "t.db"
    _seed(db).close()
    result = runner.invoke(app, ["retry", "--status", status], env=_env(db))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: --status {status}: only failed or cancelled tasks can be retried"
    ]


def test_bulk_retry_by_a_host_without_a_port_retries_that_host_s_tasks_on_every_port(tmp_path: Path) -> None:
    """Before, ``--host hooks.example.com`` matched nothing (hosts are stored as host:port) and said so."""
    db = tmp_path / "t.db"
    tc = _seed(db)
    other = tc.create_task("POST", "https://other.example.com/x", business_id="other", delay=3600)
    tc.cancel(other.id)
    result = runner.invoke(
        app, ["retry", "--status", "cancelled", "--host", "hooks.example.com"], env=_env(db)
    )
    assert result.exit_code == 0, result.output
    assert "retried 12 tasks" in result.stdout
    assert tc.get_task(other.id).status == "cancelled"
    tc.close()


@pytest.mark.parametrize("host", ["", "https://hooks.example.com/x", "hooks example.com"])
def test_bulk_retry_refuses_a_host_in_one_line_before_any_progress_bar(tmp_path: Path, host: str) -> None:
    """An empty ``--host`` (an unset shell variable) must not mean "every host"."""
    db = tmp_path / "t.db"
    _seed(db).close()
    result = runner.invoke(app, ["retry", "--status", "cancelled", "--host", host], env=_env(db))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: host must be host or host:port"), lines
    with TaskCenter(f"sqlite:///{db}", business="shop") as tc:
        assert tc.list_tasks(status=["pending"])[0][0].business_id == "live"
        assert len(tc.list_tasks(status=["pending"])[0]) == 1


def test_bulk_retry_by_an_empty_business_is_refused_not_taken_for_every_business(tmp_path: Path) -> None:
    """Before, ``taskcenter retry --business "$UNSET"`` retried the failed tasks of every business."""
    db = tmp_path / "t.db"
    _seed(db).close()
    result = runner.invoke(app, ["retry", "--status", "cancelled", "--business", ""], env=_env(db))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["error: no business system ''"]
    with TaskCenter(f"sqlite:///{db}", business="shop") as tc:
        assert len(tc.list_tasks(status=["cancelled"], limit=100)[0]) == 12


def test_purge_deletes_only_tasks_finished_before_the_cutoff(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    _seed(db).close()
    engine = sa.create_engine(f"sqlite:///{db}")
    old = datetime.now(UTC) - timedelta(days=100)
    with engine.begin() as conn:
        conn.execute(
            sa.update(tasks).where(tasks.c.business_id.in_(["k0", "k1", "k2"])).values(finished_at=old)
        )
    result = runner.invoke(app, ["purge", "--older-than", "90d", "--yes"], env=_env(db))
    assert result.exit_code == 0, result.output
    assert "purged 3 finished tasks" in result.stdout
    with engine.connect() as conn:
        left = {r.business_id for r in conn.execute(sa.select(tasks.c.business_id))}
    engine.dispose()
    assert left == {f"k{i}" for i in range(3, 12)} | {"live"}


def test_purge_rejects_a_duration_it_cannot_read(tmp_path: Path) -> None:
    result = runner.invoke(app, ["purge", "--older-than", "3x"], env=_env(tmp_path / "t.db"))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("age", ["nand", "infd", "1e400d", "9" * 5000 + "d", "99999999999d", "-5d"])
def test_purge_and_bulk_retry_refuse_durations_no_time_can_be_cut_at(tmp_path: Path, age: str) -> None:
    """NaN, infinite, past year 1 (tracebacks from int() or timedelta) or negative: one line, exit 2."""
    db = tmp_path / "t.db"
    _seed(db).close()
    for args in (["purge", "--older-than", age, "--yes"], ["retry", "--status", "cancelled", "--since", age]):
        result = runner.invoke(app, args, env=_env(db))
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    with sa.create_engine(f"sqlite:///{db}").connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tasks)).scalar_one() == 13
