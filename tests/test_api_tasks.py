"""Task endpoints over the real app and database: create, read, list, change, cancel, retry, batch, limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import pytest_asyncio

from taskcenter.api.schemas import TaskCreate
from taskcenter.api.tasks import _AS_SENT, task_json
from tests.receiver import Receiver, Reply
from tests.test_api_support import OPERATOR, PROBLEM, Api, serving, task_body
from tests.test_delivery import running


@pytest_asyncio.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    async with serving(db_url) as client:
        yield client


async def test_create_answers_201_with_the_task_representation(api: Api) -> None:
    key = await api.business_key("shop")
    response = await api.client.post(
        "/tasks", json=task_body("order-1", headers={"Authorization": "Bearer s3cret-value"}), headers=key
    )
    assert response.status_code == 201
    task = response.json()
    assert response.headers["location"] == f"/api/v1/tasks/{task['id']}"
    assert task["business_code"] == "shop" and task["business_id"] == "order-1"
    assert task["status"] == "pending" and task["attempts"] == 0 and task["type"] == "http"
    assert task["request"]["method"] == "POST" and task["request"]["url"] == "https://api.example.com/hook"
    assert task["request"]["content_type"] == "application/json"
    assert "s3cret-value" not in response.text
    assert task["created_at"].endswith("Z") and task["next_attempt_at"].endswith("Z")
    for name in ("retry", "timeout", "priority", "max_attempts", "scheduled_at", "last_attempt_at", "finished_at",
                 "last_response", "last_error", "outcome", "metadata", "updated_at"):  # fmt: skip
        assert name in task


async def test_business_default_retry_policy_applies_when_the_task_gives_none(api: Api) -> None:
    policy = {"strategy": "fixed", "interval": 5, "max_attempts": 3}
    key = await api.business_key("shop", retry=policy)
    task = await api.create(key, "a")
    assert task["retry"]["strategy"] == "fixed" and task["retry"]["interval"] == 5
    assert task["max_attempts"] == 3


async def test_a_task_retry_policy_overrides_the_business_default(api: Api) -> None:
    key = await api.business_key("shop", retry={"strategy": "fixed", "interval": 5, "max_attempts": 3})
    task = await api.create(key, "a", retry={"strategy": "intervals", "intervals": [1, 2]})
    assert task["retry"]["strategy"] == "intervals" and task["max_attempts"] == 3


async def test_a_live_duplicate_business_id_answers_409_naming_the_existing_task(api: Api) -> None:
    key = await api.business_key("shop")
    first = await api.create(key, "order-1")
    response = await api.client.post("/tasks", json=task_body("order-1"), headers=key)
    assert response.status_code == 409
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["type"] == "https://taskcenter.dev/problems/duplicate"
    assert problem["existing_id"] == first["id"] and problem["field"] == "business_id"
    assert first["id"] in problem["detail"]


async def test_a_business_id_is_free_again_once_its_task_is_cancelled(api: Api) -> None:
    key = await api.business_key("shop")
    first = await api.create(key, "order-1")
    assert (await api.client.delete(f"/tasks/{first['id']}", headers=key)).status_code == 200
    second = await api.create(key, "order-1")
    assert second["id"] != first["id"]


async def test_get_by_id_numeric_id_and_business_id_return_the_same_task(api: Api) -> None:
    key = await api.business_key("shop")
    task = await api.create(key, "order/7 ü")
    by_id = await api.client.get(f"/tasks/{task['id']}", headers=key)
    by_key = await api.client.get("/tasks/business/order/7 ü", headers=key)
    assert by_id.status_code == by_key.status_code == 200
    assert by_id.json() == by_key.json() == task


async def test_attempts_are_listed_oldest_first(api: Api, receiver: Receiver) -> None:
    key = await api.business_key("shop")
    receiver.script("/flaky", Reply(status=503), Reply(status=200))
    task = await api.create(
        key, "f", url=receiver.url("/flaky"), retry={"strategy": "intervals", "intervals": [0.05]}
    )
    async with running(api.runtime):
        await _wait_status(api, key, task["id"], "succeeded")
    response = await api.client.get(f"/tasks/{task['id']}/attempts", headers=key)
    attempts = response.json()["attempts"]
    assert [a["number"] for a in attempts] == [1, 2]
    assert [a["outcome"] for a in attempts] == ["server_error", "success"]
    assert attempts[1]["response"]["status_code"] == 200 and attempts[0]["started_at"].endswith("Z")
    done = (await api.client.get(f"/tasks/{task['id']}", headers=key)).json()
    assert done["last_response"]["status_code"] == 200 and done["attempts"] == 2


async def _wait_status(api: Api, key: dict[str, str], task_id: str, status: str) -> None:
    for _ in range(200):
        if (await api.client.get(f"/tasks/{task_id}", headers=key)).json()["status"] == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"task never became {status}")


async def _ids(api: Api, key: dict[str, str], **params: Any) -> list[str]:
    response = await api.client.get("/tasks", params=params, headers=key)
    assert response.status_code == 200, response.text
    return [t["business_id"] for t in response.json()["tasks"]]


async def test_list_is_newest_first_and_pages_with_a_cursor(api: Api) -> None:
    key = await api.business_key("shop")
    for n in range(7):
        await api.create(key, f"t{n}")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        body = (await api.client.get("/tasks", params=params, headers=key)).json()
        seen += [t["business_id"] for t in body["tasks"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"t{n}" for n in range(6, -1, -1)]
    assert pages == 3


async def test_pages_stay_stable_when_tasks_are_inserted_between_them(api: Api) -> None:
    key = await api.business_key("shop")
    for n in range(4):
        await api.create(key, f"old{n}")
    first = (await api.client.get("/tasks", params={"limit": 2}, headers=key)).json()
    for n in range(3):
        await api.create(key, f"new{n}")
    second = (
        await api.client.get("/tasks", params={"limit": 2, "cursor": first["next_cursor"]}, headers=key)
    ).json()
    assert [t["business_id"] for t in first["tasks"]] == ["old3", "old2"]
    assert [t["business_id"] for t in second["tasks"]] == ["old1", "old0"]


async def test_list_filters_by_status_host_business_id_and_creation_time(api: Api) -> None:
    key = await api.business_key("shop")
    await api.create(key, "a")
    await api.create(key, "b", url="https://other.example.org:8443/x")
    c = await api.create(key, "c")
    await api.client.delete(f"/tasks/{c['id']}", headers=key)
    assert await _ids(api, key, status="cancelled") == ["c"]
    assert await _ids(api, key, status="pending,cancelled") == ["c", "b", "a"]
    assert await _ids(api, key, host="other.example.org:8443") == ["b"]
    assert await _ids(api, key, business_id="a") == ["a"]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert await _ids(api, key, created_after=future) == []
    assert await _ids(api, key, created_before=future) == ["c", "b", "a"]


async def test_the_host_filter_without_a_port_matches_every_port_of_that_host(api: Api) -> None:
    """Before, ``host=api.example.com`` silently matched nothing: hosts are stored as ``host:port``."""
    key = await api.business_key("shop")
    await api.create(key, "https", url="https://api.example.com/hook")
    await api.create(key, "http", url="http://api.example.com/hook")
    await api.create(key, "alt", url="https://api.example.com:8443/hook")
    await api.create(key, "sub", url="https://sub.api.example.com/hook")
    await api.create(key, "longer", url="https://api.example.com.evil.example/hook")
    await api.create(key, "v6", url="http://[2001:db8::1]:8080/hook")
    await api.create(key, "under", url="https://a_b.example/hook")
    await api.create(key, "like", url="https://axb.example/hook")
    assert await _ids(api, key, host="api.example.com") == ["alt", "http", "https"]
    assert await _ids(api, key, host="API.Example.COM:443") == ["https"]
    assert await _ids(api, key, host="api.example.com:80") == ["http"]
    assert await _ids(api, key, host="[2001:db8::1]") == ["v6"]
    assert await _ids(api, key, host="2001:db8::1") == ["v6"]
    assert await _ids(api, key, host="[2001:db8::1]:8080") == ["v6"]
    assert await _ids(api, key, host="[2001:db8::1]:80") == []
    assert await _ids(api, key, host="a_b.example") == ["under"]  # "_" is no LIKE wildcard here


@pytest.mark.parametrize(
    "host",
    [" ", "api.example.com ", "api example.com", "http://api.example.com", "https://api.example.com/x",
     "api.example.com/x", "user@api.example.com", "api.example.com:", "api.example.com:0",
     "api.example.com:65536", "api.example.com:https", ":443", "[::1", "[zz::1]:80", "-a.example", "a..b"],
)  # fmt: skip
async def test_a_host_filter_no_task_can_have_is_a_422_saying_what_is_expected(api: Api, host: str) -> None:
    key = await api.business_key("shop")
    response = await api.client.get("/tasks", params={"host": host}, headers=key)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["field"] == "host" and "host:port" in body["detail"], body


async def test_an_empty_host_filter_is_no_filter_like_the_list_s_other_filters(api: Api) -> None:
    """DESIGN's list line reads ``?status=&host=&…``: a client that fills it with empty values lists everything."""
    key = await api.business_key("shop")
    await api.create(key, "a")
    await api.create(key, "b", url="https://other.example.org:8443/x")
    every = await api.client.get("/tasks", headers=key)
    assert len(every.json()["tasks"]) == 2
    empty = await api.client.get("/tasks", params={"host": "", "status": "", "business_id": ""}, headers=key)
    assert empty.status_code == 200, empty.text
    assert empty.json() == every.json()


