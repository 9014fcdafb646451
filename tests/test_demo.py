"""``taskcenter demo``: the real command, in-process through Typer's CliRunner and as a process stopped with
SIGINT — its tasks end as scripted, its throw-away database goes (or stays with --keep), the configured one is
never touched."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from taskcenter import demo as demo_module
from taskcenter.cli import app
from taskcenter.demo import SCENARIOS, Scenario

TASKCENTER = str(Path(sys.executable).with_name("taskcenter"))
# What each scenario's tasks end as: status and each attempt's outcome (and status code) as the summary shows them.
EXPECTED = {
    "ok": ("succeeded", 1, "success 200"),
    "scheduled": ("succeeded", 1, "success 200"),
    "flaky": ("succeeded", 2, "server_error 500 → success 200"),
    "throttled": ("succeeded", 2, "rate_limited 429 → success 200"),
    "slow": ("succeeded", 2, "timeout → success 200"),
    "down": ("failed", 3, "server_error 500 → server_error 500 → server_error 500"),
    "gone": ("failed", 1, "stopped 410"),
    "stale-secret": ("failed", 1, "client_error 401"),
    "blocked": ("failed", 1, "blocked"),
}


@pytest.fixture
def place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory whose taskcenter.toml and TASKCENTER_* variables name a database of their own and
    open the SSRF guard wide; temporary directories are made under ``tmp_path / "tmp"``, to be looked at."""
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("TASKCENTER_")]:
        monkeypatch.delenv(name)
    (tmp_path / "taskcenter.toml").write_text(f'database_url = "sqlite:///{tmp_path / "from-toml.db"}"\n')
    monkeypatch.setenv("TASKCENTER_DATABASE_URL", f"sqlite:///{tmp_path / 'configured.db'}")
    monkeypatch.setenv("TASKCENTER_SSRF_GUARD", "false")
    monkeypatch.setenv("TASKCENTER_ALLOW_NETWORKS", "0.0.0.0/0")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    yield tmp_path


def run_demo(*args: str) -> Result:
    return CliRunner().invoke(app, ["demo", *args])


def summary_rows(output: str) -> dict[str, list[str]]:
    """The per-task rows of the summary table, by business_id."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)]
        if cells and cells[0].startswith("demo-"):
            rows[cells[0]] = cells[1:]
    return rows


def test_every_scenario_ends_as_scripted_and_nothing_is_left_behind(place: Path) -> None:
    """Two tasks of each scenario: each ends with the status and attempts its scenario expects; the temporary
    directory is gone; the configured databases (environment, taskcenter.toml) were never created."""
    result = run_demo()
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    rows = summary_rows(result.stdout)
    assert len(rows) == 2 * len(SCENARIOS)
    for business_id, (status, attempts, outcomes, verdict) in rows.items():
        name = business_id.split("-", 2)[2]
        assert (status, int(attempts), outcomes) == EXPECTED[name], business_id
        assert verdict == "as scripted"
    assert f"all {len(rows)} tasks ended as scripted." in result.stdout
    assert "taskcenter serve" in result.stdout
    # What the receiver got: every request it answered carried a valid Standard Webhooks signature.
    requests = re.search(r"(\d+) requests, (\d+) with a valid signature", result.stderr)
    assert requests is not None, result.stderr
    assert requests[1] == requests[2] and int(requests[1]) > 0
    assert list((place / "tmp").iterdir()) == []
    assert not (place / "configured.db").exists()
    assert not (place / "from-toml.db").exists()


def test_keep_leaves_the_database_for_the_task_commands(place: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_demo("--tasks", "3", "--keep")
    assert result.exit_code == 0, result.output
    [kept] = (place / "tmp").iterdir()
    database = kept / "demo.db"
    assert database.is_file()
    assert f"kept the demo database: {database}" in result.stdout
    assert f"TASKCENTER_DATABASE_URL=sqlite:///{database} taskcenter task list" in result.stdout

    monkeypatch.setenv("TASKCENTER_DATABASE_URL", f"sqlite:///{database}")
    listed = CliRunner().invoke(app, ["task", "list"])
    assert listed.exit_code == 0, listed.output
    for business_id in ("demo-001-ok", "demo-002-scheduled", "demo-003-flaky"):
        assert business_id in listed.stdout
    assert not (place / "configured.db").exists()


def test_many_tasks_are_summarised_by_scenario(place: Path) -> None:
    result = run_demo("--tasks", "60")
    assert result.exit_code == 0, result.output
    assert summary_rows(result.stdout) == {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)]
        if cells[0] in EXPECTED and len(cells) == 6:
            name, tasks, status, attempts, outcomes, scripted = cells
            assert (status, int(attempts), outcomes) == EXPECTED[name]
            assert scripted == f"{tasks}/{tasks}"
    assert "all 60 tasks ended as scripted." in result.stdout


def test_a_task_that_ends_otherwise_than_scripted_exits_1_with_one_line(
    place: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script expects a 200 to fail: the demo says which task, and exits 1."""
    wrong = Scenario("ok", "answers 200", "failed", ("success",))
    monkeypatch.setattr(demo_module, "SCENARIOS", (wrong,))
    result = run_demo("--tasks", "2")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: 2 of 2 tasks did not end as scripted, e.g. demo-001-ok: expected failed after success, "
        "got succeeded after success"
    ]
    assert "Traceback" not in result.output
    assert list((place / "tmp").iterdir()) == []


def test_bad_task_counts_are_refused(place: Path) -> None:
    for count in ("0", "1001", "many"):
        result = run_demo("--tasks", count)
        assert result.exit_code == 2, result.output


def test_sigint_stops_it_cleanly_and_removes_the_database(place: Path) -> None:
    """Interrupted while the scheduled tasks still wait: exit 130, one line, no traceback, nothing left."""
    env = {**os.environ, "TMPDIR": str(place / "tmp")}
    proc = subprocess.Popen(
        [TASKCENTER, "demo"], env=env, cwd=place, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        # Once the database holds the tasks, the dispatcher runs; the scheduled ones wait 3 s more.
        while not any((place / "tmp").glob("taskcenter-demo-*/demo.db-wal")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "ended as scripted" not in stdout
    assert stderr.strip().splitlines()[-1] == "error: interrupted: the demo stopped before its tasks finished"
    assert list((place / "tmp").iterdir()) == []
    assert not (place / "configured.db").exists()
