"""Secrets in task headers end to end: encrypted at rest with TASKCENTER_SECRET_KEY (Fernet, with key rotation),
sent in clear to the receiver, and masked wherever they are shown — task and attempt records, the API, the CLI
and the worker's JSON logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from taskcenter.cli import app
from taskcenter.crypto import SecretBox
from taskcenter.runtime import Runtime
from taskcenter.service import Business
from taskcenter.storage.schema import attempts as attempts_table
from taskcenter.storage.schema import tasks as tasks_table
from tests.conftest import make_settings
from tests.processes import WorkerProcess
from tests.receiver import Receiver, Reply
from tests.test_api_support import serving
from tests.test_delivery import running, wait_status

FAST = 600_000


class Secrets:
    """Fresh secret header values and Fernet keys for one test."""

    def __init__(self) -> None:
        self.token = f"tok-{secrets.token_hex(12)}"
        self.api_key = f"key-{secrets.token_hex(12)}"
        self.old_key = Fernet.generate_key().decode()
        self.new_key = Fernet.generate_key().decode()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "X-API-Key": self.api_key, "X-Trace": "trace-1"}

    @property
    def values(self) -> tuple[str, ...]:
        """Everything that must never be shown or stored in clear."""
        return (self.token, self.api_key, self.old_key, self.new_key)

    def assert_absent(self, text: str) -> None:
        for value in self.values:
            assert value not in text


def assert_masked(headers: dict[str, str]) -> None:
    """Sensitive values masked (an authorization header may keep its scheme), the others shown as sent."""
    assert headers["Authorization"] in ("***", "Bearer ***")
    assert headers["X-API-Key"] == "***"
    assert headers["X-Trace"] == "trace-1"


@pytest.fixture
def s() -> Secrets:
    return Secrets()


@contextlib.asynccontextmanager
async def keyed(db_url: str, keys: str) -> AsyncIterator[Runtime]:
    """A runtime whose TASKCENTER_SECRET_KEY is ``keys`` (comma-separated, the first one encrypts)."""
    rt = Runtime(make_settings(db_url, secret_key=keys))
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


async def create(rt: Runtime, receiver: Receiver, s: Secrets, business_id: str = "k") -> tuple[Business, str]:
    biz = await rt.service.ensure_business("shop", rate_limit_per_minute=FAST)
    task = await rt.service.create_task(
        biz,
        {"business_id": business_id, "url": receiver.url("/hook"), "headers": s.headers, "json": {"a": 1}},
    )
    return biz, task.id


async def raw_rows(rt: Runtime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The tasks and attempts rows exactly as stored."""
    async with rt.db.read() as conn:
        task_rows = [dict(r) for r in (await conn.execute(sa.select(tasks_table))).mappings()]
        attempt_rows = [dict(r) for r in (await conn.execute(sa.select(attempts_table))).mappings()]
    return task_rows, attempt_rows


async def test_sensitive_headers_are_stored_encrypted_and_sent_in_clear(
    db_url: str, receiver: Receiver, s: Secrets
) -> None:
    async with keyed(db_url, s.new_key) as rt:
        biz, task_id = await create(rt, receiver, s)
        [row], _ = await raw_rows(rt)
        stored = row["headers"]
        assert stored["Authorization"].startswith("fernet:") and stored["X-API-Key"].startswith("fernet:")
        assert stored["X-Trace"] == "trace-1"
        s.assert_absent(json.dumps(stored))
        assert SecretBox.from_setting(s.new_key).open_headers(stored) == s.headers
        async with running(rt):
            [request] = await receiver.wait_for(1, "/hook", timeout=10)
            await wait_status(rt, biz, task_id, "succeeded")
        tasks, attempts = await raw_rows(rt)
    assert request.headers["Authorization"] == f"Bearer {s.token}"
    assert request.headers["X-API-Key"] == s.api_key
    s.assert_absent(json.dumps([tasks, attempts], default=str))


async def test_task_and_attempt_records_show_sensitive_headers_masked(
    db_url: str, receiver: Receiver, s: Secrets
) -> None:
    async with keyed(db_url, s.new_key) as rt:
        biz, task_id = await create(rt, receiver, s)
        async with running(rt):
            await wait_status(rt, biz, task_id, "succeeded")
        task = await rt.service.get_task(biz, task_id)
        [attempt] = await rt.service.attempts(biz, task_id)
    assert task.request is not None
    assert_masked(task.request["headers"])
    s.assert_absent(json.dumps(task.to_dict()))
    assert attempt.request is not None
    sent = attempt.request["headers"]
    assert (sent["Authorization"], sent["X-API-Key"], sent["X-Trace"]) == ("Bearer ***", "***", "trace-1")
    s.assert_absent(json.dumps(attempt.to_dict()))


