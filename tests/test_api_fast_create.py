"""``POST /tasks`` answered by the fast path (:class:`FastCreate`) is indistinguishable from the FastAPI route:
the same request gets the same status, headers and body from an app with the fast path and from one without,
and the fast path really serves the ordinary cases (and leaves the others to the route)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest_asyncio
import sqlalchemy as sa

from taskcenter.api import create_app
from taskcenter.api.tasks import FastCreate
from taskcenter.storage.schema import tasks
from tests.test_api_support import OPERATOR, Api, bearer, serving, task_body

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest_asyncio.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    async with serving(db_url) as client:
        yield client


def _fast_path(app: Any) -> FastCreate:
    layer = app.middleware_stack
    while not isinstance(layer, FastCreate):
        layer = layer.app
    return layer


def _normalised(response: httpx.Response, suffix: str) -> tuple[Any, ...]:
    """Status, the headers that matter and the body, with ids, times and the run's suffix blanked out."""
    text = _TIME.sub("<time>", _UUID.sub("<uuid>", response.text)).replace(suffix, "<n>")
    location = _UUID.sub("<uuid>", response.headers.get("location", ""))
    return (
        response.status_code,
        response.headers.get("content-type"),
        location,
        response.headers.get("www-authenticate"),
        text,
    )


async def test_the_fast_path_answers_exactly_as_the_route(api: Api) -> None:
    slow_client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(api.runtime, fast_create=False)),
        base_url="http://testserver/api/v1",
    )
    key = await api.business_key("shop")
    small = await api.business_key("small", max_active_tasks=1)
    await api.create(small, "first")
    gone = await api.business_key("gone")
    await api.create(gone, "x")
    assert (await api.client.delete("/businesses/gone", headers=OPERATOR)).status_code == 200
    json_type = {"Content-Type": "application/json"}

    cases: list[tuple[str, dict[str, str], Any, int, bool]] = [
        # (name, headers, body (bytes, or a dict made unique per path), status, served by the fast path?)
        ("created", {**key, **json_type}, {"business_id": "a{n}"}, 201, True),
        ("charset", {**key, "Content-Type": "application/json; charset=utf-8"}, {"business_id": "b{n}"}, 201, True),
        ("traced", {**key, **json_type, "traceparent": TRACEPARENT}, {"business_id": "t{n}"}, 201, True),
        ("duplicate", {**key, **json_type}, {"business_id": "a{n}"}, 409, True),
        ("service refuses", {**key, **json_type}, {"business_id": "g{n}", "method": "GET"}, 422, True),
        ("over the limit", {**small, **json_type}, {"business_id": "s{n}"}, 429, True),
        ("no credentials", json_type, {"business_id": "c{n}"}, 401, False),
        ("bad key", {**bearer("tc_nope"), **json_type}, {"business_id": "d{n}"}, 401, False),
        ("basic auth", {"Authorization": "Basic eDp5", **json_type}, {"business_id": "d{n}"}, 401, False),
        ("operator", {**OPERATOR, **json_type}, {"business_id": "e{n}"}, 403, False),
        ("disabled", {**gone, **json_type}, {"business_id": "f{n}"}, 403, False),
        ("pydantic refuses", {**key, **json_type}, {"business_id": "h{n}", "url": "ftp://x"}, 422, False),
        ("unknown field", {**key, **json_type}, {"business_id": "i{n}", "colour": "red"}, 422, False),
        ("malformed", {**key, **json_type}, b'{"business_id": ', 400, False),
        ("empty", {**key, **json_type}, b"", 422, False),
        ("a list", {**key, **json_type}, b"[1]", 422, False),
        ("nested too deep", {**key, **json_type}, b'{"business_id": "n", "json": ' + b"[" * 3000 + b"]" * 3000 + b"}",
         400, False),
        ("text/plain", {**key, "Content-Type": "text/plain"}, {"business_id": "j{n}"}, 422, False),
        ("+json", {**key, "Content-Type": "application/vnd.x+json"}, {"business_id": "k{n}"}, 201, False),
    ]  # fmt: skip
    fast = slow = None
    for name, headers, body, status, expect_fast in cases:
        answers = []
        for suffix, client in (("-fast", api.client), ("-slow", slow_client)):
            if isinstance(body, dict):
                values = {k: v.replace("{n}", suffix) for k, v in body.items()}
                content = httpx.Request("POST", "/", json=task_body(**values)).content
            else:
                content = body
            served = _fast_path(api.app).served if api.app.middleware_stack else 0
            response = await client.post("/tasks", content=content, headers=headers)
            if client is api.client:
                assert (_fast_path(api.app).served - served == 1) is expect_fast, name
            answers.append(_normalised(response, suffix))
        fast, slow = answers
        assert fast == slow, name
        assert fast[0] == status, (name, fast)
    assert fast is not None and slow is not None
    # The traceparent reached the stored task on both paths.
    async with api.runtime.db.read() as conn:
        traced = dict(
            (
                await conn.execute(
                    sa.select(tasks.c.business_id, tasks.c.traceparent).where(tasks.c.business_id.like("t-%"))
                )
            ).all()
        )
    assert traced == {"t-fast": TRACEPARENT, "t-slow": TRACEPARENT}
    await slow_client.aclose()
