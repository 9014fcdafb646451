"""JSON in and out of the API, and errors as RFC 9457 ``application/problem+json``: one stable ``type`` per
kind, the offending field named. Also the pure ASGI middleware that refuses oversized bodies.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskcenter.crypto import SecretKeyError
from taskcenter.errors import (
    AuthError,
    Conflict,
    DuplicateTask,
    Forbidden,
    InvalidTransition,
    LimitExceeded,
    NotFound,
    StorageError,
    TaskCenterError,
    Unauthenticated,
    ValidationError,
)

log = logging.getLogger("taskcenter.api")
PROBLEM_BASE = "https://taskcenter.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
_TITLES = {
    400: "Bad request",
    401: "Unauthenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid input",
    429: "Limit exceeded",
    500: "Internal error",
    503: "Service unavailable",
}


class JSONResponse(StarletteJSONResponse):
    """JSON through orjson (several times faster than the standard library on task representations)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z)


#: 19 digits in a row: the shortest integer outside orjson's 64 bits (below -2**63 = -9223372036854775808).
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def loads(raw: bytes) -> Any:
    """A request body's JSON: orjson (several times faster, and it refuses lone surrogates that the databases
    could not store), except that an integer beyond 64 bits stays exact.

    orjson reads such an integer as a float, silently changing it (``123456789012345678901234567890`` became
    ``1.2345678901234568e+29`` in the body sent to the receiver). A body with 19 digits in a row is read again
    by the standard library, which keeps every integer; the task's JSON body is encoded by it too, so the number
    is sent as given, and fields kept as JSON (``metadata``, ``payload``) refuse it in words (intake). Raises
    ``orjson.JSONDecodeError`` (a ``json.JSONDecodeError``) as orjson does.
    """
    data = orjson.loads(raw)
    if _LONG_DIGITS.search(raw) is None:
        return data
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # past its limits (4300 digits, depth): orjson's reading stands
        return data


class _OrjsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class OrjsonRoute(APIRoute):
    """A route whose JSON bodies are parsed by orjson (its decode errors are the standard library's subclass)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_with_orjson(request: Request) -> Response:
            return await handler(_OrjsonRequest(request.scope, request.receive, request._send))

        return parse_with_orjson


def once_each(*, many: frozenset[str] = frozenset()) -> Callable[[Request], None]:
    """A route dependency: a query parameter given twice (``?limit=10&limit=20``) is a 422 naming it, since which
    one was meant is a guess (FastAPI silently takes the last); the names in ``many`` may repeat."""

    def check(request: Request) -> None:
        seen: set[str] = set()
        for name, _ in request.query_params.multi_items():
            if name in seen and name not in many:
                raise ValidationError(f"{name[:40]} is given more than once; give it once", field=name[:40])
            seen.add(name)

    return check


def problem(
    status: int, slug: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    """A problem+json response; ``extra`` members (field, existing_id, limit) are left out when None."""
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + slug,
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    body.update({k: v for k, v in extra.items() if v is not None})
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def from_error(exc: TaskCenterError) -> Response:
    """Map a taskcenter error to its problem response."""
    field = exc.context.get("field")
    if isinstance(exc, ValidationError):
        return problem(422, "validation", exc.message, field=exc.field)
    if isinstance(exc, NotFound):
        return problem(404, "not-found", exc.message)
    if isinstance(exc, DuplicateTask):
        return problem(409, "duplicate", exc.message, field="business_id", existing_id=exc.existing_id)
    if isinstance(exc, InvalidTransition):
        return problem(409, "invalid-transition", exc.message)
    if isinstance(exc, Conflict):
        return problem(409, "conflict", exc.message, field=field)
    if isinstance(exc, LimitExceeded):
        return problem(429, "limit-exceeded", exc.message, limit=exc.limit)
    if isinstance(exc, Unauthenticated):
        return problem(
            401, "unauthenticated", exc.message, headers={"WWW-Authenticate": 'Bearer realm="taskcenter"'}
        )
    if isinstance(exc, Forbidden | AuthError):
        return problem(403, "forbidden", exc.message)
    if isinstance(exc, SecretKeyError):
        # Not the caller's fault, nor fixed by trying again: the operator's key list cannot open a stored secret.
        log.error("%s", exc.message)
        return problem(503, "secret-key", exc.message)
    if isinstance(exc, StorageError):
        log.warning("storage unavailable: %s", exc.message)
        return problem(503, "unavailable", "the database is unavailable; try again shortly")
    log.error("unmapped error %s: %s", type(exc).__name__, exc.message)
    return problem(500, "internal", "an internal error occurred")


def _field_of(loc: Any) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or None


#: What a field's pattern asks for, in words: pydantic would quote the regular expression.
_PATTERNS = {
    "url": "must be an absolute http or https URL",
    "method": "must be one of GET, POST, PUT, PATCH, DELETE or HEAD",
    "code": "must be 1-64 of a-z, 0-9, _ and -, starting with a letter or digit",
}


def validation_message(error: Mapping[str, Any]) -> tuple[str | None, str]:
    """One pydantic error as (dotted field, message in our words): the API's 422 and a batch item's error."""
    field = _field_of(error.get("loc", ()))
    message = str(error.get("msg"))
    if error.get("type") == "value_error":  # our own validators' words, without pydantic's "Value error, "
        message = message.removeprefix("Value error, ")
    if error.get("type") == "string_pattern_mismatch":
        last = (field or "").rsplit(".", 1)[-1]
        message = _PATTERNS.get(last, "does not have the expected format")
    return field, f"{field}: {message}" if field else message


def _validation_problem(errors: list[Any]) -> Response:
    first: dict[str, Any] = dict(errors[0]) if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        error = (first.get("ctx") or {}).get("error", "invalid JSON")
        return problem(400, "malformed-json", f"the body is not valid JSON: {error}")
    field = _field_of(first.get("loc", ()))
    if first.get("type") == "model_attributes_type" and field is None:
        return problem(
            422, "validation", "the body must be a JSON object (Content-Type: application/json)", field="body"
        )
    if first.get("type") == "missing" and field is None:
        return problem(422, "validation", "a JSON body is required", field="body")
    field, detail = validation_message(first)
    return problem(422, "validation", detail, field=field or "body")


def _allowed_methods(request: Request) -> str | None:
    """Every method some route serves on this path. Starlette's own ``Allow`` names only the methods of the
    first route that matched the path, and GET and POST of one path (``/tasks``) are two routes."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]
    return ", ".join(allowed) or None