async def test_api_shows_sensitive_headers_masked(db_url: str, receiver: Receiver, s: Secrets) -> None:
    async with serving(db_url, secret_key=s.new_key) as api:
        key = await api.business_key("shop", rate_limit_per_minute=FAST)
        body = {"business_id": "k", "url": receiver.url("/hook"), "headers": s.headers, "json": {"a": 1}}
        created = await api.client.post("/tasks", json=body, headers=key)
        assert created.status_code == 201
        task_id = created.json()["id"]
        async with running(api.runtime):
            await receiver.wait_for(1, "/hook", timeout=10)
            for _ in range(100):
                shown = await api.client.get(f"/tasks/{task_id}", headers=key)
                if shown.json()["status"] == "succeeded":
                    break
                await asyncio.sleep(0.05)
        tried = await api.client.get(f"/tasks/{task_id}/attempts", headers=key)
    assert (shown.status_code, tried.status_code) == (200, 200)
    for response in (created, shown, tried):
        s.assert_absent(response.text)
    assert_masked(created.json()["request"]["headers"])
    assert_masked(shown.json()["request"]["headers"])
    [attempt] = tried.json()["attempts"]
    assert attempt["request"]["headers"]["Authorization"] == "Bearer ***"


async def test_cli_shows_sensitive_headers_masked(db_url: str, receiver: Receiver, s: Secrets) -> None:
    async with keyed(db_url, s.new_key) as rt:
        biz, task_id = await create(rt, receiver, s)
        async with running(rt):
            await wait_status(rt, biz, task_id, "succeeded")
    env = {"TASKCENTER_DATABASE_URL": db_url, "TASKCENTER_SECRET_KEY": s.new_key}
    runner = CliRunner()
    for args in (["task", "show", task_id, "--attempts", "--output-json"], ["task", "show", task_id, "-a"]):
        result = await asyncio.to_thread(runner.invoke, app, args, env=env)
        assert result.exit_code == 0, result.output
        s.assert_absent(result.output)
    shown = json.loads(
        (
            await asyncio.to_thread(runner.invoke, app, ["task", "show", task_id, "--output-json"], env=env)
        ).stdout
    )
    assert_masked(shown["request"]["headers"])


@pytest.mark.parametrize("order", ["old_first", "new_first"])
async def test_rows_sealed_with_the_old_key_open_during_a_rotation(
    db_url: str, receiver: Receiver, s: Secrets, order: str
) -> None:
    """TASKCENTER_SECRET_KEY holds both keys while rows are re-encrypted: either order opens old rows; the
    first key seals new ones."""
    async with keyed(db_url, s.old_key) as rt:
        _, old_task = await create(rt, receiver, s, "before")
    keys = f"{s.old_key},{s.new_key}" if order == "old_first" else f"{s.new_key},{s.old_key}"
    async with keyed(db_url, keys) as rt:
        biz, new_task = await create(rt, receiver, s, "after")
        async with running(rt):
            await receiver.wait_for(2, "/hook", timeout=10)
            for task_id in (old_task, new_task):
                await wait_status(rt, biz, task_id, "succeeded")
        rows, _ = await raw_rows(rt)
    assert {r.headers["Authorization"] for r in receiver.requests} == {f"Bearer {s.token}"}
    sealed_after = next(r["headers"] for r in rows if r["business_id"] == "after")
    first = s.old_key if order == "old_first" else s.new_key
    assert SecretBox.from_setting(first).open_headers(sealed_after) == s.headers


async def test_worker_json_logs_never_contain_the_secrets(
    db_url: str, receiver: Receiver, s: Secrets
) -> None:
    """A real ``taskcenter worker`` at DEBUG level: success, a 503 retried, a refused connection, a blocked URL."""
    receiver.script("/flaky", Reply(status=503))
    async with keyed(db_url, s.new_key) as rt:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=FAST)
        retry = {"strategy": "intervals", "intervals": [0.1]}
        targets = {
            "ok": receiver.url("/hook"),
            "flaky": receiver.url("/flaky"),
            "refused": "http://127.0.0.1:9/closed",
            "blocked": f"http://localhost:{receiver.port}/denied",  # the worker denies the name
        }
        ids = {}
        for name, url in targets.items():
            task = await rt.service.create_task(
                biz, {"business_id": name, "url": url, "headers": s.headers, "retry": retry, "timeout": 2}
            )
            ids[name] = task.id
        proc = WorkerProcess(db_url, secret_key=s.new_key, log_level="DEBUG", deny_hosts="localhost")
        try:
            for task_id in ids.values():
                await wait_status(rt, biz, task_id, "succeeded", "failed", timeout=20)
        finally:
            code = await asyncio.to_thread(proc.terminate)
        output = proc.output()  # the worker writes to a log file, never a pipe that could fill up
        assert (await rt.service.get_task(biz, ids["blocked"])).outcome == "blocked"
    assert code == 0, output
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert records, output  # the worker did log, as JSON
    s.assert_absent(output)
    assert {r.headers["Authorization"] for r in receiver.requests} == {f"Bearer {s.token}"}
