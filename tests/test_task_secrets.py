"""A task whose sealed header values TASKCENTER_SECRET_KEY cannot open is held unsent, not charged: no request (never
with the header missing or still sealed), no attempt, the reason in ``last_error`` and under ``held`` in the
figures; a dispatcher that starts with the key back in the list sends it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from taskcenter.cli import app
from taskcenter.storage.schema import attempts as attempts_table
from taskcenter.storage.schema import tasks as tasks_table
from tests.receiver import Receiver
from tests.test_api_support import OPERATOR, serving
from tests.test_delivery import running, wait_status
from tests.test_secrets_e2e import FAST, Secrets, keyed

HELD = "task:sealed_headers"


@pytest.fixture
def s() -> Secrets:
    return Secrets()


async def task_row(db: Any, task_id: str) -> dict[str, Any]:
    async with db.read() as conn:
        row = (
            (await conn.execute(sa.select(tasks_table).where(tasks_table.c.uuid == task_id))).mappings().one()
        )
        tried = (
            await conn.execute(
                sa.select(sa.func.count())
                .select_from(attempts_table)
                .where(attempts_table.c.task_id == row["id"])
            )
        ).scalar()
    return {**row, "attempt_rows": tried}


async def wait_held(db: Any, task_id: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row = await task_row(db, task_id)
        if row["held_by"] == HELD:
            return row
        assert time.monotonic() < deadline, row
        await asyncio.sleep(0.05)


async def create_under(db_url: str, receiver: Receiver, s: Secrets, keys: str, business_id: str) -> str:
    """A task whose sensitive headers are sealed with ``keys``'s first key."""
    async with keyed(db_url, keys) as rt:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=FAST)
        task = await rt.service.create_task(
            biz, {"business_id": business_id, "url": receiver.url(f"/{business_id}"), "headers": s.headers}
        )
    return task.id


async def test_a_task_whose_headers_do_not_open_is_held_unsent_and_sent_once_the_key_is_back(
    db_url: str, receiver: Receiver, s: Secrets, caplog: pytest.LogCaptureFixture
) -> None:
    """Sealed under K1, a dispatcher with only K2: nothing arrives, no attempt, held with the header names in
    ``last_error``; another task of the business (sealed under K2) goes. Restarted with K2,K1: delivered once."""
    lost = await create_under(db_url, receiver, s, s.old_key, "lost")
    fine = await create_under(db_url, receiver, s, s.new_key, "fine")
    with caplog.at_level(logging.ERROR, logger="taskcenter"):
        async with serving(db_url, secret_key=s.new_key) as api:
            rt = api.runtime
            biz = await rt.service.business("shop")
            async with running(rt):
                await wait_status(rt, biz, fine, "succeeded")
                held = await wait_held(rt.db, lost)
                await asyncio.sleep(0.3)  # a request or an attempt would show by now
                assert receiver.requests_for("/lost") == []
                held = await task_row(rt.db, lost)
            stats = (await api.client.get("/stats", headers=OPERATOR)).json()
            own = (await api.client.get("/businesses/shop/stats", headers=OPERATOR)).json()
    assert (held["status"], held["attempts"], held["attempt_rows"]) == ("pending", 0, 0)
    assert held["lease_owner"] is None and held["outcome"] is None
    assert "Authorization" in held["last_error"] and "X-API-Key" in held["last_error"]
    assert "X-Trace" not in held["last_error"]
    s.assert_absent(held["last_error"])
    due_in = held["next_attempt_at"].replace(tzinfo=UTC) - datetime.now(UTC)
    assert due_in > timedelta(minutes=30)
    entry = {"business_code": "shop", "reason": "sealed_headers", "tasks": 1, "task_ids": [lost]}
    assert stats["held"] == [entry] and own["held"] == [entry]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(lost in m and "Authorization" in m and "TASKCENTER_SECRET_KEY" in m for m in errors), errors
    s.assert_absent(json.dumps(errors))

    async with keyed(db_url, f"{s.new_key},{s.old_key}") as rt:
        biz = await rt.service.business("shop")
        async with running(rt):
            [request] = await receiver.wait_for(1, "/lost", timeout=10)
            await wait_status(rt, biz, lost, "succeeded")
            await asyncio.sleep(0.3)
        sent = await task_row(rt.db, lost)
    assert request.headers["Authorization"] == f"Bearer {s.token}"
    assert request.headers["X-API-Key"] == s.api_key
    assert len(receiver.requests_for("/lost")) == 1
    assert (sent["attempts"], sent["attempt_rows"], sent["held_by"]) == (1, 1, None)


