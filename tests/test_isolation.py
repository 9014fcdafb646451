"""Tenant isolation: a business's key sees and touches only its own tasks; everything of another business
answers 404 — on every endpoint, in both directions — and is left unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.test_api_support import Api, serving


@pytest_asyncio.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    async with serving(db_url) as client:
        yield client


@dataclass
class Tenant:
    code: str
    key: dict[str, str]
    live: dict[str, Any]
    """A pending task."""
    cancelled: dict[str, Any]
    """A cancelled task (so that a retry by its owner would succeed)."""


Call = Callable[[httpx.AsyncClient, Tenant, dict[str, str]], Awaitable[httpx.Response]]

# Each call: (client, the victim tenant, the intruder's headers) -> response.
CALLS: dict[str, Call] = {
    "get": lambda c, v, h: c.get(f"/tasks/{v.live['id']}", headers=h),
    "get by numeric id": lambda c, v, h: c.get(f"/tasks/{v.live['row']}", headers=h),
    "attempts": lambda c, v, h: c.get(f"/tasks/{v.live['id']}/attempts", headers=h),
    "patch": lambda c, v, h: c.patch(f"/tasks/{v.live['id']}", json={"priority": 9}, headers=h),
    "put": lambda c, v, h: c.put(f"/tasks/{v.live['id']}", json={"priority": 9}, headers=h),
    "cancel": lambda c, v, h: c.delete(f"/tasks/{v.live['id']}", headers=h),
    "retry": lambda c, v, h: c.post(f"/tasks/{v.cancelled['id']}/retry", headers=h),
    "get by business_id": lambda c, v, h: c.get(f"/tasks/business/{v.live['business_id']}", headers=h),
    "cancel by business_id": lambda c, v, h: c.delete(f"/tasks/business/{v.live['business_id']}", headers=h),
    "business": lambda c, v, h: c.get(f"/businesses/{v.code}", headers=h),
    "rotate credentials": lambda c, v, h: c.put(f"/businesses/{v.code}/credentials", json={}, headers=h),
    "business stats": lambda c, v, h: c.get(f"/businesses/{v.code}/stats", headers=h),
}


async def _tenant(api: Api, code: str) -> Tenant:
    key = await api.business_key(code)
    live = await api.create(key, f"{code}-live")
    cancelled = await api.create(key, f"{code}-done")
    await api.client.delete(f"/tasks/{cancelled['id']}", headers=key)
    live["row"] = (await api.runtime.service.get_task(None, live["id"])).row_id
    return Tenant(code, key, live, cancelled)


@pytest.mark.parametrize("direction", ["a reaches into b", "b reaches into a"])
@pytest.mark.parametrize("name", list(CALLS))
async def test_another_business_resources_answer_404_and_stay_unchanged(
    api: Api, name: str, direction: str
) -> None:
    a, b = await _tenant(api, "alpha"), await _tenant(api, "beta")
    intruder, victim = (a, b) if direction == "a reaches into b" else (b, a)
    before = [
        (await api.client.get(f"/tasks/{t['id']}", headers=victim.key)).json()
        for t in (victim.live, victim.cancelled)
    ]
    response = await CALLS[name](api.client, victim, intruder.key)
    assert response.status_code == 404, response.text
    assert response.json()["type"] == "https://taskcenter.dev/problems/not-found"
    assert set(response.json()) == {
        "type",
        "title",
        "status",
        "detail",
    }  # a bare problem: nothing of the task
    after = [
        (await api.client.get(f"/tasks/{t['id']}", headers=victim.key)).json()
        for t in (victim.live, victim.cancelled)
    ]
    assert after == before
    assert (await api.client.get(f"/tasks/{victim.live['id']}", headers=victim.key)).status_code == 200


async def test_the_list_shows_only_the_callers_own_tasks(api: Api) -> None:
    a, b = await _tenant(api, "alpha"), await _tenant(api, "beta")
    for me, other in ((a, b), (b, a)):
        listed = (await api.client.get("/tasks", headers=me.key)).json()["tasks"]
        assert {t["business_code"] for t in listed} == {me.code}
        filtered = await api.client.get(
            "/tasks", params={"business_id": other.live["business_id"]}, headers=me.key
        )
        assert filtered.json()["tasks"] == []


async def test_the_same_business_id_may_live_in_two_businesses(api: Api) -> None:
    a, b = await api.business_key("alpha"), await api.business_key("beta")
    first, second = await api.create(a, "order-1"), await api.create(b, "order-1")
    assert first["id"] != second["id"]
    assert (await api.client.get("/tasks/business/order-1", headers=a)).json()["id"] == first["id"]
    assert (await api.client.get("/tasks/business/order-1", headers=b)).json()["id"] == second["id"]


async def test_a_business_cannot_read_another_business_audit_or_the_system_figures(api: Api) -> None:
    a = await _tenant(api, "alpha")
    for path in ("/audit", "/stats", "/businesses"):
        assert (await api.client.get(path, headers=a.key)).status_code == 403
