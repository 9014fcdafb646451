"""Operations endpoints: health (no auth), Prometheus metrics, system-wide figures and the audit log (operator)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from taskcenter.api.auth import Ctx, Operator
from taskcenter.api.problems import JSONResponse, OrjsonRoute, once_each
from taskcenter.api.schemas import AuditPage, Health, StatsOut
from taskcenter.api.tasks import query_text, utc
from taskcenter.domain.states import TaskStatus
from taskcenter.errors import BusinessNotFound, StorageError, ValidationError
from taskcenter.metrics import CONTENT_TYPE_LATEST
from taskcenter.observe import health as check_health
from taskcenter.storage.schema import tasks

router = APIRouter(tags=["operations"], route_class=OrjsonRoute)


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "The database is unreachable."}},
    summary="Liveness and database reachability",
)
async def health(ctx: Ctx) -> Response:
    """No authentication. 200 when the database answers, 503 when it does not."""
    status, body = await check_health(ctx.runtime.db, "running" if ctx.dispatcher_running else "off")
    return JSONResponse(body, status_code=status)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def metrics(ctx: Ctx) -> Response:
    """Prometheus text format; the queue gauge is read from the database at scrape time."""
    metrics = ctx.runtime.metrics
    try:
        async with ctx.runtime.db.read() as conn:
            rows = (
                await conn.execute(sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status))
            ).all()
        # Every status, 0 when none: a status the query no longer returns would keep its last count.
        counts: dict[str, int] = {status: count for status, count in rows}
        for status in TaskStatus:
            metrics.queue.labels(status=status.value).set(counts.get(status.value, 0))
    except (StorageError, OSError):
        pass  # the rest of the metrics are still worth scraping
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/stats",
    response_model=StatsOut,
    summary="System-wide figures (operator)",
    dependencies=[Depends(once_each())],
)
async def system_stats(
    ctx: Ctx, caller: Operator, window_hours: Annotated[float, Query(gt=0, le=2160)] = 24.0
) -> Response:
    """Counts by status, success rate, latency percentiles and busiest hosts over every business."""
    return JSONResponse(await ctx.stats.figures(None, window_hours=window_hours))


@router.get(
    "/audit",
    response_model=AuditPage,
    summary="The audit log (operator)",
    dependencies=[Depends(once_each())],
)
async def audit(
    ctx: Ctx,
    caller: Operator,
    actor: Annotated[str | None, Query(max_length=200, examples=["key:12"])] = None,
    action: Annotated[str | None, Query(max_length=64, examples=["task.cancel"])] = None,
    target: Annotated[str | None, Query(max_length=300)] = None,
    business: Annotated[str | None, Query(description="Business code.", max_length=64)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Response:
    """Newest first: key creation and rotation, business changes, and task cancel/retry/update through the API."""
    business_pk = None
    if query_text(business, "business"):
        try:
            business_pk = (await ctx.businesses.business(str(business))).pk
        except BusinessNotFound as exc:
            raise ValidationError(f"no business system {business!r}", field="business") from exc
    entries, next_cursor = await ctx.audit.list_entries(
        actor=query_text(actor, "actor"),
        action=query_text(action, "action"),
        target=query_text(target, "target"),
        business_pk=business_pk,
        since=utc(since, "since"),
        until=utc(until, "until"),
        cursor=cursor or None,
        limit=limit,
    )
    return JSONResponse({"entries": [e.to_dict() for e in entries], "next_cursor": next_cursor})