_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error, expected or not, into problem+json."""

    async def on_taskcenter(_: Request, exc: Exception) -> Response:
        return from_error(exc) if isinstance(exc, TaskCenterError) else await on_anything(_, exc)

    async def on_request_validation(_: Request, exc: Exception) -> Response:
        return _validation_problem(list(exc.errors()) if isinstance(exc, RequestValidationError) else [])

    async def on_http(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        if status == 404:
            return problem(404, "not-found", "no such resource")
        if status == 405:
            allow = _allowed_methods(request)
            return problem(
                405,
                "method-not-allowed",
                "method not allowed here",
                headers={"Allow": allow} if allow else None,
            )
        if status == 400:
            return problem(400, "malformed-json", "the body could not be parsed")
        detail = str(exc.detail) if isinstance(exc, HTTPException) else "error"
        return problem(status, f"http-{status}", detail)

    async def on_unreachable(_: Request, exc: Exception) -> Response:
        # The database driver's connection failures (refused, reset) arrive as OSError, unwrapped.
        log.warning("database unreachable: %s", exc)
        return problem(503, "unavailable", "the database is unavailable; try again shortly")

    async def on_too_deep(_: Request, exc: Exception) -> Response:
        return problem(400, "malformed-json", "the body is nested too deeply")

    async def on_anything(request: Request, exc: Exception) -> Response:
        # The last resort: the schemathesis suite proves it is never reached, but it must never leak a trace.
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem(500, "internal", "an internal error occurred")

    app.add_exception_handler(TaskCenterError, on_taskcenter)
    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(RecursionError, on_too_deep)
    app.add_exception_handler(OSError, on_unreachable)
    app.add_exception_handler(Exception, on_anything)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length and by counting what streams in.

    The body is read here in full (up to the cap) and replayed to the application, so the application
    never sees part of an oversized body and never stores half a task.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            if declared.isdigit():
                await self._refuse(scope, receive, send)
            else:
                await problem(400, "bad-request", "invalid Content-Length")(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([], message, receive), send)  # disconnected: let the app see it
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(chunks, None, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(
            413, "too-large", f"the request body is larger than {self.max_bytes} bytes", field="body"
        )
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _replay(chunks: list[bytes], first: Message | None, receive: Receive) -> Receive:
    pending: list[Message] = (
        [first] if first else [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
    )

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
