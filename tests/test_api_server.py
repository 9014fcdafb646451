"""The API behind a real uvicorn server on loopback, with a dispatcher in the same process: a task created over
HTTP is delivered to the receiver, continuing the creating request's trace."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
import uvicorn

from taskcenter.api import create_app
from taskcenter.api.server import ProblemHttpProtocol, uvicorn_config
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
    config = uvicorn_config(create_app(runtime, dispatcher_running=True), host="127.0.0.1", port=0)
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


async def _raw_exchange(base: str, request: bytes) -> bytes:
    """Send ``request`` as is over a socket to the server and read the answer until it closes."""
    url = httpx.URL(base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


async def test_a_request_uvicorn_cannot_parse_is_answered_with_problem_json(db_url: str) -> None:
    """uvicorn answered it in plain text ("Invalid HTTP request received."), unlike every other error."""
    runtime = Runtime(make_settings(db_url))
    await runtime.start()
    try:
        async with uvicorn_server(runtime) as base:
            for request in (
                b"GET /api/v1/health HTTP/1.1 extra\r\nHost: x\r\n\r\n",  # a bad request line
                b"NOT A REQUEST\r\n\r\n",
                b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            ):
                answer = await _raw_exchange(base, request)
                head, _, body = answer.partition(b"\r\n\r\n")
                lines = head.decode().lower().split("\r\n")
                assert lines[0] == "http/1.1 400 bad request", (request, answer)
                assert "content-type: application/problem+json" in lines
                assert "connection: close" in lines and f"content-length: {len(body)}" in lines
                problem = orjson.loads(body)
                assert (
                    problem["type"] == "https://taskcenter.dev/problems/bad-request"
                    and problem["status"] == 400
                )
            async with httpx.AsyncClient(
                base_url=base
            ) as client:  # and ordinary requests are served as before
                assert (await client.get("/health")).status_code == 200
    finally:
        await runtime.close()


async def test_a_request_head_past_64_kib_is_answered_431_and_never_read_whole(db_url: str) -> None:
    """Before, uvicorn's httptools parser read a head of any size: a 20 MB header line was buffered and
    served (200), and one that never ended held its memory for as long as the client liked."""
    runtime = Runtime(make_settings(db_url))
    await runtime.start()
    try:
        async with uvicorn_server(runtime) as base:
            whole = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * 1_000_000 + b"\r\n\r\n"
            endless = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * 300_000  # no end of head
            one_read = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * 70_000 + b"\r\n\r\n"
            for request in (whole, endless, one_read):
                head, _, body = (await _raw_exchange(base, request)).partition(b"\r\n\r\n")
                lines = head.decode().lower().split("\r\n")
                assert lines[0] == "http/1.1 431 request header fields too large", lines
                assert "content-type: application/problem+json" in lines and "connection: close" in lines
                problem = orjson.loads(body)
                assert problem["type"] == "https://taskcenter.dev/problems/header-too-large"
                assert problem["status"] == 431 and "64 KiB" in problem["detail"]
            async with httpx.AsyncClient(base_url=base) as client:  # a head under the limit is served
                big = {"X-Big": "x" * 60_000}
                assert (await client.get("/health", headers=big)).status_code == 200
                body = {"business_id": "b", "url": "https://api.example.com/x", "body": "y" * 500_000}
                response = await client.post("/tasks", json=body, headers={**big, **bearer("tc_none")})
                assert response.status_code == 401  # the body (in many reads after the head) is no head
    finally:
        await runtime.close()


async def test_a_request_that_does_not_arrive_whole_in_time_is_answered_408_and_closed(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, a connection that sent nothing, half a head or half its declared body was held open for ever,
    and the request's handler waited for the rest of the body for ever."""
    monkeypatch.setattr(ProblemHttpProtocol, "read_timeout_s", 0.5)
    runtime = Runtime(make_settings(db_url))
    await runtime.start()
    try:
        async with uvicorn_server(runtime) as base:
            silent = b""
            half_head = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n"
            half_body = (
                b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Authorization: Bearer tc_none\r\nContent-Length: 100\r\n\r\n{"business_id"'
            )
            for request in (silent, half_head, half_body):
                started = asyncio.get_running_loop().time()
                answer = await _raw_exchange(base, request)
                assert asyncio.get_running_loop().time() - started < 5, request
                if request == silent:
                    assert answer == b""  # nothing to answer: closed
                    continue
                head, _, body = answer.partition(b"\r\n\r\n")
                lines = head.decode().lower().split("\r\n")
                assert lines[0] == "http/1.1 408 request timeout", (request, answer)
                assert "content-type: application/problem+json" in lines and "connection: close" in lines
                problem = orjson.loads(body)
                assert problem["type"] == "https://taskcenter.dev/problems/request-timeout"
            async with httpx.AsyncClient(base_url=base) as client:  # a request that arrives in time is served
                assert (await client.get("/health")).status_code == 200
                await asyncio.sleep(0.7)  # and an idle keep-alive connection is uvicorn's to close (5 s)
                assert (await client.get("/health")).status_code == 200
    finally:
        await runtime.close()
