"""The API behind a real uvicorn server on loopback, with a dispatcher in the same process: a task created over
HTTP is delivered to the receiver, continuing the creating request's trace."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import uvicorn

from taskcenter.api import create_app
from taskcenter.runtime import Runtime
from tests.conftest import make_settings
from tests.receiver import Receiver
from tests.test_api_support import OPERATOR, OPERATOR_KEY, bearer
from tests.test_delivery import running

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@contextlib.asynccontextmanager
async def uvicorn_server(runtime: Runtime) -> AsyncIterator[str]:
    """Serve the app on 127.0.0.1 with a port the OS picks; yields the base URL."""
    config = uvicorn.Config(
        create_app(runtime, dispatcher_running=True),
        host="127.0.0.1",
        port=0,
        lifespan="off",
        log_config=None,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}/api/v1"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=10)


async def test_a_task_created_over_http_is_delivered_with_the_callers_trace(
    db_url: str, receiver: Receiver
) -> None:
    runtime = Runtime(make_settings(db_url, operator_key=OPERATOR_KEY))
    await runtime.start()
    try:
        async with uvicorn_server(runtime) as base, httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/health")).json()["dispatcher"] == "running"
            registered = await client.post("/businesses", json={"code": "shop"}, headers=OPERATOR)
            key = bearer(registered.json()["api_key"])
            created = await client.post(
                "/tasks",
                json={"business_id": "order-1", "url": receiver.url("/hook"), "json": {"order": 1}},
                headers={**key, "traceparent": TRACEPARENT},
            )
            assert created.status_code == 201, created.text
            task_id = created.json()["id"]
            async with running(runtime):
                [request] = await receiver.wait_for(1, "/hook", timeout=10)
                for _ in range(200):
                    task = (await client.get(f"/tasks/{task_id}", headers=key)).json()
                    if task["status"] == "succeeded":
                        break
                    await asyncio.sleep(0.05)
        assert task["status"] == "succeeded" and task["attempts"] == 1
        assert request.json() == {"order": 1}
        assert request.headers["Idempotency-Key"] == task_id
        assert request.headers["traceparent"].split("-")[1] == TRACE_ID
    finally:
        await runtime.close()