async def test_taskcenter_stats_prints_a_held_line_for_tasks_whose_headers_do_not_open(
    db_url: str, receiver: Receiver, s: Secrets
) -> None:
    lost = await create_under(db_url, receiver, s, s.old_key, "lost")
    async with keyed(db_url, s.new_key) as rt, running(rt):
        await wait_held(rt.db, lost)
    env = {"TASKCENTER_DATABASE_URL": db_url, "TASKCENTER_SECRET_KEY": s.new_key}
    result = await asyncio.to_thread(CliRunner().invoke, app, ["stats"], env=env)
    assert result.exit_code == 0, result.output
    [line] = [line for line in result.stdout.splitlines() if line.strip().startswith("held")]
    assert "shop 1 tasks" in line and "sealed_headers" in line and lost in line


async def test_updating_the_headers_of_a_held_task_sends_it_now(
    db_url: str, receiver: Receiver, s: Secrets
) -> None:
    """New header values are sealed with today's key: the cause is gone, so the task is due at once."""
    lost = await create_under(db_url, receiver, s, s.old_key, "lost")
    async with keyed(db_url, s.new_key) as rt:
        biz = await rt.service.business("shop")
        async with running(rt):
            await wait_held(rt.db, lost)
            await rt.service.update_task(biz, lost, {"headers": {"Authorization": "Bearer fresh"}})
            [request] = await receiver.wait_for(1, "/lost", timeout=10)
            await wait_status(rt, biz, lost, "succeeded")
    assert request.headers["Authorization"] == "Bearer fresh"


async def test_a_dispatcher_that_starts_releases_only_the_held_tasks_whose_headers_open_now(
    db_url: str, receiver: Receiver, s: Secrets, caplog: pytest.LogCaptureFixture
) -> None:
    """Held under K2 alone: ``a`` and ``c`` sealed under K1, ``b`` under a key nobody has. One error line names the
    tasks held together and is not repeated for ``c`` held soon after. Restarted with K2,K1: ``a`` and ``c`` go,
    ``b`` keeps its hour."""
    a = await create_under(db_url, receiver, s, s.old_key, "a")
    b = await create_under(db_url, receiver, s, Fernet.generate_key().decode(), "b")
    with caplog.at_level(logging.ERROR, logger="taskcenter"):
        async with keyed(db_url, s.new_key) as rt, running(rt):
            await wait_held(rt.db, a)
            await wait_held(rt.db, b)
            c = await create_under(db_url, receiver, s, s.old_key, "c")
            rt.notifier.wake()
            await wait_held(rt.db, c)
    errors = [r.getMessage() for r in caplog.records if "sealed header values" in r.getMessage()]
    assert len(errors) == 1 and a in errors[0] and b in errors[0], errors

    async with keyed(db_url, f"{s.new_key},{s.old_key}") as rt:
        biz = await rt.service.business("shop")
        async with running(rt):
            for task_id in (a, c):
                await wait_status(rt, biz, task_id, "succeeded")
        still = await task_row(rt.db, b)
    assert [len(receiver.requests_for(p)) for p in ("/a", "/b", "/c")] == [1, 0, 1]
    assert (still["status"], still["attempts"], still["held_by"]) == ("pending", 0, HELD)
    assert still["next_attempt_at"].replace(tzinfo=UTC) - datetime.now(UTC) > timedelta(minutes=30)
