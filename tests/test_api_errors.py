"""Every error is problem+json with a stable type and the field named; bad input is a 4xx, never a 500,
and never leaves half a task behind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
import sqlalchemy as sa

from taskcenter.storage.schema import tasks
from tests.test_api_support import OPERATOR, PROBLEM, Api, serving, task_body


@pytest_asyncio.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    async with serving(db_url) as client:
        yield client


BASE = "https://taskcenter.dev/problems/"


async def _stored(api: Api) -> int:
    async with api.runtime.db.read() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(tasks))).scalar_one())


def _problem(response: Any, status: int, slug: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["type"] == BASE + slug and body["status"] == status and body["title"] and body["detail"]
    if field is not None:
        assert body.get("field") == field, body
    return body


async def test_malformed_json_is_400(api: Api) -> None:
    key = await api.business_key("shop")
    response = await api.client.post(
        "/tasks", content=b'{"business_id": ', headers={**key, "content-type": "application/json"}
    )
    _problem(response, 400, "malformed-json")
    assert await _stored(api) == 0


async def test_a_lone_surrogate_is_malformed_json(api: Api) -> None:
    key = await api.business_key("shop")
    raw = b'{"business_id": "\\ud800", "url": "https://a.example.com"}'
    response = await api.client.post(
        "/tasks", content=raw, headers={**key, "content-type": "application/json"}
    )
    _problem(response, 400, "malformed-json")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"business_id": "a", "url": "https://a.example.com", "priority": "high"}, "priority"),
        ({"business_id": "a", "url": "https://a.example.com", "timeout": "5"}, "timeout"),
        ({"business_id": 7, "url": "https://a.example.com"}, "business_id"),
        ({"business_id": "a", "url": "https://a.example.com", "headers": {"X": 1}}, "headers.X"),
        ({"business_id": "a", "url": "https://a.example.com", "retry": {"max_attempts": "x"}}, "retry.max_attempts"),
        ({"url": "https://a.example.com"}, "business_id"),
        ({"business_id": "a", "url": "https://a.example.com", "bogus": 1}, "bogus"),
        ({"business_id": "a", "url": "https://a.example.com", "retry": {"bogus": 1}}, "retry.bogus"),
        ({"business_id": "a", "url": "https://a.example.com", "retry": {"strategy": "fixed", "jitter": 0.5}},
         "retry.jitter"),
        ({"business_id": "a", "url": "ftp://a.example.com/file"}, "url"),
        ({"business_id": "a", "url": "javascript:alert(1)"}, "url"),
        ({"business_id": "a", "url": "https://"}, "url"),
        ({"business_id": "a", "url": "https://user:pw@a.example.com/"}, "url"),
        ({"business_id": "a", "url": "https://@a.example.com/"}, "url"),  # empty credentials were let through
        ({"business_id": "a", "url": "https://:@a.example.com/"}, "url"),
        ({"business_id": "a", "url": "https://./"}, "url"),
        ({"business_id": "a", "url": "http://.."}, "url"),
        ({"business_id": "a", "url": "http://-/"}, "url"),
        ({"business_id": "a", "url": "http://999.1.1.1/"}, "url"),
        ({"business_id": "a", "url": "https://a.example.com", "notify": {"url": "https://./"}}, "notify.url"),
        ({"business_id": "a", "url": "https://a.example.com", "json": {}, "body": "x"}, "body"),
        ({"business_id": "a", "url": "https://a.example.com", "scheduled_at": "2030-01-01T00:00:00"}, "scheduled_at"),
        ({"business_id": "a", "url": "https://a.example.com", "scheduled_at": "9999-12-31T23:59:59-14:00"},
         "scheduled_at"),
        ({"business_id": "a", "url": "https://a.example.com", "headers": {"X-Task-Id": "forged"}}, "headers.X-Task-Id"),
        # NUL characters: PostgreSQL stores none in text or jsonb (it answered 503 "database unavailable").
        ({"business_id": "a", "url": "https://a.example.com", "body": "a\x00b"}, "body"),
        ({"business_id": "a", "url": "https://a.example.com", "body": "x", "content_type": "text/\x00plain"},
         "content_type"),
        ({"business_id": "a", "url": "https://a.example.com", "metadata": {"k": ["x\x00"]}}, "metadata"),
        ({"business_id": "a", "url": "https://a.example.com", "metadata": {"\x00": 1}}, "metadata"),
        ({"business_id": "a", "url": "https://a.example.com", "notify": {"email": "a@b\x00"}}, "notify.email"),
    ],
)  # fmt: skip
async def test_invalid_create_requests_are_422_naming_the_field(
    api: Api, body: dict[str, Any], field: str
) -> None:
    key = await api.business_key("shop")
    _problem(await api.client.post("/tasks", json=body, headers=key), 422, "validation", field)
    assert await _stored(api) == 0


@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"])
async def test_a_scheduled_at_with_no_utc_time_says_so_once(api: Api, value: str) -> None:
    """It said "scheduled_at: scheduled_at is out of range"."""
    key = await api.business_key("shop")
    body = _problem(
        await api.client.post("/tasks", json=task_body("a", scheduled_at=value), headers=key),
        422, "validation", "scheduled_at",
    )  # fmt: skip
    assert body["detail"] == "scheduled_at: out of range (in UTC it falls before year 1 or after 9999)"


@pytest.mark.parametrize(
    "value", [1700000000, 1700000000.5, "1700000000", 0, "2030-01-31", "20300131T120000Z", True, [], {}]
)
async def test_scheduled_at_that_is_not_an_rfc_3339_date_time_is_422_naming_it(api: Api, value: Any) -> None:
    """A bare number used to be taken as a Unix time; DESIGN gives a schedule in seconds as ``delay``."""
    key = await api.business_key("shop")
    body = _problem(
        await api.client.post("/tasks", json=task_body("a", scheduled_at=value), headers=key),
        422, "validation", "scheduled_at",
    )  # fmt: skip
    assert "RFC 3339" in body["detail"] and "delay" in body["detail"]
    batch = await api.client.post(
        "/tasks/batch", headers=key, json={"tasks": [task_body("b", scheduled_at=value)]}
    )
    assert batch.status_code == 200, batch.text
    assert [(r["status"], r.get("field")) for r in batch.json()["results"]] == [(422, "scheduled_at")]
    assert await _stored(api) == 0
    task = await api.create(key, "c", delay=600)
    _problem(
        await api.client.patch(f"/tasks/{task['id']}", json={"scheduled_at": value}, headers=key),
        422, "validation", "scheduled_at",
    )  # fmt: skip
    assert (await api.client.get(f"/tasks/{task['id']}", headers=key)).json() == task


async def test_scheduled_at_without_a_time_zone_is_refused_not_taken_as_utc(api: Api) -> None:
    key = await api.business_key("shop")
    body = _problem(
        await api.client.post("/tasks", json=task_body("a", scheduled_at="2030-01-31T12:00:00"), headers=key),
        422, "validation", "scheduled_at",
    )  # fmt: skip
    assert "time zone" in body["detail"]


async def test_scheduled_at_forms_with_a_zone_are_accepted(api: Api) -> None:
    key = await api.business_key("shop")
    day = (datetime.now(UTC) + timedelta(days=30)).date().isoformat()
    for n, value in enumerate([f"{day}T12:00:00Z", f"{day}T13:00:00.5+01:00", f"{day} 12:00z"]):
        task = await api.create(key, f"t{n}", scheduled_at=value)
        assert task["scheduled_at"].startswith(f"{day}T12:00:00"), task


async def test_nul_characters_are_refused_by_a_change_and_in_a_batch(api: Api) -> None:
    key = await api.business_key("shop")
    task = await api.create(key, "a", delay=600)
    for change, field in (({"body": "\x00"}, "body"), ({"metadata": {"k": "\x00"}}, "metadata")):
        _problem(
            await api.client.patch(f"/tasks/{task['id']}", json=change, headers=key), 422, "validation", field
        )
    assert (await api.client.get(f"/tasks/{task['id']}", headers=key)).json() == task
    batch = await api.client.post("/tasks/batch", headers=key, json={"tasks": [
        task_body("b", metadata={"k": "\x00"}), task_body("c")]})  # fmt: skip
    assert batch.status_code == 200, batch.text
    assert [(r["status"], r.get("field")) for r in batch.json()["results"]] == [
        (422, "metadata"),
        (201, None),
    ]
    assert await _stored(api) == 2


def test_a_json_escape_that_only_looks_like_nul_is_kept() -> None:
    """A literal backslash before ``u0000`` is no NUL character: the check must not refuse it."""
    from taskcenter.intake import MAX_METADATA_BYTES, _json_object

    value = {"path": "C:\\u0000", "\\u0000": "\\\\u0000"}
    assert _json_object(value, "metadata", MAX_METADATA_BYTES) == value


async def test_a_json_body_nested_deeper_than_it_can_be_encoded_is_422(api: Api) -> None:
    """1000 levels parse (orjson allows 1024) but Python's encoder recursed out: a 500 from the create."""
    key = await api.business_key("shop")
    deep = "[" * 1000 + "]" * 1000
    raw = f'{{"business_id": "a", "url": "https://a.example.com", "json": {deep}}}'.encode()
    response = await api.client.post(
        "/tasks", content=raw, headers={**key, "content-type": "application/json"}
    )
    _problem(response, 422, "validation", "json")
    batch = await api.client.post(
        "/tasks/batch",
        content=b'{"tasks": [' + raw + b"]}",
        headers={**key, "content-type": "application/json"},
    )
    assert batch.status_code == 200, batch.text
    assert [(r["status"], r["field"]) for r in batch.json()["results"]] == [(422, "json")]
    assert await _stored(api) == 0


