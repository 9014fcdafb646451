"""Operations endpoints: health, metrics, figures (business and system-wide) and the audit log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import prometheus_client
import pytest
import pytest_asyncio
import sqlalchemy as sa

from taskcenter.api import create_app
from taskcenter.runtime import Runtime
from taskcenter.stats import percentile
from taskcenter.storage.schema import attempts
from tests.conftest import make_settings
from tests.receiver import Receiver, Reply
from tests.test_api_support import OPERATOR, OPERATOR_KEY, Api, serving
from tests.test_delivery import running


@pytest_asyncio.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    async with serving(db_url) as client:
        yield client


async def test_health_answers_without_credentials(api: Api) -> None:
    for path in ("/health", "http://testserver/health"):
        response = await api.client.get(path)
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "database": "ok", "dispatcher": "off"}


async def test_health_is_503_and_other_endpoints_503_problems_when_the_database_is_unreachable() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    runtime = Runtime(make_settings("postgresql://postgres@127.0.0.1:1/none", operator_key=OPERATOR_KEY))
    app = create_app(runtime, dispatcher_running=True)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver/api/v1") as client:
            health = await client.get("/health")
            assert health.status_code == 503
            assert health.json() == {
                "status": "unavailable",
                "database": "unreachable",
                "dispatcher": "running",
            }
            stats = await client.get("/stats", headers=OPERATOR)
            assert stats.status_code == 503 and stats.json()["type"].endswith("/unavailable")
            assert (await client.get("/metrics")).status_code == 200
    finally:
        await runtime.close()


async def test_metrics_are_in_prometheus_text_format(api: Api) -> None:
    response = await api.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "# TYPE taskcenter_attempts_total counter" in response.text


async def test_metrics_carry_no_created_series_and_leave_the_process_wide_setting_alone(api: Api) -> None:
    """Before, every counter and histogram came with an undocumented ``*_created`` series (a timestamp per
    label set). They are dropped from taskcenter's own page only: an application embedding the library keeps
    prometheus-client's setting for its own metrics."""
    key = await api.business_key("shop")
    await api.create(key, "a")
    text = (await api.client.get("/metrics")).text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert "taskcenter_tasks_created_total" in names and "taskcenter_attempt_duration_seconds_count" in names
    assert [name for name in names if name.endswith("_created")] == []
    assert "# TYPE taskcenter_tasks_created_total counter" in text  # that name is no created series

    theirs = prometheus_client.CollectorRegistry()
    prometheus_client.Counter("app_jobs", "An application's own counter.", registry=theirs).inc()
    assert "app_jobs_created " in prometheus_client.generate_latest(theirs).decode()


async def test_the_queue_gauge_drops_to_zero_when_a_status_empties(api: Api) -> None:
    """Before, a status no task had any more kept its last count: a drained queue looked full forever."""

    def gauge(text: str) -> dict[str, float]:
        lines = [line for line in text.splitlines() if line.startswith("taskcenter_tasks{")]
        return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in lines}

    key = await api.business_key("shop")
    task = await api.create(key, "gauge-1", delay=600)
    assert gauge((await api.client.get("/metrics")).text)["pending"] == 1
    assert (await api.client.delete(f"/tasks/{task['id']}", headers=key)).status_code == 200
    after = gauge((await api.client.get("/metrics")).text)
    assert after == {
        "pending": 0,
        "processing": 0,
        "retrying": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 1,
    }


def test_percentiles_interpolate_like_percentile_cont() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.5
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


async def test_latency_percentiles_agree_on_both_backends(api: Api) -> None:
    key = await api.business_key("shop")
    task = await api.create(key, "a")
    row_id = (await api.runtime.service.get_task(None, task["id"])).row_id
    now = datetime.now(UTC)
    rows = [{"task_id": row_id, "number": n, "started_at": now - timedelta(minutes=1), "duration_ms": n,
             "outcome": "server_error"} for n in range(1, 101)]  # fmt: skip
    old = {**rows[0], "number": 101, "started_at": now - timedelta(days=3), "duration_ms": 100_000}
    async with api.runtime.db.write() as conn:
        await conn.execute(sa.insert(attempts), [*rows, old])
    latency = (await api.client.get("/businesses/shop/stats", headers=key)).json()["latency_ms"]
    # Exactly, to the hundredth of a millisecond: before, interpolation's float noise showed (90.10000000000001).
    assert latency == {"p50": 50.5, "p90": 90.1, "p95": 95.05, "p99": 99.01, "samples": 100}
    wide = (await api.client.get("/businesses/shop/stats", params={"window_hours": 100}, headers=key)).json()
    assert wide["latency_ms"]["samples"] == 101


