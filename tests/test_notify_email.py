"""E-mail notifications end to end, on both backends: a task ends, a ``taskcenter.email`` task is queued and a
worker sends it to a real SMTP server (aiosmtpd) on loopback, retried when the server refuses for now; and the
API refuses ``notify.email`` when no SMTP server is configured."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest_asyncio
import sqlalchemy as sa

from taskcenter.domain.retry import RetryPolicy
from taskcenter.mail import EMAIL_RETRY, EMAIL_TYPE, Mailer
from taskcenter.runtime import Runtime
from taskcenter.service import Business, utcnow
from taskcenter.storage.schema import tasks
from tests.conftest import make_settings
from tests.receiver import Receiver, Reply
from tests.smtp_server import MailServer, self_signed
from tests.test_api_support import serving, task_body
from tests.test_delivery import running, wait_status


class Clock:
    """The real time plus an offset a test moves forward (a retry falls due without waiting for it)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset


def smtp_settings(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "smtp_tls": "none",
        "smtp_from": "tc@example.org",
        **extra,
    }


@contextlib.asynccontextmanager
async def mailing_runtime(
    db_url: str, port: int, clock: Callable[[], datetime] = utcnow, **extra: Any
) -> AsyncIterator[Runtime]:
    rt = Runtime(make_settings(db_url, **smtp_settings(port, **extra)), clock=clock)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


async def _task_count(rt: Runtime) -> int:
    async with rt.db.read() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(tasks))).scalar_one())


async def _wait_mail_task(rt: Runtime, biz: Business, key: str, *statuses: str, timeout: float = 15) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        with contextlib.suppress(Exception):
            task = await rt.service.get_by_business_id(biz, key)
            if task.status in statuses:
                return task
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no notification {key} in {statuses}")
        await asyncio.sleep(0.05)


async def test_a_failed_task_emails_its_notify_address_once(
    db_url: str, receiver: Receiver, mail_server: MailServer
) -> None:
    receiver.set_default(Reply(status=404), "/gone")
    async with mailing_runtime(db_url, mail_server.port) as rt:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
        task = await rt.service.create_task(
            biz,
            {
                "business_id": "order-7",
                "url": receiver.url("/gone?token=s3cret"),
                "notify": {"email": "ops@example.com", "url": receiver.url("/notify"), "on": ["failed"]},
            },
        )
        async with running(rt):
            [mail] = await mail_server.wait_for(1, timeout=15)
            await receiver.wait_for(1, "/notify", timeout=15)
            note = await _wait_mail_task(rt, biz, f"notify:{task.id}:failed:email", "succeeded")
            await wait_status(rt, biz, (await rt.service.get_by_business_id(biz, f"notify:{task.id}:failed")).id,
                              "succeeded")  # fmt: skip
            await asyncio.sleep(0.5)  # room for a notification of a notification, which must not come
        assert await _task_count(rt) == 3, "the task, its webhook and its e-mail: notifications never notify"
    assert (mail.mail_from, mail.rcpt_tos) == ("tc@example.org", ["ops@example.com"])
    assert mail.message["Subject"] == "[taskcenter] shop order-7: failed"
    text = mail.text
    for line in (
        f"Task id:       {task.id}",
        "Business:      shop",
        "business_id:   order-7",
        "Final status:  failed",
        "Outcome:       client_error",
        "Last response: HTTP 404",
    ):
        assert line in text, text
    assert "Attempts:      1 of " in text and f"Request:       POST {receiver.url('/gone')}?…" in text
    assert "s3cret" not in text
    assert note.type == EMAIL_TYPE and note.attempts == 1 and note.notify is None
    assert len(mail_server.received) == 1


async def test_a_refused_mail_is_retried_until_the_server_takes_it(
    db_url: str, receiver: Receiver, mail_server: MailServer
) -> None:
    clock = Clock()
    mail_server.refuse_rcpt("451 4.7.1 greylisted, try again later")
    async with mailing_runtime(db_url, mail_server.port, clock) as rt:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
        task = await rt.service.create_task(
            biz, {"business_id": "ok-1", "url": receiver.url("/hook"), "notify": {"email": "ops@example.com"}}
        )
        key = f"notify:{task.id}:succeeded:email"
        async with running(rt):
            first = await _wait_mail_task(rt, biz, key, "retrying")
            assert mail_server.received == [] and mail_server.rcpt_attempts == 1
            clock.offset = timedelta(seconds=60)  # past the first retry's delay (30 s, jitter 10 %)
            note = await _wait_mail_task(rt, biz, key, "succeeded")
            [mail] = await mail_server.wait_for(1)
        attempts = await rt.service.attempts(biz, note.id)
    assert first.attempts == 1 and note.attempts == 2
    assert "451" in (attempts[0].error or "") and attempts[1].outcome == "success"
    assert mail.message["Subject"] == "[taskcenter] shop ok-1: succeeded"
    assert "Last response: HTTP 200" in mail.text