async def test_a_body_that_is_not_an_object_is_422(api: Api) -> None:
    key = await api.business_key("shop")
    _problem(await api.client.post("/tasks", json=[1, 2], headers=key), 422, "validation", "body")
    _problem(await api.client.post("/tasks", content=b"hello", headers={**key, "content-type": "text/plain"}), 422,
             "validation", "body")  # fmt: skip


async def test_a_missing_body_is_422(api: Api) -> None:
    key = await api.business_key("shop")
    _problem(await api.client.post("/tasks", headers=key), 422, "validation", "body")


async def test_an_oversized_body_is_413_by_content_length(api: Api) -> None:
    key = await api.business_key("shop")
    big = task_body("a", metadata={"pad": "x" * (1 << 20)})
    _problem(await api.client.post("/tasks", json=big, headers=key), 413, "too-large")
    assert await _stored(api) == 0


async def test_an_oversized_streamed_body_without_length_is_413(api: Api) -> None:
    key = await api.business_key("shop")

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"business_id": "a", "url": "https://a.example.com", "metadata": {"pad": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}}'

    response = await api.client.post(
        "/tasks", content=chunks(), headers={**key, "content-type": "application/json"}
    )
    _problem(response, 413, "too-large")
    assert await _stored(api) == 0


async def test_the_body_cap_is_configurable(db_url: str) -> None:
    async with serving(db_url, max_request_bytes=2048) as small:
        key = await small.business_key("shop")
        fits = await small.client.post(
            "/tasks", json=task_body("a", metadata={"pad": "x" * 1000}), headers=key
        )
        assert fits.status_code == 201
        too_big = await small.client.post(
            "/tasks", json=task_body("b", metadata={"pad": "x" * 3000}), headers=key
        )
        _problem(too_big, 413, "too-large")