async def test_business_figures_count_outcomes_and_hosts(api: Api, receiver: Receiver) -> None:
    key = await api.business_key("shop")
    other = await api.business_key("other")
    receiver.script("/bad", Reply(status=404))
    await api.create(key, "ok", url=receiver.url("/ok"))
    await api.create(key, "bad", url=receiver.url("/bad"))
    await api.create(key, "later", delay=3600)
    await api.create(other, "elsewhere", delay=3600)
    async with running(api.runtime):
        await receiver.wait_for(1, "/bad", timeout=10)
        await receiver.wait_for(1, "/ok", timeout=10)
        for _ in range(100):
            figures = (await api.client.get("/businesses/shop/stats", headers=key)).json()
            if figures["counts"]["succeeded"] + figures["counts"]["failed"] == 2:
                break
            await asyncio.sleep(0.05)
    assert figures["counts"] == {"pending": 1, "processing": 0, "retrying": 0, "succeeded": 1, "failed": 1,
                                 "cancelled": 0}  # fmt: skip
    assert figures["total"] == 3 and figures["success_rate"] == 0.5 and figures["business_code"] == "shop"
    assert figures["latency_ms"]["samples"] == 2 and figures["latency_ms"]["p50"] is not None
    [receiver_host, example] = figures["hosts"]
    assert receiver_host["tasks"] == 2 and receiver_host["succeeded"] == 1 and receiver_host["failed"] == 1
    assert example["host"] == "api.example.com:443"
    system = (await api.client.get("/stats", headers=OPERATOR)).json()
    assert system["businesses"] == 2 and system["total"] == 4 and system["business_code"] is None


async def test_bad_figure_windows_are_422(api: Api) -> None:
    for window in ("0", "-1", "100000", "soon"):
        response = await api.client.get("/stats", params={"window_hours": window}, headers=OPERATOR)
        assert response.status_code == 422 and response.json()["field"] == "window_hours"


async def test_task_actions_through_the_api_are_audited_with_the_key_id(api: Api) -> None:
    reg = await api.register("shop")
    key = {"Authorization": f"Bearer {reg['api_key']}"}
    task = await api.create(key, "a")
    await api.client.patch(f"/tasks/{task['id']}", json={"priority": 3}, headers=key)
    await api.client.delete(f"/tasks/{task['id']}", headers=key)
    await api.client.post(f"/tasks/{task['id']}/retry", headers=key)
    entries = (await api.client.get("/audit", params={"business": "shop"}, headers=OPERATOR)).json()[
        "entries"
    ]
    task_entries = [e for e in entries if e["target_type"] == "task"]
    assert [e["action"] for e in task_entries] == ["task.retry", "task.cancel", "task.update"]
    assert {e["actor"] for e in task_entries} == {f"key:{reg['key_id']}"}
    assert {e["target"] for e in task_entries} == {task["id"]}
    assert task_entries[2]["details"] == {"fields": ["priority"]}
    assert all(e["at"].endswith("Z") for e in entries) and reg["api_key"] not in str(entries)


async def test_the_audit_log_filters_and_pages(api: Api) -> None:
    key = await api.business_key("shop")
    await api.business_key("other")
    for n in range(3):
        task = await api.create(key, f"t{n}")
        await api.client.delete(f"/tasks/{task['id']}", headers=key)
    cancels = (
        await api.client.get("/audit", params={"action": "task.cancel", "limit": 2}, headers=OPERATOR)
    ).json()
    assert len(cancels["entries"]) == 2 and cancels["next_cursor"]
    rest = await api.client.get(
        "/audit",
        params={"action": "task.cancel", "limit": 2, "cursor": cancels["next_cursor"]},
        headers=OPERATOR,
    )
    assert len(rest.json()["entries"]) == 1 and rest.json()["next_cursor"] is None
    others = (await api.client.get("/audit", params={"business": "other"}, headers=OPERATOR)).json()[
        "entries"
    ]
    assert {e["business_code"] for e in others} == {"other"}
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert (await api.client.get("/audit", params={"since": future}, headers=OPERATOR)).json()[
        "entries"
    ] == []


@pytest.mark.parametrize(
    ("params", "field"),
    [({"cursor": "nope"}, "cursor"), ({"business": "ghost"}, "business"), ({"limit": 0}, "limit")],
)
async def test_bad_audit_queries_are_422(api: Api, params: dict[str, object], field: str) -> None:
    response = await api.client.get("/audit", params=params, headers=OPERATOR)
    assert response.status_code == 422 and response.json()["field"] == field


async def test_openapi_and_docs_are_served(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    assert spec["info"]["title"] == "taskcenter"
    paths = set(spec["paths"])
    for path in ("/api/v1/tasks", "/api/v1/tasks/batch", "/api/v1/tasks/{task_id}", "/api/v1/tasks/{task_id}/attempts",
                 "/api/v1/tasks/business/{business_id}", "/api/v1/tasks/{task_id}/retry", "/api/v1/businesses",
                 "/api/v1/businesses/{code}", "/api/v1/businesses/{code}/credentials",
                 "/api/v1/businesses/{code}/stats", "/api/v1/health", "/api/v1/metrics", "/api/v1/stats",
                 "/api/v1/audit"):  # fmt: skip
        assert path in paths, path
    docs = await api.client.get("http://testserver/docs")
    assert docs.status_code == 200 and "/api/v1/openapi.json" in docs.text


@pytest.mark.parametrize(
    "query",
    [
        "/audit?action=task.cancel&action=task.retry",
        "/hosts?limit=1&limit=2",
        "/stats?window_hours=1&window_hours=2",
    ],
)
async def test_an_operator_list_parameter_given_twice_is_a_422_naming_it(api: Api, query: str) -> None:
    response = await api.client.get(query, headers=OPERATOR)
    assert response.status_code == 422, response.text
    name = query.split("?")[1].split("=")[0]
    assert response.json()["field"] == name and "more than once" in response.json()["detail"]
