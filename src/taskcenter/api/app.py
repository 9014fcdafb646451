"""The FastAPI application: routers under ``/api/v1``, problem+json errors, the body cap, the OpenAPI document.

The application never runs the dispatcher; ``taskcenter serve`` runs it beside uvicorn in the same process.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi

from taskcenter import __version__
from taskcenter.api import businesses, hosts, operations, problems, tasks
from taskcenter.api.auth import ApiContext
from taskcenter.api.schemas import Problem
from taskcenter.audit import AuditLog
from taskcenter.businesses import BusinessService
from taskcenter.runtime import Runtime
from taskcenter.stats import StatsService

PREFIX = "/api/v1"
DESCRIPTION = """\
taskcenter delivers outbound HTTP requests (webhooks, callbacks, API calls) reliably and on time.

Authenticate with `Authorization: Bearer <key>`: a business API key (`tc_…`), a JWT signed (HS256) with the
business's JWT secret whose `sub` is the business code, or an operator key. Errors are RFC 9457
`application/problem+json` with a stable `type` and, for bad input, the offending `field`.
"""
_TITLES = {
    400: "Malformed request (e.g. invalid JSON)",
    401: "Missing or invalid credentials",
    403: "These credentials may not do this",
    404: "Not found (another business's resources answer 404 too)",
    409: "Conflict with the current state (duplicate business_id, wrong status)",
    413: "Request body too large",
    422: "Invalid input; `field` names it",
    429: "A business limit refuses the request; `limit` names it",
    503: "The database is unavailable",
}


def _error_codes(path: str, method: str, operation: dict[str, Any]) -> set[int]:
    if path.endswith(("/health", "/metrics")):
        return {400, 413}
    codes = {400, 413, 422, 503}
    if operation.get("security"):
        codes |= {401, 403}
    if "{" in path:
        codes.add(404)
    if method in ("post", "put", "patch", "delete") and path != f"{PREFIX}/businesses/{{code}}/credentials":
        codes.add(409)
    if method == "post" and path in (f"{PREFIX}/tasks", f"{PREFIX}/tasks/batch"):
        codes.add(429)
    return codes


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document, every error response declared as problem+json."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            for code in sorted(_error_codes(path, method, operation)):
                if str(code) in responses and code != 422:
                    continue
                responses[str(code)] = {
                    "description": _TITLES[code],
                    "content": {
                        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                    },
                }
    app.openapi_schema = schema
    return schema


def create_app(
    runtime: Runtime,
    *,
    dispatcher_running: bool = False,
    manage_runtime: bool = False,
    fast_create: bool = True,
) -> FastAPI:
    """Build the REST API over ``runtime``.

    Args:
        runtime: The process's runtime (database, services, metrics).
        dispatcher_running: Whether this process also runs a dispatcher (reported by ``/health``).
        manage_runtime: Start the runtime (schema check) on startup and close it on shutdown; for when the
            ASGI server owns the event loop and the caller does not start the runtime itself.
        fast_create: Serve plainly valid single creates without FastAPI's per-request machinery
            (:class:`~taskcenter.api.tasks.FastCreate`; same answers). Off only to compare the two in tests.
    """
    settings = runtime.settings
    audit = AuditLog(runtime.db, clock=runtime.clock)
    ctx = ApiContext(
        runtime=runtime,
        tasks=runtime.service,
        businesses=BusinessService(
            db=runtime.db,
            box=runtime.box,
            tasks=runtime.service,
            audit=audit,
            operator_key=settings.operator_key.get_secret_value() if settings.operator_key else None,
            key_grace_hours=settings.key_grace_hours,
            clock=runtime.clock,
        ),
        audit=audit,
        stats=StatsService(runtime.db, clock=runtime.clock),
        dispatcher_running=dispatcher_running,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_runtime:
            await runtime.start()
        try:
            yield
        finally:
            if manage_runtime:
                await runtime.close()

    app = FastAPI(
        title="taskcenter",
        version=__version__,
        description=DESCRIPTION,
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url="/docs",
        redoc_url=None,
        default_response_class=problems.JSONResponse,
        lifespan=lifespan,
        strict_content_type=False,
    )
    app.state.ctx = ctx
    api = APIRouter(prefix=PREFIX)
    for module in (tasks, businesses, hosts, operations):
        api.include_router(module.router)
    app.include_router(api)
    # Probes and scrapers usually look at the root; same handlers, kept out of the documented API.
    app.add_api_route("/health", operations.health, methods=["GET"], include_in_schema=False)
    app.add_api_route("/metrics", operations.metrics, methods=["GET"], include_in_schema=False)
    problems.install(app)
    if fast_create:
        app.add_middleware(tasks.FastCreate, ctx=ctx, path=f"{PREFIX}/tasks")
    app.add_middleware(problems.BodyLimit, max_bytes=settings.max_request_bytes)  # outside FastCreate
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app