@pytest.mark.parametrize(
    "ref",
    [
        "0b6f5d4e-7a5b-4a2e-9d1c-3f2a1b0c9d8e",
        "nope",
        "99999999999999999999999",
        "12345",
        "²",
        "%00",
        "a" * 300,
    ],
)
async def test_unknown_task_ids_are_404_on_every_task_endpoint(api: Api, ref: str) -> None:
    key = await api.business_key("shop")
    calls = [
        api.client.get(f"/tasks/{ref}", headers=key),
        api.client.get(f"/tasks/{ref}/attempts", headers=key),
        api.client.patch(f"/tasks/{ref}", json={"priority": 1}, headers=key),
        api.client.delete(f"/tasks/{ref}", headers=key),
        api.client.post(f"/tasks/{ref}/retry", headers=key),
        api.client.get(f"/tasks/business/{ref}", headers=key),
        api.client.delete(f"/tasks/business/{ref}", headers=key),
    ]
    for call in calls:
        _problem(await call, 404, "not-found")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"cursor": "garbage"}, "cursor"),
        ({"cursor": "dDE6YWJj"}, "cursor"),
        ({"cursor": "dDE6OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk"}, "cursor"),  # t1:99999999999999999999999
        ({"cursor": "dDE6OTIyMzM3MjAzNjg1NDc3NTgwOA"}, "cursor"),  # t1:9223372036854775808, past BIGINT
        ({"cursor": "dDE62aHZog"}, "cursor"),  # t1: and two Arabic-Indic digits
        ({"status": "pending,lost"}, "status"),
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"created_after": "yesterday"}, "created_after"),
        ({"created_after": "2026-01-01T00:00:00"}, "created_after"),
        ({"host": "a\x00b"}, "host"),
    ],
)
async def test_bad_list_parameters_are_422_naming_them(api: Api, params: dict[str, Any], field: str) -> None:
    key = await api.business_key("shop")
    _problem(await api.client.get("/tasks", params=params, headers=key), 422, "validation", field)


