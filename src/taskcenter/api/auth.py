"""Who is calling: bearer credentials resolved to a :class:`Principal`, and the API's shared context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from taskcenter.audit import AuditLog
from taskcenter.businesses import BusinessService
from taskcenter.credentials import Principal
from taskcenter.errors import BusinessNotFound, Forbidden
from taskcenter.runtime import Runtime
from taskcenter.service import Business, TaskService
from taskcenter.stats import StatsService

_bearer = HTTPBearer(
    auto_error=False,
    description="A business API key (`tc_…`), a JWT signed with the business's JWT secret (`sub` = business code), "
    "or an operator key.",
)


@dataclass(frozen=True, slots=True)
class ApiContext:
    """Everything a request handler may use, built once per application."""

    runtime: Runtime
    tasks: TaskService
    businesses: BusinessService
    audit: AuditLog
    stats: StatsService
    dispatcher_running: bool


async def context(request: Request) -> ApiContext:
    """The application's :class:`ApiContext`."""
    ctx: ApiContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ApiContext, Depends(context)]


async def principal(
    ctx: Ctx, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    """The authenticated caller; :class:`Unauthenticated` (401) without valid credentials."""
    return await ctx.businesses.authenticate(credentials.credentials if credentials else None)


async def business_principal(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    """A caller acting for a business system (task endpoints)."""
    if caller.kind != "business" or caller.business is None:
        raise Forbidden("task endpoints need a business system's API key or JWT, not an operator key")
    return caller


async def operator_principal(caller: Annotated[Principal, Depends(principal)]) -> Principal:
    """An operator (operator endpoints)."""
    if caller.kind != "operator":
        raise Forbidden("this endpoint needs an operator key")
    return caller


def own_business(caller: Principal, code: str) -> Business | None:
    """The business ``code`` as seen by ``caller``: operators see any, a business only itself (else 404).

    Returns the caller's own business, or ``None`` for an operator (who then reads the business fresh).
    """
    if caller.kind == "operator":
        return None
    if caller.business is None or caller.business.code != code:
        # Another business's code answers exactly as an unknown one: existence is not disclosed.
        raise BusinessNotFound(f"no business system {code!r}", code=code)
    return caller.business


Caller = Annotated[Principal, Depends(principal)]
BusinessCaller = Annotated[Principal, Depends(business_principal)]
Operator = Annotated[Principal, Depends(operator_principal)]


def business_of(caller: Principal) -> Business:
    """The business a task-endpoint caller acts for (:func:`business_principal` guarantees one)."""
    if caller.business is None:
        raise Forbidden("task endpoints need a business system's API key or JWT")
    return caller.business
