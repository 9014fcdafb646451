"""Task endpoints: create (one or a batch), read, list, change, cancel and retry — always within the caller's
business, so another business's task answers 404 exactly like a missing one."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskcenter.api.auth import ApiContext, BusinessCaller, Ctx, business_of
from taskcenter.api.problems import (
    JSONResponse,
    OrjsonRoute,
    from_error,
    loads,
    once_each,
    problem,
    validation_message,
)
from taskcenter.api.schemas import AttemptList, BatchResult, TaskCreate, TaskOut, TaskPage, TaskUpdate
from taskcenter.domain.states import TaskStatus
from taskcenter.domain.task import Attempt, Task
from taskcenter.errors import TaskCenterError, TaskNotFound, ValidationError

log = logging.getLogger("taskcenter.api")
router = APIRouter(prefix="/tasks", tags=["tasks"], route_class=OrjsonRoute)

_ROW_ID = re.compile(r"^[0-9]{1,18}$")
_TASK_FIELDS = tuple(f for f in Task.__dataclass_fields__ if f != "row_id")
_STATUSES = frozenset(s.value for s in TaskStatus)
TraceParent = Annotated[
    str | None,
    Header(description="W3C trace context; continued on the task's outbound requests.", examples=[
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"]),
]  # fmt: skip


def task_json(task: Task) -> dict[str, Any]:
    """A task's public form (orjson writes the datetimes as RFC 3339 UTC)."""
    return {name: getattr(task, name) for name in _TASK_FIELDS}


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    return {name: getattr(attempt, name) for name in Attempt.__dataclass_fields__}


def task_ref(raw: str) -> str:
    """A path's task reference, or :class:`TaskNotFound` when it cannot name any task (a UUID or a row id)."""
    text = raw.strip()
    if _ROW_ID.match(text) or (
        len(text) <= 45 and text.isascii() and text.isprintable() and not text.isdigit()
    ):
        return text
    raise TaskNotFound(f"no task {raw[:60]!r}")


def clean_business_id(value: str) -> str:
    """A ``business_id`` from a path: one that no task can hold is simply not found."""
    if not value or len(value) > 255 or any(ord(c) < 32 for c in value):
        raise TaskNotFound(f"no task with business_id {value[:60]!r}")
    return value