async def test_missing_or_wrong_credentials_are_401_with_a_challenge(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer tc_not-a-real-key-at-all"}, {"Authorization": "Bearer x.y.z"},
                    {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer nothing"}):  # fmt: skip
        response = await api.client.get("/tasks", headers=headers)
        _problem(response, 401, "unauthenticated")
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_operator_keys_cannot_use_task_endpoints_nor_business_keys_operator_ones(api: Api) -> None:
    key = await api.business_key("shop")
    _problem(await api.client.get("/tasks", headers=OPERATOR), 403, "forbidden")
    _problem(await api.client.post("/tasks", json=task_body("a"), headers=OPERATOR), 403, "forbidden")
    _problem(await api.client.get("/stats", headers=key), 403, "forbidden")
    _problem(await api.client.get("/audit", headers=key), 403, "forbidden")
    _problem(await api.client.post("/businesses", json={"code": "x"}, headers=key), 403, "forbidden")


async def test_unknown_routes_are_404_and_wrong_methods_405(api: Api) -> None:
    _problem(await api.client.get("/nowhere"), 404, "not-found")
    response = await api.client.put("/health")
    _problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "GET"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/tasks", "GET, POST"),
        ("DELETE", "/businesses", "GET, POST"),
        ("PATCH", "/hosts/api.example.com:443", "GET, PUT"),
        ("POST", "/tasks/business/order-1", "DELETE, GET"),
    ],
)
async def test_allow_names_every_method_of_the_path(api: Api, method: str, path: str, allow: str) -> None:
    """Before, it named only the first route matching the path: DELETE /tasks answered Allow: POST."""
    response = await api.client.request(method, path, headers=OPERATOR)
    _problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == allow


async def test_problem_responses_are_declared_in_the_openapi_document(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    create = spec["paths"]["/api/v1/tasks"]["post"]
    for code in ("400", "401", "403", "409", "413", "422", "429", "503"):
        assert "application/problem+json" in create["responses"][code]["content"], code
    assert spec["components"]["schemas"]["TaskCreate"]["examples"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


@pytest.mark.parametrize("length", [254, 300])
async def test_a_url_whose_host_is_longer_than_253_characters_is_refused(api: Api, length: int) -> None:
    key = await api.business_key("shop")
    url = f"https://{'a' * (length - 4)}.com/x"
    single = _problem(await api.client.post("/tasks", json=task_body("a", url=url), headers=key), 422,
                      "validation", "url")  # fmt: skip
    assert "host name is longer than 253 characters" in single["detail"]
    batch = await api.client.post("/tasks/batch", json={"tasks": [task_body("b", url=url)]}, headers=key)
    assert batch.json()["results"][0]["field"] == "url"
    assert "host name is longer than 253 characters" in batch.json()["results"][0]["error"]
    assert await _stored(api) == 0


async def test_a_bad_url_is_explained_without_internals(api: Api) -> None:
    key = await api.business_key("shop")
    response = await api.client.post(
        "/tasks", json=task_body("a", url="ftp://files.example.com/x"), headers=key
    )
    assert response.json()["detail"] == "url: must be an absolute http or https URL"


@pytest.mark.parametrize(
    ("extra", "detail"),
    [
        ({"url": "ftp://files.example.com/x"}, "url: must be an absolute http or https URL"),
        ({"method": "FROB"}, "method: must be one of GET, POST, PUT, PATCH, DELETE or HEAD"),
        (
            {"scheduled_at": "2030-01-31"},
            "scheduled_at: must be an RFC 3339 date-time with a time zone, e.g. 2030-01-31T12:00:00Z "
            "(for a number of seconds from now, use delay)",
        ),
    ],
    ids=["url", "method", "scheduled_at"],
)
async def test_a_batch_item_is_explained_in_the_same_words_as_a_single_create(
    api: Api, extra: dict[str, Any], detail: str
) -> None:
    """A batch item quoted the URL's regular expression and pydantic's ``Value error, ``."""
    key = await api.business_key("shop")
    single = await api.client.post("/tasks", json=task_body("a", **extra), headers=key)
    assert single.json()["detail"] == detail
    batch = await api.client.post("/tasks/batch", json={"tasks": [task_body("b", **extra)]}, headers=key)
    [item] = batch.json()["results"]
    assert item["status"] == 422 and item["error"] == detail, item
    assert item["field"] == detail.split(":")[0]


async def test_a_business_code_of_the_wrong_form_says_which_form(api: Api) -> None:
    """``code: does not have the expected format`` left the operator guessing."""
    response = await api.client.post("/businesses", json={"code": "Bad Code"}, headers=OPERATOR)
    body = _problem(response, 422, "validation", "code")
    assert body["detail"] == "code: must be 1-64 of a-z, 0-9, _ and -, starting with a letter or digit"