async def test_a_url_given_as_the_host_filter_is_answered_with_the_host_to_give(api: Api) -> None:
    key = await api.business_key("shop")
    response = await api.client.get("/tasks", params={"host": "https://api.example.com/hook"}, headers=key)
    assert response.status_code == 422
    assert "api.example.com:443" in response.json()["detail"]


async def test_the_host_filter_names_a_processor_task_type_as_its_tasks_carry_it(api: Api) -> None:
    """``processor:<type>`` (as the stats list it) still matches exactly, and is no port of a host "processor"."""
    key = await api.business_key("shop")
    api.runtime.processors.register("Make Server", lambda payload: payload)
    made = await api.client.post(
        "/tasks", json={"business_id": "proc", "type": "Make Server", "payload": {}}, headers=key
    )
    assert made.status_code == 201, made.text
    await api.create(key, "http", url="http://processor/hook")
    assert await _ids(api, key, host="processor:Make Server") == ["proc"]
    assert await _ids(api, key, host="processor") == ["http"]
    assert await _ids(api, key, host="processor:80") == ["http"]


async def test_status_given_twice_lists_both_like_a_comma(api: Api) -> None:
    """Before, ``?status=pending&status=cancelled`` silently listed only the cancelled tasks."""
    key = await api.business_key("shop")
    await api.create(key, "a")
    c = await api.create(key, "c")
    await api.client.delete(f"/tasks/{c['id']}", headers=key)
    assert await _ids(api, key, status=["pending", "cancelled"]) == ["c", "a"]
    assert await _ids(api, key, status=["pending,cancelled", "pending"]) == ["c", "a"]