def utc(value: datetime | None, field: str) -> datetime | None:
    """An aware UTC datetime from a query parameter; naive or out-of-range values are :class:`ValidationError`."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValidationError(f"{field} needs a time zone (e.g. 2026-01-31T12:00:00Z)", field=field)
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise ValidationError(f"{field} is out of range", field=field) from exc


def query_text(value: str | None, field: str) -> str | None:
    if value is not None and any(ord(c) < 32 for c in value):
        raise ValidationError(f"{field} contains control characters", field=field)
    return value or None


def _created(task: Task) -> Response:
    return JSONResponse(task_json(task), status_code=201, headers={"Location": f"/api/v1/tasks/{task.id}"})


@router.post("", status_code=201, response_model=TaskOut, summary="Create a task")
async def create_task(
    body: TaskCreate, ctx: Ctx, caller: BusinessCaller, traceparent: TraceParent = None
) -> Response:
    """Store one task (201). A live task holding the same ``business_id`` answers 409 naming it."""
    data = body.model_dump(exclude_unset=True, by_alias=True)
    task = await ctx.tasks.create_task(business_of(caller), data, traceparent=traceparent)
    ctx.runtime.metrics.created.inc()
    return _created(task)


class FastCreate:
    """``POST {prefix}/tasks`` without FastAPI's per-request machinery, for requests that are plainly valid.

    The single create is the API's hottest path, and routing, dependency solving and request objects cost
    about as much CPU as the create itself. This ASGI middleware (inside :class:`~taskcenter.api.problems.
    BodyLimit`, which has already read the whole body) serves a create only when everything about it is
    ordinary: a JSON content type, a body that parses and validates against :class:`TaskCreate` exactly as
    FastAPI would validate it, and a bearer credential of an active business. It then runs the same handler
    steps as :func:`create_task` and answers with the same response; errors raised by the service (409, 429,
    422, 503) are mapped by the same :func:`~taskcenter.api.problems.from_error`. Anything else — no or bad
    credentials, an operator key, another content type, malformed JSON, a body pydantic refuses — is passed,
    body untouched, to the FastAPI route, which produces the usual answer or problem. So the contract (OpenAPI,
    problem types, precedence of errors) is the route's; this only skips work on the common case.
    """

    def __init__(self, app: ASGIApp, ctx: ApiContext, path: str) -> None:
        self.app = app
        self.ctx = ctx
        self.path = path
        self.served = 0
        """Creates this middleware answered itself (the rest went to the route)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != self.path
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        message = await receive()
        replay = _replay(message, receive)
        response = None
        if message["type"] == "http.request" and not message.get("more_body", False):
            response = await self._create(scope, message.get("body", b""))
        if response is None:
            await self.app(scope, replay, send)
            return
        self.served += 1
        await response(scope, replay, send)

    async def _create(self, scope: Scope, raw: bytes) -> Response | None:
        authorization = content_type = traceparent = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
            elif name == b"traceparent" and traceparent is None:
                traceparent = value.decode("latin-1")
        scheme, token = get_authorization_scheme_param(authorization)
        if not (authorization and token) or scheme.lower() != "bearer":
            return None
        if content_type is None or content_type.split(";", 1)[0].strip().lower() != "application/json":
            return None
        # Whatever goes wrong before the create starts (including the unexpected, e.g. nesting too deep) is the
        # route's to answer: it repeats the step and maps the error as it always does.
        try:
            body = _TASK_CREATE.validate_python(loads(raw), from_attributes=True)
        except Exception:
            return None
        try:
            caller = await self.ctx.businesses.authenticate(token)
        except Exception:
            return None
        if caller.kind != "business" or caller.business is None:
            return None
        data = body.model_dump(exclude_unset=True, by_alias=True)
        try:
            task = await self.ctx.tasks.create_task(caller.business, data, traceparent=traceparent)
        except TaskCenterError as exc:
            return from_error(exc)
        except OSError as exc:
            log.warning("database unreachable: %s", exc)
            return problem(503, "unavailable", "the database is unavailable; try again shortly")
        except Exception as exc:
            log.exception("unhandled error on POST %s", self.path, exc_info=exc)
            return problem(500, "internal", "an internal error occurred")
        self.ctx.runtime.metrics.created.inc()
        return _created(task)


_TASK_CREATE = TypeAdapter(TaskCreate)
_TASK_LIST = TypeAdapter(list[TaskCreate])
#: Create fields whose validated value :class:`TaskCreate` dumps back exactly as sent (no int to float, no
#: parsed date, no nested defaults; a test holds each to it): a valid item of these alone needs no dump.
_AS_SENT = frozenset(
    {
        "business_id", "type", "method", "url", "headers", "json", "form", "body", "content_type", "payload",
        "priority", "success_codes", "retry_on", "follow_redirects", "notify", "metadata",
    }
)  # fmt: skip


def _replay(first: Message, receive: Receive) -> Receive:
    pending = [first]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


_BATCH_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["tasks"],
                "additionalProperties": False,
                "properties": {
                    "tasks": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 1000,
                        "items": {"$ref": "#/components/schemas/TaskCreate"},
                    }
                },
            },
            "example": {
                "tasks": [{"business_id": "order-1", "url": "https://api.example.com/hook", "json": {"n": 1}}]
            },
        }
    },
}


def _batch_items(raw: bytes) -> list[Any]:
    try:
        data = loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "ctx": {"error": exc.msg},
                }
            ]
        ) from exc
    if not isinstance(data, dict):
        raise ValidationError('the body must be an object {"tasks": [...]}', field="body")
    extra = sorted(set(data) - {"tasks"})
    if extra:
        raise ValidationError(f"{extra[0]} is not a known field", field=extra[0])
    items = data.get("tasks")
    if not isinstance(items, list) or not 1 <= len(items) <= 1000:
        raise ValidationError("tasks must be a list of 1 to 1000 tasks", field="tasks")
    return items


