"""A business secret that TASKCENTER_SECRET_KEY cannot decrypt stops that business only: its HTTP tasks are held
unsent (never sent unsigned, no attempt charged) while every other business delivers, signed, as before; rotating
its signing secret, or restarting with the key that sealed it, lets them go. Its JWTs get a 503 problem."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import sqlalchemy as sa
from cryptography.fernet import Fernet

from taskcenter.crypto import SecretBox
from taskcenter.runtime import Runtime, _refuse
from taskcenter.storage.schema import businesses
from taskcenter.storage.schema import tasks as tasks_table
from taskcenter.verify import verify
from tests.conftest import make_settings
from tests.processes import TASKCENTER, WorkerProcess
from tests.receiver import Receiver, RecordedRequest
from tests.test_api_support import OPERATOR, PROBLEM, Api, bearer, serving
from tests.test_businesses import Cli
from tests.test_delivery import running, wait_status

FAST = 600_000


async def reseal(rt: Runtime, code: str, other_key: str, *, column: str = "signing_secrets") -> None:
    """Store the business's secret sealed with another installation's key, as a restored row would be."""
    other = SecretBox.from_setting(other_key)
    async with rt.db.write() as conn:
        row = (await conn.execute(sa.select(businesses).where(businesses.c.code == code))).mappings().one()
        if column == "signing_secrets":
            value: Any = [other.seal(rt.box.open(s)) for s in row["signing_secrets"]]
        else:
            value = other.seal(rt.box.open(row[column]))
        await conn.execute(sa.update(businesses).where(businesses.c.code == code).values({column: value}))


async def create(api: Api, key: dict[str, str], receiver: Receiver, path: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        body = {"business_id": f"{path}-{i}", "url": receiver.url(path), "json": {"i": i}}
        response = await api.client.post("/tasks", json=body, headers=key)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


async def rows(rt: Runtime, ids: list[str]) -> list[dict[str, Any]]:
    async with rt.db.read() as conn:
        stmt = sa.select(tasks_table).where(tasks_table.c.uuid.in_(ids))
        return [dict(r) for r in (await conn.execute(stmt)).mappings()]


def signatures(request: RecordedRequest) -> list[str]:
    return request.headers["webhook-signature"].split()


@contextlib.asynccontextmanager
async def two_businesses(
    db_url: str, receiver: Receiver, key: str
) -> AsyncIterator[tuple[Api, dict[str, Any]]]:
    """The API with businesses ``good`` and ``bad`` (``bad``'s signing secret sealed with another key), two
    tasks each to the receiver (``/good``, ``/bad``); yields the api and the registrations."""
    async with serving(db_url, secret_key=key) as api:
        regs = {code: await api.register(code, rate_limit_per_minute=FAST) for code in ("good", "bad")}
        await reseal(api.runtime, "bad", Fernet.generate_key().decode())
        regs["good"]["ids"] = await create(api, bearer(regs["good"]["api_key"]), receiver, "/good", 2)
        regs["bad"]["ids"] = await create(api, bearer(regs["bad"]["api_key"]), receiver, "/bad", 2)
        yield api, regs


async def wait_held(rt: Runtime, ids: list[str], timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = await rows(rt, ids)
        if all(r["held_by"] == "business:signing_secret" for r in found):
            return found
        assert time.monotonic() < deadline, found
        await asyncio.sleep(0.05)


async def test_one_unreadable_signing_secret_holds_only_its_business_until_rotated(
    db_url: str, receiver: Receiver
) -> None:
    key = Fernet.generate_key().decode()
    async with two_businesses(db_url, receiver, key) as (api, regs):
        rt = api.runtime
        good = await rt.service.business("good")
        async with running(rt):
            arrived = await receiver.wait_for(2, "/good", timeout=10)
            for task_id in regs["good"]["ids"]:
                await wait_status(rt, good, task_id, "succeeded")
            held = await wait_held(rt, regs["bad"]["ids"])
            assert receiver.requests_for("/bad") == []
            assert [(r["status"], r["attempts"]) for r in held] == [("pending", 0), ("pending", 0)]
            assert all("signing secret cannot be decrypted" in r["last_error"] for r in held)
            shown = await api.client.get(
                f"/tasks/{regs['bad']['ids'][0]}", headers=bearer(regs["bad"]["api_key"])
            )
            assert shown.json()["attempts"] == 0 and "signing secret" in shown.json()["last_error"]
            stats = (await api.client.get("/stats", headers=OPERATOR)).json()
            assert stats["held"] == [
                {
                    "business_code": "bad",
                    "reason": "signing_secret",
                    "tasks": 2,
                    "task_ids": regs["bad"]["ids"],
                }
            ]
            assert rt.policies.unsigned() == ["bad"]

            rotated = await api.client.put(
                "/businesses/bad/credentials", json={"signing_secret": True}, headers=OPERATOR
            )
            assert rotated.status_code == 200, rotated.text
            new_secret = rotated.json()["signing_secret"]
            late = await receiver.wait_for(2, "/bad", timeout=15)
            bad = await rt.service.business("bad")
            for task_id in regs["bad"]["ids"]:
                await wait_status(rt, bad, task_id, "succeeded")
        [bad_task] = await rows(rt, regs["bad"]["ids"][:1])
    for request in arrived:
        verify(regs["good"]["signing_secret"], dict(request.headers), request.body)
    for request in late:
        verify(new_secret, dict(request.headers), request.body)
        assert len(signatures(request)) == 1  # the undecryptable old secret was not kept beside the new one
    assert bad_task["attempts"] == 1 and bad_task["held_by"] is None


async def test_restarting_with_the_key_that_sealed_it_releases_the_held_tasks(
    db_url: str, receiver: Receiver
) -> None:
    key, other = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    async with serving(db_url, secret_key=key) as api:
        reg = await api.register("bad", rate_limit_per_minute=FAST)
        await reseal(api.runtime, "bad", other)
        ids = await create(api, bearer(reg["api_key"]), receiver, "/bad", 2)
        async with running(api.runtime):
            await wait_held(api.runtime, ids)
        assert receiver.requests_for("/bad") == []
    # Held for an hour: only the new process's start can bring them back this soon.
    rt = Runtime(make_settings(db_url, secret_key=f"{key},{other}"))
    await rt.start()
    try:
        bad = await rt.service.business("bad")
        async with running(rt):
            arrived = await receiver.wait_for(2, "/bad", timeout=10)
            for task_id in ids:
                await wait_status(rt, bad, task_id, "succeeded")
    finally:
        await rt.close()
    for request in arrived:
        verify(reg["signing_secret"], dict(request.headers), request.body)


async def test_a_worker_starts_and_delivers_with_an_unreadable_business_secret_present(
    db_url: str, receiver: Receiver
) -> None:
    key = Fernet.generate_key().decode()
    async with two_businesses(db_url, receiver, key) as (_api, regs):
        worker = WorkerProcess(db_url, secret_key=key)
        try:
            await asyncio.to_thread(worker.wait_ready)
            arrived = await receiver.wait_for(2, "/good", timeout=15)
            await asyncio.sleep(0.5)
            assert receiver.requests_for("/bad") == []
        finally:
            code = worker.terminate()
        output = worker.output()
    assert code == 0, output
    assert "business system 'bad': its signing secret cannot be decrypted" in output
    for request in arrived:
        verify(regs["good"]["signing_secret"], dict(request.headers), request.body)


async def test_a_jwt_of_a_business_whose_jwt_secret_is_unreadable_is_a_503_problem(db_url: str) -> None:
    async with serving(db_url, secret_key=Fernet.generate_key().decode()) as api:
        reg = await api.register("shop")
        await reseal(api.runtime, "shop", Fernet.generate_key().decode(), column="jwt_secret")
        token = jwt.encode(
            {"sub": "shop", "exp": int(time.time()) + 60}, reg["jwt_secret"], algorithm="HS256"
        )
        response = await api.client.get("/tasks", headers=bearer(token))
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == PROBLEM
        problem = response.json()
        assert problem["type"].endswith("/secret-key")
        assert "JWT secret of business system 'shop' cannot be decrypted" in problem["detail"]
        # Its API keys are unaffected, and rotating the JWT secret is the fix.
        assert (await api.client.get("/tasks", headers=bearer(reg["api_key"]))).status_code == 200
        rotated = await api.client.put(
            "/businesses/shop/credentials", json={"jwt_secret": True}, headers=OPERATOR
        )
        token = jwt.encode(
            {"sub": "shop", "exp": int(time.time()) + 60}, rotated.json()["jwt_secret"], "HS256"
        )
        assert (await api.client.get("/tasks", headers=bearer(token))).status_code == 200


async def test_rotating_a_readable_signing_secret_still_keeps_it_beside_the_new_one(db_url: str) -> None:
    async with serving(db_url, secret_key=Fernet.generate_key().decode()) as api:
        await api.register("shop")
        await api.register("lost")
        await reseal(api.runtime, "lost", Fernet.generate_key().decode())
        for code in ("shop", "lost"):
            rotated = await api.client.put(f"/businesses/{code}/credentials", json={"signing_secret": True},
                                           headers=OPERATOR)  # fmt: skip
            assert rotated.status_code == 200, rotated.text
        shown = {
            c: (await api.client.get(f"/businesses/{c}", headers=OPERATOR)).json() for c in ("shop", "lost")
        }
    assert (shown["shop"]["signing_secrets"], shown["lost"]["signing_secrets"]) == (2, 1)


async def test_a_task_whose_signer_refuses_at_send_time_is_given_back_unsent(
    db_url: str, receiver: Receiver
) -> None:
    """A secret that stops opening between admission and sending (a reload in between): the task is given back
    unsent and uncharged, never sent unsigned; once its business signs again it goes, signed."""
    async with serving(db_url, secret_key=Fernet.generate_key().decode()) as api:
        reg = await api.register("shop", rate_limit_per_minute=FAST)
        [task_id] = await create(api, bearer(reg["api_key"]), receiver, "/hook", 1)
        rt = api.runtime
        dispatcher = rt.dispatcher()
        signer = dispatcher.signer
        dispatcher.signer = lambda pk: _refuse(
            "shop"
        )  # what the policies hold while the secret is unreadable
        run = asyncio.create_task(rt.run_dispatcher(dispatcher))
        try:
            deadline = time.monotonic() + 10
            while not dispatcher.delivered and not await _given_back(rt, task_id):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            [row] = await rows(rt, [task_id])
            assert (row["status"], row["attempts"]) == ("pending", 0)
            assert receiver.requests_for("/hook") == []
            dispatcher.signer = signer
            [request] = await receiver.wait_for(1, "/hook", timeout=10)
            await wait_status(rt, await rt.service.business("shop"), task_id, "succeeded")
        finally:
            dispatcher.stop()
            await asyncio.wait_for(run, timeout=15)
    verify(reg["signing_secret"], dict(request.headers), request.body)


async def _given_back(rt: Runtime, task_id: str) -> bool:
    [row] = await rows(rt, [task_id])
    return row["status"] == "pending" and row["updated_at"] != row["created_at"]


async def test_an_unreadable_previous_signing_secret_is_left_out_and_the_newest_signs(
    db_url: str, receiver: Receiver
) -> None:
    async with serving(db_url, secret_key=Fernet.generate_key().decode()) as api:
        reg = await api.register("shop", rate_limit_per_minute=FAST)
        rotated = await api.client.put(
            "/businesses/shop/credentials", json={"signing_secret": True}, headers=OPERATOR
        )
        async with (
            api.runtime.db.write() as conn
        ):  # the previous secret, kept beside the new one, now unreadable
            row = (await conn.execute(sa.select(businesses))).mappings().one()
            newest, previous = row["signing_secrets"]
            lost = SecretBox.from_setting(Fernet.generate_key().decode()).seal(api.runtime.box.open(previous))
            await conn.execute(sa.update(businesses).values(signing_secrets=[newest, lost]))
        [task_id] = await create(api, bearer(rotated.json()["api_key"]), receiver, "/hook", 1)
        async with running(api.runtime):
            [request] = await receiver.wait_for(1, "/hook", timeout=10)
            await wait_status(api.runtime, await api.runtime.service.business("shop"), task_id, "succeeded")
        assert api.runtime.policies.unsigned() == []
    verify(rotated.json()["signing_secret"], dict(request.headers), request.body)
    assert len(signatures(request)) == 1 and reg["signing_secret"] != rotated.json()["signing_secret"]


def test_cli_rotate_key_gives_a_business_whose_secret_no_longer_decrypts_a_new_signing_secret(
    db_url: str,
) -> None:
    """The operator replaced TASKCENTER_SECRET_KEY without keeping the old key: rotating is the fix, and the
    undecryptable old secret is not kept beside the new one."""
    cli = Cli(db_url)
    cli.env["TASKCENTER_SECRET_KEY"] = Fernet.generate_key().decode()
    cli.ok("business", "create", "payments")
    cli.env["TASKCENTER_SECRET_KEY"] = Fernet.generate_key().decode()
    rotated = cli.ok("business", "rotate-key", "payments", "--signing-secret")
    assert "new signing secret: whsec_" in rotated
    assert '"signing_secrets": 1' in cli.ok("business", "show", "payments", "--json")


async def test_serve_starts_and_delivers_with_an_unreadable_business_secret_present(
    db_url: str, receiver: Receiver, tmp_path: Path
) -> None:
    key = Fernet.generate_key().decode()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCENTER_")}
    env.update(
        TASKCENTER_DATABASE_URL=db_url,
        TASKCENTER_SECRET_KEY=key,
        TASKCENTER_ALLOW_NETWORKS="127.0.0.0/8",
        TASKCENTER_PORT=str(port),
        TASKCENTER_LOG_FORMAT="json",
    )
    log = tmp_path / "serve.log"
    async with two_businesses(db_url, receiver, key) as (_api, regs):
        with log.open("wb") as sink:
            proc = subprocess.Popen([TASKCENTER, "serve"], cwd=tmp_path, env=env, stdout=sink, stderr=sink)
        try:
            arrived = await receiver.wait_for(2, "/good", timeout=30)
            async with httpx.AsyncClient() as client:
                health = await client.get(f"http://127.0.0.1:{port}/api/v1/health")
            assert health.status_code == 200, health.text
            assert receiver.requests_for("/bad") == []
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 20) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "business system 'bad': its signing secret cannot be decrypted" in log.read_text()
    for request in arrived:
        verify(regs["good"]["signing_secret"], dict(request.headers), request.body)


async def test_a_business_registered_since_the_last_reload_is_not_sent_unsigned(
    db_url: str, receiver: Receiver
) -> None:
    """Before, a task of a business the dispatcher's policies had not loaded yet left unsigned; now its refused
    signer makes the dispatcher reload them at once, and it leaves signed."""
    async with serving(db_url, secret_key=Fernet.generate_key().decode()) as api:
        rt = api.runtime
        rt.policies.refresh_s = 3600.0  # no periodic reload during the test
        async with running(rt):
            reg = await api.register("late", rate_limit_per_minute=FAST)
            [task_id] = await create(api, bearer(reg["api_key"]), receiver, "/hook", 1)
            [request] = await receiver.wait_for(1, "/hook", timeout=10)
            await wait_status(rt, await rt.service.business("late"), task_id, "succeeded")
        [row] = await rows(rt, [task_id])
    assert row["attempts"] == 1
    verify(reg["signing_secret"], dict(request.headers), request.body)