@pytest.mark.parametrize(
    ("name", "values"),
    [("limit", ["1", "2"]), ("host", ["a.example.com", "b.example.com"]), ("business_id", ["a", "b"]),
     ("cursor", ["dDE6MQ", "dDE6Mg"]), ("created_after", ["2026-01-01T00:00:00Z"] * 2),
     ("created_before", ["2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"])],
)  # fmt: skip
async def test_a_list_filter_given_twice_is_a_422_naming_it(api: Api, name: str, values: list[str]) -> None:
    """Before, the last one silently won: ``?host=a.example.com&host=b.example.com`` listed b's tasks only."""
    key = await api.business_key("shop")
    response = await api.client.get("/tasks", params={name: values}, headers=key)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == name and "more than once" in response.json()["detail"]


BIG = "123456789012345678901234567890"  # past 64 bits: orjson reads it as the float 1.2345678901234568e+29
LOW = "-9223372036854775809"  # one below -2**63, 19 digits


async def test_json_integers_beyond_64_bits_are_sent_exactly_not_as_floats(api: Api) -> None:
    """Before, ``{"n": 123456789012345678901234567890}`` was stored and sent as ``{"n":1.2345678901234568e+29}``:
    a receiver got another number, silently. Every way in: the fast create, the route (another content type),
    a batch item and a PATCH."""
    key = await api.business_key("shop")
    raw = '{"business_id": "%s", "url": "https://api.example.com/hook", "json": {"n": %s, "m": [%s]}}'
    want = f'{{"n":{BIG},"m":[{LOW}]}}'
    bodies = []
    for n, content_type in enumerate(["application/json", "application/merge-patch+json"]):
        created = await api.client.post(
            "/tasks", content=raw % (f"big-{n}", BIG, LOW), headers={**key, "content-type": content_type}
        )
        assert created.status_code == 201, created.text
        bodies.append(created.json()["request"]["body"])
    batch = '{"tasks": [%s]}' % (raw % ("big-batch", BIG, LOW))
    stored = await api.client.post(
        "/tasks/batch", content=batch, headers={**key, "content-type": "application/json"}
    )
    bodies.append(stored.json()["results"][0]["task"]["request"]["body"])
    task = await api.create(key, "big-patch")
    patched = await api.client.patch(
        f"/tasks/{task['id']}", content=f'{{"json": {{"n": {BIG}, "m": [{LOW}]}}}}',
        headers={**key, "content-type": "application/json"},
    )  # fmt: skip
    assert patched.status_code == 200, patched.text
    bodies.append(patched.json()["request"]["body"])
    assert bodies == [want] * 4


