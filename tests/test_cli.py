"""The ``taskcenter`` command line, driven through Typer's CliRunner against a real SQLite file, and
``taskcenter worker`` as a real process stopped with SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner, Result

from taskcenter import RetryPolicy, Task, TaskCenter
from taskcenter.cli import app
from taskcenter.config import load_settings
from taskcenter.errors import ValidationError
from tests.conftest import make_settings
from tests.receiver import Receiver, Reply
from tests.test_library import wait_status, working

TASKCENTER = str(Path(sys.executable).with_name("taskcenter"))
UNKNOWN = "6f1c1d1e-0000-4000-8000-000000000000"


class Cli:
    """Runs ``taskcenter …`` in-process with the environment pointing at one SQLite file."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.env = {"TASKCENTER_DATABASE_URL": db_url, "TASKCENTER_ALLOW_NETWORKS": "127.0.0.0/8"}
        self.runner = CliRunner()

    def __call__(self, *args: str, **env: str) -> Result:
        return self.runner.invoke(app, list(args), env={**self.env, **env})

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}"
        return result.stdout

    def center(self, **overrides: Any) -> TaskCenter:
        """A library TaskCenter on the same file, for setting up what the CLI then reads."""
        return TaskCenter(settings=make_settings(self.db_url, **overrides), business="shop")


def one_line_error(result: Result, code: int) -> str:
    """Assert a failure that printed exactly one ``error:`` line on stderr and no traceback."""
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return lines[0]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """A CLI on a fresh SQLite file where business ``shop`` exists; run from an empty directory so no stray
    ./taskcenter.toml is read."""
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("TASKCENTER_")]:
        monkeypatch.delenv(name)
    runner = Cli(f"sqlite:///{tmp_path / 'cli.db'}")
    with runner.center():
        pass  # entering starts it: schema migrated, business "shop" registered
    yield runner


def create(cli: Cli, business_id: str, *extra: str) -> dict[str, Any]:
    out = cli.ok(
        "task", "create", "http://127.0.0.1:9/hook", "-b", "shop", "-k", business_id, "--output-json", *extra
    )
    data: dict[str, Any] = json.loads(out)
    return data


# -- help -------------------------------------------------------------------------------------------------