@router.post(
    "/batch",
    response_model=BatchResult,
    openapi_extra={"requestBody": _BATCH_BODY},
    summary="Create up to 1000 tasks",
)
async def create_batch(
    request: Request, ctx: Ctx, caller: BusinessCaller, traceparent: TraceParent = None
) -> Response:
    """Check every item on its own and store the valid ones in one transaction; one result per item, in order
    (``status`` 201 stored, 409 duplicate ``business_id``, 422 invalid with the ``field`` named)."""
    business = business_of(caller)
    items = _batch_items(await request.body())
    results: list[dict[str, Any]] = [{} for _ in items]
    valid: list[tuple[int, dict[str, Any]]] = []
    try:
        # The common case, every item valid: one call into pydantic-core for the batch, not one per item; an
        # item of fields that validation leaves as they are goes on as sent rather than dumped back.
        models = _TASK_LIST.validate_python(items)
        valid = [
            (n, item if _AS_SENT.issuperset(item) else model.model_dump(exclude_unset=True, by_alias=True))
            for n, (item, model) in enumerate(zip(items, models, strict=True))
        ]
    except PydanticValidationError:
        for n, item in enumerate(items):  # item by item, to report each invalid one on its own
            if not isinstance(item, dict):  # pydantic would name its model class ("instance of TaskCreate")
                results[n] = {
                    "index": n,
                    "status": 422,
                    "error": "each task must be a JSON object",
                    "field": None,
                }
                continue
            try:
                valid.append(
                    (n, TaskCreate.model_validate(item).model_dump(exclude_unset=True, by_alias=True))
                )
            except PydanticValidationError as exc:
                error = exc.errors()[0]  # located in the item: "body" there is the request's raw body field
                field, message = validation_message({**error, "loc": ("body", *error["loc"])})
                results[n] = {"index": n, "status": 422, "error": message, "field": field}
    if valid:
        stored = await ctx.tasks.create_tasks(
            business, [data for _, data in valid], traceparent=traceparent, public=True
        )
        for (n, _), outcome in zip(valid, stored, strict=True):
            entry: dict[str, Any] = {"index": n, "status": outcome["status"]}
            if "task" in outcome:
                entry["task"] = outcome["task"]  # already its public form (task_json's)
            else:
                entry.update(error=outcome.get("error"), field=outcome.get("field"))
                if outcome.get("existing_id"):
                    entry["existing_id"] = str(outcome["existing_id"])
            results[n] = entry
    created = sum(1 for r in results if r["status"] == 201)
    ctx.runtime.metrics.created.inc(created)
    return JSONResponse({"created": created, "failed": len(results) - created, "results": results})