async def test_an_integer_beyond_64_bits_in_metadata_is_a_422_naming_it(api: Api) -> None:
    """Metadata is kept as JSON and answered back, where such a number cannot go: refused, not rounded."""
    key = await api.business_key("shop")
    raw = f'{{"business_id": "m", "url": "https://api.example.com/hook", "metadata": {{"n": {BIG}}}}}'
    response = await api.client.post(
        "/tasks", content=raw, headers={**key, "content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["field"] == "metadata" and "beyond 64 bits" in response.json()["detail"]


async def test_patch_changes_a_pending_task_and_put_is_accepted_too(api: Api) -> None:
    key = await api.business_key("shop")
    task = await api.create(key, "a")
    patched = await api.client.patch(
        f"/tasks/{task['id']}",
        json={"url": "https://api.example.com/v2", "priority": 5, "timeout": 12},
        headers=key,
    )
    assert patched.status_code == 200, patched.text
    assert (
        patched.json()["request"]["url"] == "https://api.example.com/v2" and patched.json()["priority"] == 5
    )
    put = await api.client.put(f"/tasks/{task['id']}", json={"delay": 600}, headers=key)
    assert put.status_code == 200 and put.json()["scheduled_at"] is not None


async def test_changing_a_task_that_is_not_pending_or_retrying_answers_409(api: Api) -> None:
    key = await api.business_key("shop")
    task = await api.create(key, "a")
    await api.client.delete(f"/tasks/{task['id']}", headers=key)
    response = await api.client.patch(f"/tasks/{task['id']}", json={"priority": 1}, headers=key)
    assert response.status_code == 409
    assert response.json()["type"] == "https://taskcenter.dev/problems/invalid-transition"


async def test_cancel_by_id_and_by_business_id(api: Api) -> None:
    key = await api.business_key("shop")
    a, _ = await api.create(key, "a"), await api.create(key, "b")
    assert (await api.client.delete(f"/tasks/{a['id']}", headers=key)).json()["status"] == "cancelled"
    by_key = await api.client.delete("/tasks/business/b", headers=key)
    assert by_key.status_code == 200 and by_key.json()["status"] == "cancelled"
    again = await api.client.delete(f"/tasks/{a['id']}", headers=key)
    assert again.status_code == 409


async def test_manual_retry_renews_a_cancelled_task_and_refuses_a_pending_one(api: Api) -> None:
    key = await api.business_key("shop")
    task = await api.create(key, "a")
    refused = await api.client.post(f"/tasks/{task['id']}/retry", headers=key)
    assert refused.status_code == 409
    await api.client.delete(f"/tasks/{task['id']}", headers=key)
    retried = await api.client.post(f"/tasks/{task['id']}/retry", headers=key)
    assert retried.status_code == 200 and retried.json()["status"] == "pending"
    assert retried.json()["finished_at"] is None


async def test_batch_stores_the_valid_items_and_reports_every_item(api: Api) -> None:
    key = await api.business_key("shop")
    existing = await api.create(key, "taken")
    items = [
        task_body("b0"),
        {"business_id": "b1", "url": 5},
        task_body("b2", url="ftp://files.example.com/x"),
        task_body("b0"),
        task_body("taken"),
        task_body("b5", surprise=True),
        task_body("b6"),
    ]
    response = await api.client.post("/tasks/batch", json={"tasks": items}, headers=key)
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert [r["index"] for r in results] == list(range(7))
    assert [r["status"] for r in results] == [201, 422, 422, 409, 409, 422, 201]
    assert body["created"] == 2 and body["failed"] == 5
    assert results[0]["task"]["business_id"] == "b0"
    assert results[1]["field"] == "url" and results[2]["field"] == "url" and results[5]["field"] == "surprise"
    assert results[4]["existing_id"] == existing["id"]
    assert sorted(await _ids(api, key)) == ["b0", "b6", "taken"]


async def test_a_batch_item_that_is_no_object_is_reported_in_our_words(api: Api) -> None:
    """Before, such an item's error was pydantic's "Input should be a valid dictionary or instance of
    TaskCreate" (a class name the caller never saw)."""
    key = await api.business_key("shop")
    items = [None, 1, "x", [], task_body("ok")]
    response = await api.client.post("/tasks/batch", json={"tasks": items}, headers=key)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [422, 422, 422, 422, 201]
    for r in results[:4]:
        assert r["error"] == "each task must be a JSON object" and r["field"] is None, r


async def test_a_batch_answers_each_stored_task_exactly_as_a_single_create_does(api: Api) -> None:
    """The batch builds its tasks' public form straight from the rows; key for key, it is task_json's."""
    service = api.runtime.service
    shop = await service.ensure_business("shop")
    items = [
        task_body("plain"),
        task_body("full", headers={"Authorization": "Bearer s3cret", "X-A": "1"}, metadata={"k": [1, None]},
                  notify={"url": "https://example.com/done"}, success_codes=[200], retry_on=[409], priority=5,
                  delay=60, timeout=2.5, follow_redirects=True, retry={"strategy": "fixed", "interval": 3}),
        task_body("form", json=None, form={"a": 1}, method="PUT"),
        {"business_id": "no-body", "url": "https://api.example.com/x", "method": "GET"},
    ]  # fmt: skip
    results = await service.create_tasks(shop, items, public=True)
    for item, result in zip(items, results, strict=True):
        assert result["status"] == 201, result
        public = result["task"]
        row = {"id": 1, **service.prepare(shop, item, now=public["created_at"], task_uuid=public["id"])}
        expected = task_json(service._task_from_new_row(shop, row))
        assert list(public.items()) == list(expected.items())


AS_SENT_SAMPLES: list[dict[str, Any]] = [
    {"business_id": "a", "url": "https://x.example.com", "method": "put", "headers": {"X-A": "1", "B": ""}},
    {"business_id": "a", "url": "https://x.example.com", "json": {"f": 1.0, "i": 1, "b": True, "n": None, "l": [1.5]}},
    {"business_id": "a", "url": "https://x.example.com", "json": None, "form": {"i": 1, "f": 2.0, "b": False, "s": "x"}},
    {"business_id": "a", "url": "https://x.example.com", "body": "<x/>", "content_type": "application/xml"},
    {"business_id": "a", "type": "resize", "payload": {"w": 1.0, "h": [2]}, "priority": -3},
    {"business_id": "a", "url": "https://x.example.com", "success_codes": [200], "retry_on": [409, 503],
     "follow_redirects": True, "notify": {"url": "https://n.example.com", "on": ["failed"]},
     "metadata": {"k": {"v": 1.0}}},
    {"business_id": "a", "url": "https://x.example.com", "notify": {"email": "a@b.example", "on": None}, "type": None},
]  # fmt: skip


@pytest.mark.parametrize("item", AS_SENT_SAMPLES)
def test_fields_the_batch_passes_on_as_sent_are_dumped_back_unchanged_by_pydantic(
    item: dict[str, Any],
) -> None:
    assert _AS_SENT.issuperset(item)
    dumped = TaskCreate.model_validate(item).model_dump(exclude_unset=True, by_alias=True)
    assert dumped.keys() == item.keys()  # in the schema's order, which the service does not depend on
    for name, value in item.items():  # value for value, nested order kept, 1.0 stays 1.0 and 1 stays 1
        assert orjson.dumps(dumped[name]) == orjson.dumps(value), name


def test_only_fields_that_validation_changes_are_dumped() -> None:
    fields = {f.alias or name for name, f in TaskCreate.model_fields.items()}
    assert fields - _AS_SENT == {"delay", "timeout", "scheduled_at", "retry"}


async def test_a_batch_stores_converted_fields_as_a_single_create_does(api: Api) -> None:
    key = await api.business_key("shop")
    extra = {"timeout": 3, "delay": 5, "retry": {"strategy": "intervals", "intervals": [1, 2]},
             "scheduled_at": None}  # fmt: skip
    single = await api.create(key, "single", **extra)
    response = await api.client.post(
        "/tasks/batch", json={"tasks": [task_body("batch", **extra)]}, headers=key
    )
    batched = response.json()["results"][0]["task"]
    for name in ("timeout", "retry", "max_attempts"):
        assert orjson.dumps(batched[name]) == orjson.dumps(single[name]), name
    assert (
        batched["scheduled_at"] is not None and single["scheduled_at"] is not None
    )  # delay 5 s from each one's now


async def test_a_batch_of_more_than_1000_tasks_is_refused_whole(api: Api) -> None:
    key = await api.business_key("shop")
    items = [task_body(f"k{n}") for n in range(1001)]
    response = await api.client.post("/tasks/batch", json={"tasks": items}, headers=key)
    assert response.status_code == 422 and response.json()["field"] == "tasks"
    assert await _ids(api, key) == []


async def test_a_batch_of_1000_is_stored(api: Api) -> None:
    key = await api.business_key("shop")
    items = [task_body(f"k{n}") for n in range(1000)]
    response = await api.client.post("/tasks/batch", json={"tasks": items}, headers=key)
    assert response.status_code == 200 and response.json()["created"] == 1000


async def test_creating_past_max_active_tasks_answers_429_naming_the_limit(api: Api) -> None:
    key = await api.business_key("small", max_active_tasks=3)
    for n in range(3):
        await api.create(key, f"t{n}")
    response = await api.client.post("/tasks", json=task_body("t3"), headers=key)
    assert response.status_code == 429
    problem = response.json()
    assert problem["type"] == "https://taskcenter.dev/problems/limit-exceeded"
    assert problem["limit"] == "max_active_tasks" and "max_active_tasks" in problem["detail"]
    batch = await api.client.post("/tasks/batch", json={"tasks": [task_body("b")]}, headers=key)
    assert batch.status_code == 429 and batch.json()["limit"] == "max_active_tasks"


async def test_finished_tasks_do_not_count_against_max_active_tasks(api: Api) -> None:
    key = await api.business_key("small", max_active_tasks=2)
    for n in range(2):
        task = await api.create(key, f"t{n}")
        await api.client.delete(f"/tasks/{task['id']}", headers=key)
    await api.create(key, "t2")


async def test_a_timeout_over_30_seconds_is_refused(api: Api) -> None:
    key = await api.business_key("shop")
    response = await api.client.post("/tasks", json=task_body("a", timeout=31), headers=key)
    assert response.status_code == 422 and response.json()["field"] == "timeout"


async def test_more_than_10_retries_is_refused(api: Api) -> None:
    key = await api.business_key("shop")
    exponential = task_body("a", retry={"strategy": "exponential", "max_attempts": 12})
    intervals = task_body("b", retry={"strategy": "intervals", "intervals": [1] * 11})
    for body in (exponential, intervals):
        response = await api.client.post("/tasks", json=body, headers=key)
        assert response.status_code == 422, response.text
        assert response.json()["field"].startswith("retry.")
    allowed = await api.client.post("/tasks", json=task_body("c", retry={"max_attempts": 11}), headers=key)
    assert allowed.status_code == 201


async def test_a_processor_type_without_a_registered_processor_is_refused(api: Api) -> None:
    key = await api.business_key("shop")
    response = await api.client.post(
        "/tasks", json={"business_id": "p", "type": "nothing", "payload": {}}, headers=key
    )
    assert response.status_code == 422 and response.json()["field"] == "type"


async def test_created_tasks_are_counted_in_metrics(api: Api) -> None:
    key = await api.business_key("shop")
    await api.create(key, "a")
    await api.client.post("/tasks/batch", json={"tasks": [task_body("b"), task_body("c")]}, headers=key)
    text = (await api.client.get("/metrics")).text
    assert "taskcenter_tasks_created_total 3.0" in text
    assert 'taskcenter_tasks{status="pending"} 3.0' in text
    assert (await api.client.get("/metrics", headers=OPERATOR)).status_code == 200