async def test_a_cancelled_task_emails_over_starttls_with_a_login(
    db_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    server_tls, client_tls = self_signed(tmp_path)
    async with MailServer(tls=server_tls, login=("mailer", "pw")) as server:
        extra = {"smtp_tls": "starttls", "smtp_username": "mailer", "smtp_password": "pw"}
        async with mailing_runtime(db_url, server.port, **extra) as rt:
            # The settings name no CA file (the system's store, or SSL_CERT_FILE): the test's own CA is handed to
            # the registered processor's SMTP configuration.
            smtp = rt.settings.smtp()
            assert smtp is not None
            mailer = Mailer(replace(smtp, tls_context=client_tls))
            rt.processors.register(
                EMAIL_TYPE, mailer.send, retry=RetryPolicy.from_dict(EMAIL_RETRY), builtin=True
            )
            biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
            task = await rt.service.create_task(
                biz,
                {
                    "business_id": "later",
                    "url": receiver.url("/hook"),
                    "delay": 600,
                    "notify": {"email": "ops@example.com", "on": ["cancelled"]},
                },
            )
            await rt.service.cancel(biz, task.id)
            async with running(rt):
                [mail] = await server.wait_for(1, timeout=15)
    assert server.tls_used == [True] and server.logins == [("mailer", "pw")]
    assert mail.message["Subject"] == "[taskcenter] shop later: cancelled"
    assert "Attempts:      0 of " in mail.text and "Last response: none" in mail.text
    assert receiver.requests_for("/hook") == []


async def test_only_a_worker_with_an_smtp_server_claims_the_mail(
    db_url: str, receiver: Receiver, mail_server: MailServer
) -> None:
    """A worker without SMTP settings has no taskcenter.email processor, so it leaves the mail to one that has."""
    plain = Runtime(make_settings(db_url))
    await plain.start()
    try:
        async with mailing_runtime(db_url, mail_server.port) as rt:
            biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
            task = await rt.service.create_task(
                biz,
                {"business_id": "m1", "url": receiver.url("/hook"), "notify": {"email": "ops@example.com"}},
            )
            plain_biz = await plain.service.business("shop")
            key = f"notify:{task.id}:succeeded:email"
            async with running(plain):
                await wait_status(plain, plain_biz, task.id, "succeeded")
                await _wait_mail_task(plain, plain_biz, key, "pending")
                await asyncio.sleep(1.0)
                assert (await plain.service.get_by_business_id(plain_biz, key)).attempts == 0
            assert mail_server.received == []
            async with running(rt):
                [mail] = await mail_server.wait_for(1, timeout=15)
                await _wait_mail_task(rt, biz, key, "succeeded")
    finally:
        await plain.close()
    assert mail.rcpt_tos == ["ops@example.com"]


# -- what callers may do ----------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def api_without_smtp(db_url: str) -> AsyncIterator[Any]:
    async with serving(db_url) as api:
        yield api


async def test_notify_email_without_an_smtp_server_is_422_naming_the_field(api_without_smtp: Any) -> None:
    api = api_without_smtp
    key = await api.business_key("shop")
    body = task_body("e1", notify={"email": "ops@example.com"})
    response = await api.client.post("/tasks", json=body, headers=key)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "notify.email" and "SMTP" in response.json()["detail"]
    batch = await api.client.post("/tasks/batch", json={"tasks": [body]}, headers=key)
    assert batch.json()["results"][0]["status"] == 422
    task = await api.create(key, "e2", delay=600)
    patch = await api.client.patch(
        f"/tasks/{task['id']}", json={"notify": {"email": "ops@example.com"}}, headers=key
    )
    assert patch.status_code == 422 and patch.json()["field"] == "notify.email"
    ok = await api.client.post(
        "/tasks", json=task_body("e3", notify={"url": "https://h.example.com/n"}), headers=key
    )
    assert ok.status_code == 201, "notify.url needs no SMTP server"


async def test_callers_can_neither_create_nor_change_an_email_task(db_url: str) -> None:
    async with serving(db_url, **smtp_settings(2525)) as api:
        key = await api.business_key("shop")
        forged = {"business_id": "spam", "type": EMAIL_TYPE,
                  "payload": {"to": "anyone@example.net", "subject": "hi", "text": "buy", "message_id": "x"}}  # fmt: skip
        response = await api.client.post("/tasks", json=forged, headers=key)
        assert response.status_code == 422 and response.json()["field"] == "type", response.text
        task = await api.create(
            key, "e1", delay=600, notify={"email": "ops@example.com", "on": ["cancelled"]}
        )
        assert task["notify"] == {"email": "ops@example.com", "on": ["cancelled"]}
        assert (await api.client.delete(f"/tasks/{task['id']}", headers=key)).status_code == 200
        note = await api.client.get(f"/tasks/business/notify:{task['id']}:cancelled:email", headers=key)
        assert note.status_code == 200 and note.json()["type"] == EMAIL_TYPE
        changed = await api.client.patch(
            f"/tasks/{note.json()['id']}", json={"payload": {"to": "anyone@example.net"}}, headers=key
        )
        assert changed.status_code == 422 and changed.json()["field"] == "type", changed.text


# -- a process that dies between the final write and queuing the notifications ---------------------------


async def _notified_at(rt: Runtime, task_id: str) -> Any:
    async with rt.db.read() as conn:
        query = sa.select(tasks.c.notified_at).where(tasks.c.uuid == task_id)
        return (await conn.execute(query)).scalar_one()


async def test_notifications_a_dead_process_never_queued_are_swept_up(
    db_url: str, receiver: Receiver, mail_server: MailServer
) -> None:
    """The final state was written and the process died before it queued the notifications: another worker's
    sweep queues them (once), so neither the e-mail nor the webhook is lost."""
    receiver.set_default(Reply(status=404), "/gone")
    async with mailing_runtime(db_url, mail_server.port) as rt:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
        notify = {"email": "ops@example.com", "url": receiver.url("/notify"), "on": ["failed"]}
        task = await rt.service.create_task(
            biz, {"business_id": "lost-1", "url": receiver.url("/gone"), "notify": notify}
        )
        quiet = await rt.service.create_task(biz, {"business_id": "plain", "url": receiver.url("/gone")})
        unwanted = await rt.service.create_task(  # succeeds, and asked only for failures
            biz, {"business_id": "fine", "url": receiver.url("/hook"), "notify": notify}
        )
        dying = rt.dispatcher()
        dying.notify = dying.notify_sweep = None  # writes the final state, queues nothing: as if killed then
        run = asyncio.create_task(rt.run_dispatcher(dying))
        await wait_status(rt, biz, task.id, "failed")
        await wait_status(rt, biz, quiet.id, "failed")
        await wait_status(rt, biz, unwanted.id, "succeeded")
        dying.stop()
        await asyncio.wait_for(run, timeout=15)
        assert await _task_count(rt) == 3 and await _notified_at(rt, task.id) is None

        survivor = rt.dispatcher()
        survivor.notify_sweep = functools.partial(rt.service.sweep_notifications, grace_s=0.1)
        survivor.notify_sweep_interval_s = 0.2
        run = asyncio.create_task(rt.run_dispatcher(survivor))
        try:
            [mail] = await mail_server.wait_for(1, timeout=15)
            await receiver.wait_for(1, "/notify", timeout=15)
            await asyncio.sleep(1.0)  # several more sweeps: nothing is queued twice
        finally:
            survivor.stop()
            await asyncio.wait_for(run, timeout=15)
        assert await _notified_at(rt, task.id) is not None
        assert await _notified_at(rt, unwanted.id) is not None, "marked, so never looked at again"
        assert await _notified_at(rt, quiet.id) is None, "no notify: never the sweep's business"
        assert await _task_count(rt) == 5, "the three tasks, one webhook, one e-mail"
    assert (
        mail.message["Subject"] == "[taskcenter] shop lost-1: failed"
        and "Last response: HTTP 404" in mail.text
    )
    assert len(mail_server.received) == 1 and len(receiver.requests_for("/notify")) == 1


async def test_a_retried_task_notifies_again_when_it_ends_again(
    db_url: str, receiver: Receiver, mail_server: MailServer
) -> None:
    receiver.script("/flaky", Reply(status=404), Reply(status=200))
    async with mailing_runtime(db_url, mail_server.port) as rt:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=600_000)
        notify = {"email": "ops@example.com", "on": ["failed", "succeeded"]}
        task = await rt.service.create_task(
            biz, {"business_id": "twice", "url": receiver.url("/flaky"), "notify": notify}
        )
        async with running(rt):
            [first] = await mail_server.wait_for(1, timeout=15)
            await _wait_mail_task(rt, biz, f"notify:{task.id}:failed:email", "succeeded")
            await rt.service.retry(biz, task.id)
            assert await _notified_at(rt, task.id) is None, "a manual retry makes the task live again"
            second = (await mail_server.wait_for(2, timeout=15))[1]
    assert first.message["Subject"].endswith(": failed") and second.message["Subject"].endswith(": succeeded")