@router.get(
    "",
    response_model=TaskPage,
    summary="List tasks, newest first",
    dependencies=[Depends(once_each(many=frozenset({"status"})))],
)
async def list_tasks(
    request: Request,
    ctx: Ctx,
    caller: BusinessCaller,
    status: Annotated[
        str | None,
        Query(
            description="One status or several, comma-separated (or the parameter repeated).",
            examples=["failed,cancelled"],
            max_length=200,
        ),
    ] = None,
    host: Annotated[
        str | None,
        Query(
            description="Target host:port, or a host for every port of it.",
            examples=["api.example.com:443"],
            max_length=300,
        ),
    ] = None,
    business_id: Annotated[str | None, Query(max_length=255)] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    cursor: Annotated[
        str | None, Query(description="next_cursor of the previous page.", max_length=200)
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Response:
    """Cursor-paginated and stable under concurrent inserts (a keyset on the row id, newest first)."""
    if status is not None:  # ?status=a&status=b adds up like ?status=a,b (FastAPI gives only the last)
        status = ",".join(request.query_params.getlist("status"))
    statuses = [s.strip() for s in status.split(",") if s.strip()] if status else None
    for s in statuses or ():
        if s not in _STATUSES:
            raise ValidationError(
                f"status {s[:40]!r} is not one of {', '.join(sorted(_STATUSES))}", field="status"
            )
    page, next_cursor = await ctx.tasks.list_tasks(
        business_of(caller),
        status=statuses,
        # Empty is no filter, as for every other filter of the list (DESIGN's `?status=&host=&…`); a malformed
        # one is the service's 422. (The CLI's bulk retry refuses an empty --host: there it would retry everything.)
        host=query_text(host, "host"),
        business_id=query_text(business_id, "business_id"),
        created_after=utc(created_after, "created_after"),
        created_before=utc(created_before, "created_before"),
        cursor=cursor or None,
        limit=limit,
    )
    return JSONResponse({"tasks": [task_json(t) for t in page], "next_cursor": next_cursor})


@router.get("/business/{business_id:path}", response_model=TaskOut, summary="Get the task with a business_id")
async def get_by_business_id(business_id: str, ctx: Ctx, caller: BusinessCaller) -> Response:
    """The live task with this ``business_id``, else the newest one that had it."""
    task = await ctx.tasks.get_by_business_id(business_of(caller), clean_business_id(business_id))
    return JSONResponse(task_json(task))


@router.delete(
    "/business/{business_id:path}", response_model=TaskOut, summary="Cancel the task with a business_id"
)
async def cancel_by_business_id(business_id: str, ctx: Ctx, caller: BusinessCaller) -> Response:
    business = business_of(caller)
    found = await ctx.tasks.get_by_business_id(business, clean_business_id(business_id))
    task = await ctx.tasks.cancel(business, found.id)
    await ctx.audit.record(caller.actor, "task.cancel", "task", task.id, business_pk=business.pk,
                           details={"business_id": task.business_id})  # fmt: skip
    return JSONResponse(task_json(task))


@router.get("/{task_id}", response_model=TaskOut, summary="Get a task")
async def get_task(task_id: str, ctx: Ctx, caller: BusinessCaller) -> Response:
    """One task by UUID (or numeric id), with its last response."""
    return JSONResponse(task_json(await ctx.tasks.get_task(business_of(caller), task_ref(task_id))))


@router.get("/{task_id}/attempts", response_model=AttemptList, summary="List a task's attempts")
async def get_attempts(task_id: str, ctx: Ctx, caller: BusinessCaller) -> Response:
    """Every attempt, oldest first."""
    attempts = await ctx.tasks.attempts(business_of(caller), task_ref(task_id))
    return JSONResponse({"attempts": [attempt_json(a) for a in attempts]})


@router.patch("/{task_id}", response_model=TaskOut, summary="Change a pending or retrying task")
@router.put("/{task_id}", response_model=TaskOut, summary="Change a pending or retrying task (same as PATCH)")
async def update_task(task_id: str, body: TaskUpdate, ctx: Ctx, caller: BusinessCaller) -> Response:
    """Only while ``pending`` or ``retrying``; otherwise 409."""
    business = business_of(caller)
    data = body.model_dump(exclude_unset=True, by_alias=True)
    task = await ctx.tasks.update_task(business, task_ref(task_id), data)
    await ctx.audit.record(caller.actor, "task.update", "task", task.id, business_pk=business.pk,
                           details={"fields": sorted(data)})  # fmt: skip
    return JSONResponse(task_json(task))


@router.delete("/{task_id}", response_model=TaskOut, summary="Cancel a task")
async def cancel_task(task_id: str, ctx: Ctx, caller: BusinessCaller) -> Response:
    """Cancel a task that has not finished (409 otherwise)."""
    business = business_of(caller)
    task = await ctx.tasks.cancel(business, task_ref(task_id))
    await ctx.audit.record(caller.actor, "task.cancel", "task", task.id, business_pk=business.pk,
                           details={"business_id": task.business_id})  # fmt: skip
    return JSONResponse(task_json(task))


@router.post("/{task_id}/retry", response_model=TaskOut, summary="Retry a failed or cancelled task")
async def retry_task(task_id: str, ctx: Ctx, caller: BusinessCaller) -> Response:
    """Send it again now with a renewed attempt budget (409 unless ``failed`` or ``cancelled``)."""
    business = business_of(caller)
    task = await ctx.tasks.retry(business, task_ref(task_id))
    await ctx.audit.record(caller.actor, "task.retry", "task", task.id, business_pk=business.pk,
                           details={"business_id": task.business_id})  # fmt: skip
    return JSONResponse(task_json(task))