def _command_paths() -> list[list[str]]:
    def walk(cmd: Any, path: list[str]) -> Iterator[list[str]]:
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(get_command(app), []))


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "taskcenter")
def test_every_command_has_help(path: list[str]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout and "--help" in result.stdout


@pytest.mark.parametrize("path", _command_paths(), ids=lambda p: " ".join(p) or "taskcenter")
def test_every_option_says_what_it_is_for(path: list[str]) -> None:
    """``task create --method`` and ``--priority`` and ``task list --business`` had no help text."""
    command = get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    bare = [
        p.opts[0] for p in command.params if p.param_type_name == "option" and not getattr(p, "help", None)
    ]
    assert bare == [], f"taskcenter {' '.join(path)}: {bare} without help"


def test_rotate_key_help_names_the_setting_its_grace_period_defaults_to() -> None:
    """It said "(default 24)", but TASKCENTER_KEY_GRACE_HOURS sets the default."""
    result = CliRunner().invoke(app, ["business", "rotate-key", "--help"], env={"COLUMNS": "200"})
    line = next(x for x in result.stdout.splitlines() if "--grace-hours" in x)
    assert "TASKCENTER_KEY_GRACE_HOURS" in line and "default 24)" not in line


def test_the_task_commands_the_design_names_exist() -> None:
    paths = {" ".join(p) for p in _command_paths()}
    assert {
        "serve",
        "worker",
        "migrate",
        "task create",
        "task show",
        "task list",
        "task cancel",
        "task retry",
    } <= paths


def test_version_is_printed() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("taskcenter ")


# -- migrate ----------------------------------------------------------------------------------------------


def test_migrate_builds_a_new_database_then_reports_it_is_current(tmp_path: Path) -> None:
    runner = Cli(f"sqlite:///{tmp_path / 'fresh.db'}")
    first = runner.ok("migrate")
    assert first.startswith("schema migrated from nothing to ")
    head = first.split()[-1]
    assert runner.ok("migrate").strip() == f"schema already at {head}"


def test_migrate_and_worker_on_a_schema_from_a_newer_release_fail_in_one_line(tmp_path: Path) -> None:
    """Before, both printed Alembic's traceback (``Can't locate revision identified by '9999'``)."""
    path = tmp_path / "newer.db"
    runner = Cli(f"sqlite:///{path}")
    runner.ok("migrate")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    for command in ("migrate", "worker"):
        line = one_line_error(runner(command), 1)
        assert "schema is at 9999, newer than this taskcenter" in line


# -- task create / show / list / cancel / retry -------------------------------------------------------------


def test_task_create_prints_a_readable_pending_task(cli: Cli) -> None:
    out = cli.ok("task", "create", "http://127.0.0.1:9/hook", "-b", "shop", "-k", "order-1")
    assert "pending" in out and "order-1" in out and "POST http://127.0.0.1:9/hook" in out


def test_task_create_passes_method_json_headers_delay_and_priority(cli: Cli) -> None:
    data = create(cli, "o-1", "-X", "PUT", "--json", '{"a": [1, 2]}', "-H", "X-Trace: abc", "--delay", "60",
                  "--priority", "3")  # fmt: skip
    assert data["status"] == "pending" and data["priority"] == 3
    assert data["request"]["method"] == "PUT" and data["request"]["body"] == '{"a":[1,2]}'
    assert data["request"]["headers"] == {"X-Trace": "abc"}
    assert data["scheduled_at"] is not None


def test_task_show_by_uuid_and_by_numeric_id_agree(cli: Cli) -> None:
    data = create(cli, "o-1")
    by_uuid = json.loads(cli.ok("task", "show", data["id"], "--output-json"))
    by_row = json.loads(cli.ok("task", "show", str(data["row_id"]), "--output-json"))
    assert by_uuid == by_row and by_uuid["id"] == data["id"] and by_uuid["business_code"] == "shop"
    human = cli.ok("task", "show", str(data["row_id"]))
    assert data["id"] in human and "pending" in human


def test_task_show_attempts_lists_each_try(cli: Cli) -> None:
    async def deliver() -> Task:
        async with Receiver() as receiver, cli.center() as tc:
            receiver.script("/flaky", Reply(status=503), Reply(status=200))
            task = await tc.acreate_task(
                "POST", receiver.url("/flaky"), business_id="o-1", retry=RetryPolicy.from_intervals([0.05])
            )
            async with working(tc):
                return await wait_status(tc, task.id, "succeeded")

    task = asyncio.run(deliver())
    data = json.loads(cli.ok("task", "show", task.id, "--attempts", "--output-json"))
    assert [(a["number"], a["outcome"]) for a in data["attempts_list"]] == [
        (1, "server_error"),
        (2, "success"),
    ]
    human = cli.ok("task", "show", task.id, "-a")
    assert "server_error" in human and "503" in human and "success" in human


def test_task_list_filters_by_status_and_business(cli: Cli) -> None:
    first, second = create(cli, "a"), create(cli, "b")
    cli.ok("task", "cancel", first["id"])
    out = cli.ok("task", "list", "--status", "cancelled")
    assert str(first["row_id"]) in out.split() and str(second["row_id"]) not in out.split()
    out = cli.ok("task", "list", "--status", "pending,cancelled", "--business", "shop")
    assert {str(first["row_id"]), str(second["row_id"])} <= set(out.split())


def test_task_list_filters_by_host(cli: Cli) -> None:
    create(cli, "a")
    assert "127.0.0.1:9" in cli.ok("task", "list", "--host", "127.0.0.1:9")
    assert "a" not in cli.ok("task", "list", "--host", "example.com:443").split()


def test_task_list_filters_by_a_host_without_a_port(cli: Cli) -> None:
    """Before, ``--host 127.0.0.1`` listed nothing: hosts are stored as host:port."""
    create(cli, "a")
    assert "127.0.0.1:9" in cli.ok("task", "list", "--host", "127.0.0.1")
    assert "127.0.0.1:9" not in cli.ok("task", "list", "--host", "127.0.0.2")


@pytest.mark.parametrize("host", ["", "http://127.0.0.1:9/hook", "127.0.0.1:x"])
def test_task_list_by_a_host_no_task_can_have_is_one_line(cli: Cli, host: str) -> None:
    line = one_line_error(cli("task", "list", "--host", host), 1)
    assert "host:port" in line


@pytest.mark.parametrize("command", [["task", "list"], ["stats"], ["audit", "list"]])
def test_an_empty_business_is_one_line_not_every_business(cli: Cli, command: list[str]) -> None:
    """Before, ``--business ""`` (an unset variable) silently meant every business."""
    line = one_line_error(cli(*command, "--business", ""), 1)
    assert line == "error: no business system ''"


def test_task_list_pages_with_a_cursor(cli: Cli) -> None:
    rows = [create(cli, f"k{i}")["row_id"] for i in range(3)]
    first = cli.ok("task", "list", "--limit", "2")
    assert "more: --cursor " in first
    cursor = first.rsplit("--cursor ", 1)[1].strip()
    rest = cli.ok("task", "list", "--limit", "2", "--cursor", cursor)
    assert str(rows[0]) in rest.split() and "more:" not in rest


def test_task_cancel_then_retry_like_the_symfony_command(cli: Cli) -> None:
    data = create(cli, "o-1")
    assert cli.ok("task", "cancel", data["id"]).strip() == f"task {data['id']} is cancelled"
    out = cli.ok("task", "retry", str(data["row_id"]))
    assert out.startswith(f"task {data['id']} is pending again")
    assert json.loads(cli.ok("task", "show", data["id"], "--output-json"))["status"] == "pending"


def test_task_cancel_takes_several_ids_and_cancels_all_or_none(cli: Cli) -> None:
    first, second, third = create(cli, "m-1"), create(cli, "m-2"), create(cli, "m-3")
    out = cli.ok("task", "cancel", first["id"], str(second["row_id"]))
    assert out.splitlines() == [f"task {first['id']} is cancelled", f"task {second['id']} is cancelled"]
    assert "cannot be cancelled" in one_line_error(cli("task", "cancel", third["id"], first["id"]), 1)
    assert json.loads(cli.ok("task", "show", third["id"], "--output-json"))["status"] == "pending"


def test_stats_prints_the_system_figures_and_one_business_s(cli: Cli) -> None:
    """DESIGN's ``taskcenter stats``: the figures ``GET /stats`` gives, or ``GET /businesses/{code}/stats``'s."""
    first = create(cli, "s-1")
    create(cli, "s-2")
    cli.ok("task", "cancel", first["id"])
    every = json.loads(cli.ok("stats", "--json"))
    assert every["business_code"] is None and every["businesses"] == 1
    assert every["counts"]["pending"] == 1 and every["counts"]["cancelled"] == 1 and every["total"] == 2
    one = json.loads(cli.ok("stats", "--business", "shop", "--window-hours", "1", "--json"))
    assert one["business_code"] == "shop" and one["window_hours"] == 1.0 and one["created"] == 2
    human = cli.ok("stats")
    assert "pending 1" in human and "cancelled 1" in human and "total 2" in human


def test_stats_of_an_unknown_business_is_one_line(cli: Cli) -> None:
    assert "nope" in one_line_error(cli("stats", "--business", "nope"), 1)


def test_config_show_masks_secrets(cli: Cli) -> None:
    result = cli("config", "show", TASKCENTER_OPERATOR_KEY="very-secret")
    assert result.exit_code == 0
    shown = json.loads(result.stdout)
    assert shown["operator_key"] == "***" and "very-secret" not in result.stdout


# -- errors: one line on stderr, non-zero exit --------------------------------------------------------------


def test_unknown_task_id_is_one_line_and_exit_1(cli: Cli) -> None:
    for command in ("show", "cancel", "retry"):
        line = one_line_error(cli("task", command, UNKNOWN), 1)
        assert UNKNOWN in line


def test_numeric_unknown_task_id_is_one_line_and_exit_1(cli: Cli) -> None:
    one_line_error(cli("task", "show", "987654"), 1)


@pytest.mark.parametrize("ref", ["99999999999999999999999", "9223372036854775808", "\u00b2", "1" * 5000])
def test_task_id_of_digits_no_row_can_have_is_one_line_and_exit_1(cli: Cli, ref: str) -> None:
    # Past BIGINT, a superscript digit, more digits than int() converts: no task, not a traceback.
    for command in ("show", "cancel", "retry"):
        one_line_error(cli("task", command, ref), 1)


def test_task_id_in_non_ascii_digits_is_not_a_row_id(cli: Cli) -> None:
    create(cli, "d-1")  # row 1
    one_line_error(cli("task", "show", "\u0661"), 1)  # ARABIC-INDIC DIGIT ONE


def test_task_id_that_looks_like_markup_is_printed_as_given(cli: Cli) -> None:
    line = one_line_error(cli("task", "show", "[/bold]"), 1)
    assert "[/bold]" in line


def test_long_error_stays_on_one_line(cli: Cli) -> None:
    code = "a-business-code-long-enough-to-push-the-message-past-eighty-columns"
    line = one_line_error(cli("task", "create", "http://127.0.0.1:9/", "-b", code, "-k", "x"), 1)
    assert code in line


def test_invalid_transition_is_one_line_and_exit_1(cli: Cli) -> None:
    data = create(cli, "o-1")
    assert "cannot be retried" in one_line_error(cli("task", "retry", data["id"]), 1)
    cli.ok("task", "cancel", data["id"])
    assert "cannot be cancelled" in one_line_error(cli("task", "cancel", data["id"]), 1)


def test_invalid_input_names_the_field(cli: Cli) -> None:
    line = one_line_error(cli("task", "create", "ftp://example.com/", "-b", "shop", "-k", "x"), 1)
    assert "url" in line


def test_bad_json_body_exits_2(cli: Cli) -> None:
    assert "--json" in one_line_error(cli("task", "create", "http://127.0.0.1:9/", "-b", "shop", "-k", "x",
                                          "--json", "{nope"), 2)  # fmt: skip


@pytest.mark.parametrize("body", ["9" * 5000, "[" * 100_000], ids=["5000-digit-number", "nested-too-deep"])
def test_json_body_python_cannot_parse_exits_2(cli: Cli, body: str) -> None:
    assert "--json" in one_line_error(cli("task", "create", "http://127.0.0.1:9/", "-b", "shop", "-k", "x",
                                          "--json", body), 2)  # fmt: skip


def test_bad_header_exits_2(cli: Cli) -> None:
    one_line_error(cli("task", "create", "http://127.0.0.1:9/", "-b", "shop", "-k", "x", "-H", "NoColon"), 2)


def test_config_file_that_is_not_toml_is_one_line(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = [\n")
    line = one_line_error(cli("task", "list", "--config", str(bad)), 2)
    assert "bad.toml" in line


def test_config_file_with_a_bad_value_names_the_setting(cli: Cli, tmp_path: Path) -> None:
    bad = tmp_path / "taskcenter.toml"
    bad.write_text('concurrency = "lots"\n')
    assert "concurrency" in one_line_error(cli("task", "list", "-c", str(bad)), 2)


@pytest.mark.parametrize("text", ["retention = 30\n", "[taskcenter]\nport = 9000\n"], ids=["typo", "table"])
def test_a_config_file_key_that_is_no_setting_is_refused_not_ignored(
    cli: Cli, tmp_path: Path, text: str
) -> None:
    """Before, taskcenter.toml's unknown keys were dropped in silence: the setting meant kept its default."""
    (tmp_path / "taskcenter.toml").write_text(text)
    line = one_line_error(cli("config", "show"), 2)
    assert "taskcenter.toml" in line and text.strip("[").split()[0].rstrip("]") in line
    (tmp_path / "taskcenter.toml").write_text("retention_days = 30\n")
    assert json.loads(cli.ok("config", "show"))["retention_days"] == 30


def test_missing_config_file_is_one_line(cli: Cli, tmp_path: Path) -> None:
    one_line_error(cli("task", "list", "-c", str(tmp_path / "nowhere.toml")), 2)


@pytest.mark.parametrize(
    "command",
    [
        ["business", "list"],
        ["host", "list"],
        ["audit", "list"],
        ["operator", "create-key"],
        ["config", "show"],
    ],
    ids=" ".join,
)
def test_a_config_file_that_does_not_exist_is_refused_by_every_command(
    cli: Cli, tmp_path: Path, command: list[str]
) -> None:
    """The business, host, audit and operator commands went on with the defaults when --config named no file."""
    line = one_line_error(cli(*command, "-c", str(tmp_path / "nowhere.toml")), 2)
    assert "nowhere.toml" in line and "does not exist" in line


@pytest.mark.parametrize(
    "command",
    [["business", "list"], ["host", "list"], ["audit", "list"], ["task", "list"], ["backup", "copy.db"]],
    ids=" ".join,
)
def test_a_config_file_that_is_not_text_is_one_line_for_every_command(
    cli: Cli, tmp_path: Path, command: list[str]
) -> None:
    """The business, host and audit commands printed a UnicodeDecodeError traceback for a config file that is not
    UTF-8; the task and backup commands each caught it themselves."""
    config = tmp_path / "binary.toml"
    config.write_bytes(b"\xff\xfe\x00not text")
    line = one_line_error(cli(*command, "-c", str(config)), 2)
    assert "binary.toml" in line and "cannot be read" in line


def test_a_config_file_that_does_not_exist_is_refused_by_the_library(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"nowhere\.toml does not exist"):
        load_settings(tmp_path / "nowhere.toml")


def test_a_refused_setting_is_said_in_our_words_not_pydantic_s(cli: Cli) -> None:
    """``setting database_url: Value error, database_url must be …``: pydantic's prefix, the name twice."""
    line = one_line_error(cli("task", "list", TASKCENTER_DATABASE_URL="mysql://x/y"), 2)
    assert line == "error: setting database_url: must be a sqlite:// or postgresql:// URL"
    line = one_line_error(cli("config", "show", TASKCENTER_SMTP_HOST="mail.example.com"), 2)
    assert "Value error" not in line and "smtp_from" in line


@pytest.mark.parametrize(
    "command",
    [
        ["task", "list"],
        ["task", "show", "1"],
        ["task", "cancel", "1"],
        ["task", "retry", "1"],
        ["task", "create", "http://127.0.0.1:9/", "-b", "shop", "-k", "x"],
        ["retry"],
        ["purge", "--older-than", "1d", "--yes"],
        ["stats"],
        ["business", "list"],
        ["business", "show", "shop"],
        ["business", "disable", "shop"],
        ["business", "rotate-key", "shop"],
        ["audit", "list"],
    ],
    ids=" ".join,
)
def test_a_sqlite_database_that_does_not_exist_is_named_not_made_empty(
    cli: Cli, tmp_path: Path, command: list[str]
) -> None:
    """A mistyped path made its directories and a fresh empty database: ``task list`` showed no tasks."""
    missing = tmp_path / "typo" / "taskcenter.db"
    line = one_line_error(cli(*command, TASKCENTER_DATABASE_URL=f"sqlite:///{missing}"), 1)
    assert f"no database at {missing}" in line and "taskcenter migrate" in line
    assert not missing.parent.exists()


@pytest.mark.parametrize(
    "command",
    [["migrate"], ["business", "create", "payments"], ["operator", "create-key"]],
    ids=" ".join,
)
def test_commands_that_set_up_a_sqlite_database_still_make_it(
    cli: Cli, tmp_path: Path, command: list[str]
) -> None:
    fresh = tmp_path / "new" / "taskcenter.db"
    result = cli(*command, TASKCENTER_DATABASE_URL=f"sqlite:///{fresh}")
    assert result.exit_code == 0, result.output
    assert fresh.is_file()


def test_unreachable_database_is_one_line(cli: Cli) -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    result = cli("task", "list", TASKCENTER_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none")
    one_line_error(result, 1)


def test_a_database_port_that_never_answers_fails_in_one_line_within_seconds(cli: Cli) -> None:
    """A listener on loopback that accepts and never speaks (a wrong port, a stuck proxy): asyncpg's own 60 s
    connect timeout held every command for over a minute, then said only ``TimeoutError``."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        started = time.monotonic()
        result = cli("task", "list", TASKCENTER_DATABASE_URL=f"postgresql://nobody@127.0.0.1:{port}/none")
        elapsed = time.monotonic() - started
    line = one_line_error(result, 1)
    assert f"127.0.0.1:{port}" in line and "did not answer within 10 s" in line, line
    assert elapsed < 30


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TASKCENTER_BREAKER_COOLDOWN_S", "1e308"),  # an opened circuit overflowed the claim
        ("TASKCENTER_HOST_RATE_PER_SECOND", "inf"),
        ("TASKCENTER_KEY_GRACE_HOURS", "1e300"),  # every rotation answered 422 "grace_hours must be …"
        ("TASKCENTER_RETENTION_DAYS", "999999999"),  # the purge's cutoff overflowed timedelta
    ],
)
def test_settings_past_what_the_api_allows_are_refused_at_load(cli: Cli, name: str, value: str) -> None:
    assert name.removeprefix("TASKCENTER_").lower() in one_line_error(cli("task", "list", **{name: value}), 2)


def test_an_unknown_log_level_or_format_names_the_setting() -> None:
    # Accepted at load, LOUD then failed in setup_logging: 'taskcenter serve' ended with a ValueError traceback.
    for name, value in (("log_level", "LOUD"), ("log_format", "xml")):
        with pytest.raises(ValidationError, match=name):
            load_settings(None, **{name: value})
    assert load_settings(None, log_level="debug", log_format="JSON").log_level == "DEBUG"


def test_a_structured_setting_that_is_not_json_names_the_setting(cli: Cli) -> None:
    # pydantic-settings decodes TASKCENTER_DEFAULT_RETRY as JSON itself and raised SettingsError: a traceback.
    assert "default_retry" in one_line_error(cli("task", "list", TASKCENTER_DEFAULT_RETRY="{"), 2)


def test_database_url_that_does_not_parse_names_the_setting(cli: Cli) -> None:
    result = cli("task", "list", TASKCENTER_DATABASE_URL="postgresql://nobody@[::1/none")
    assert "database_url" in one_line_error(result, 2)


def test_libpq_sslmode_in_the_database_url_is_understood(cli: Cli) -> None:
    # asyncpg calls it ssl: passed on as sslmode it was an unexpected keyword (a TypeError traceback).
    result = cli(
        "task", "list", TASKCENTER_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none?sslmode=disable"
    )
    assert "Connection refused" in one_line_error(result, 1)


def test_an_unknown_parameter_in_a_postgresql_url_is_named(cli: Cli) -> None:
    # Passed on to asyncpg.connect as a keyword: 'TypeError: connect() got an unexpected keyword argument'.
    result = cli("task", "list", TASKCENTER_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none?colour=blue")
    assert "colour" in one_line_error(result, 1)


def test_limit_out_of_range_is_a_usage_error(cli: Cli) -> None:
    assert cli("task", "list", "--limit", "0").exit_code == 2


def test_main_turns_a_setting_error_into_one_line(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    """``main()`` (the console script) prints a TaskCenterError raised outside a command as one line."""
    from taskcenter import cli as cli_module
    from taskcenter.errors import ConfigError

    def broken() -> None:
        raise ConfigError("database_url must be a sqlite:// or postgresql:// URL")

    original = cli_module.app
    cli_module.app = broken
    try:
        with pytest.raises(SystemExit) as info:
            cli_module.main()
    finally:
        cli_module.app = original
    assert info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: database_url must be a sqlite:// or postgresql:// URL"
    ]


# -- output read by a reader that stops early ----------------------------------------------------------------


def _piped(cli: Cli, *args: str, read_lines: int = 0) -> tuple[int, list[str], str]:
    """Run ``taskcenter *args`` as a real process writing into a pipe whose reader reads ``read_lines`` lines
    and closes its end (``| head -1``; 0 is ``| true``, closed before anything is written). Returns the exit
    status, the lines read and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCENTER_")}
    proc = subprocess.Popen(
        [TASKCENTER, *args], env={**env, **cli.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines = [proc.stdout.readline().decode() for _ in range(read_lines)]
    proc.stdout.close()
    try:
        stderr = proc.stderr.read().decode()
        return proc.wait(timeout=60), lines, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "args",
    [
        ["host", "show", "127.0.0.1:9"],
        ["task", "list"],
        ["task", "show", "1", "--output-json"],
        ["business", "list", "--json"],
        ["config", "show"],
        ["--help"],
    ],
    ids=" ".join,
)
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly_with_status_0(
    cli: Cli, args: list[str]
) -> None:
    """Before, ``taskcenter host show … | head -1`` exited 1 (Rich's reaction to the broken pipe)."""
    create(cli, "a")
    code, _, stderr = _piped(cli, *args)
    assert (code, stderr) == (0, "")


def test_head_1_gets_the_first_line_and_the_command_exits_0_without_a_traceback(cli: Cli) -> None:
    """The writer is cut off mid-output: the table is larger than the pipe's 64 KiB buffer, so the reader closes
    while it is being written, and the ``more: --cursor`` line after it meets the closed pipe."""
    with cli.center() as tc:
        for n in range(300):
            tc.create_task("POST", f"http://127.0.0.1:9/{'x' * 300}", business_id=f"k{n}", delay=3600)
    code, lines, stderr = _piped(cli, "task", "list", "--limit", "200", read_lines=1)
    assert lines[0].split()[:2] == ["id", "┃"]
    assert (code, stderr) == (0, "")


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_a_command_started_with_a_standard_stream_closed_runs_and_does_not_abort(
    cli: Cli, closed: int
) -> None:
    """Before, ``taskcenter task list >&-`` aborted (SIGABRT, a core dump): the database file took the free
    descriptor 1, and the event loop (uvloop) asserts that it never closes one of 0, 1 and 2."""
    create(cli, "a")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCENTER_")}
    done = subprocess.run(
        [TASKCENTER, "task", "list"],
        env={**env, **cli.env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if closed != 1 else None,
        stderr=subprocess.PIPE if closed != 2 else None,
        preexec_fn=lambda: os.close(closed),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# -- a real worker process --------------------------------------------------------------------------------


async def test_worker_process_delivers_and_exits_0_on_sigterm_within_the_grace_period(
    tmp_path: Path, receiver: Receiver
) -> None:
    db_url = f"sqlite:///{tmp_path / 'worker.db'}"
    async with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
        first = await tc.acreate_task("POST", receiver.url("/first"), business_id="w-1")
        # The second request is still in flight when SIGTERM arrives: the grace period lets it finish.
        receiver.script("/slow", Reply.delayed(0.7))
        slow = await tc.acreate_task("POST", receiver.url("/slow"), business_id="w-2", delay=0.5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCENTER_")}
    env.update(
        TASKCENTER_DATABASE_URL=db_url,
        TASKCENTER_ALLOW_NETWORKS="127.0.0.0/8",
        TASKCENTER_SHUTDOWN_GRACE_S="3",
        TASKCENTER_POLL_INTERVAL_S="0.5",
        TASKCENTER_LOG_FORMAT="json",
    )
    proc = await asyncio.create_subprocess_exec(
        TASKCENTER,
        "worker",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await receiver.wait_for(1, "/first", timeout=20)
        await receiver.wait_for(1, "/slow", timeout=10)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _out, err = await asyncio.wait_for(proc.communicate(), timeout=15)
        took = time.monotonic() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert took < 3 + 2, f"stopping took {took:.1f}s, grace is 3s"
    assert "Traceback" not in err.decode()
    async with TaskCenter(settings=make_settings(db_url), business="shop") as tc:
        assert (await tc.aget_task(first.id)).status == "succeeded"
        finished = await tc.aget_task(slow.id)
    assert finished.status == "succeeded" and finished.attempts == 1


def test_serve_logs_json_lines_without_alembic_chatter_or_terminal_colour_codes(tmp_path: Path) -> None:
    """Before, every start logged nine Alembic INFO lines (plugins set up, dialect) even on a current schema,
    and uvicorn's lines carried a ``color_message`` field full of ANSI escapes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCENTER_")}
    env.update(
        TASKCENTER_DATABASE_URL=f"sqlite:///{tmp_path / 'serve.db'}",
        TASKCENTER_PORT=str(port),
        TASKCENTER_LOG_FORMAT="json",
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([TASKCENTER, "serve"], cwd=tmp_path, env=env, stdout=sink, stderr=sink)
    try:
        deadline = time.monotonic() + 30
        while "Uvicorn running" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert [line["logger"] for line in lines if line["logger"].startswith("alembic")] == []
    assert [line for line in lines if "color_message" in line] == []
    assert any(line["message"].startswith("schema migrated from nothing to ") for line in lines)
    assert any(line["message"].startswith("Uvicorn running on") for line in lines)


def test_serve_on_a_port_in_use_says_so_and_never_that_it_is_serving(tmp_path: Path) -> None:
    """Before, it printed 'taskcenter … serving on http://127.0.0.1:<port>' and only then failed to bind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCENTER_")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env.update(
            TASKCENTER_DATABASE_URL=f"sqlite:///{tmp_path / 'serve.db'}",
            TASKCENTER_PORT=str(taken.getsockname()[1]),
            TASKCENTER_LOG_FORMAT="json",
        )
        done = subprocess.run(
            [TASKCENTER, "serve"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
    assert done.returncode != 0
    assert "address already in use" in done.stderr
    assert "serving on" not in done.stderr + done.stdout


def test_typer_app_is_the_console_script_entry() -> None:
    from taskcenter import cli as cli_module

    assert isinstance(cli_module.app, typer.Typer) and callable(cli_module.main)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["audit", "list", "--since", "yesterday"], "'--since'"),
        (["task", "list", "--limit", "0"], "'--limit'"),
        (["task", "show"], "'task_id'"),
        (["task", "frobnicate"], "'frobnicate'"),
        (["--no-such-option"], "--no-such-option"),
    ],
)
def test_a_mistyped_command_line_is_one_line_naming_what_is_wrong(args: list[str], names: str) -> None:
    """Before, Click's usage errors printed a usage line, a hint and a boxed panel (five lines and more)."""
    line = one_line_error(CliRunner().invoke(app, args), 2)
    assert names in line
    assert "--help'" in line  # where to look next


def test_no_arguments_still_prints_the_help() -> None:
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 2
    assert "Usage: taskcenter" in result.output and "serve" in result.output
