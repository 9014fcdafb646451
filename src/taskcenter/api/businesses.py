"""Business system endpoints: register, read, change, disable, rotate credentials, figures.

Operators may do everything; a business may read itself, rotate its own key and read its own figures.
Another business's code answers 404, as an unknown one does.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query
from starlette.responses import Response

from taskcenter.api.auth import Caller, Ctx, Operator, own_business
from taskcenter.api.problems import JSONResponse, OrjsonRoute, once_each
from taskcenter.api.schemas import (
    BusinessCreate,
    BusinessList,
    BusinessOut,
    BusinessUpdate,
    CredentialsRotate,
    Registered,
    Rotated,
    StatsOut,
)
from taskcenter.credentials import Principal
from taskcenter.errors import BusinessNotFound

router = APIRouter(prefix="/businesses", tags=["businesses"], route_class=OrjsonRoute)
_CODE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _code(code: str) -> str:
    if not _CODE.match(code):
        raise BusinessNotFound(f"no business system {code[:70]!r}", code=code)
    return code


def _visible(caller: Principal, code: str) -> str:
    own_business(caller, _code(code))
    return code


@router.post("", status_code=201, response_model=Registered, summary="Register a business system (operator)")
async def register(body: BusinessCreate, ctx: Ctx, caller: Operator) -> Response:
    """Returns the first API key, signing secret and JWT secret: shown this once."""
    reg = await ctx.businesses.register(body.model_dump(exclude_unset=True), actor=caller.actor)
    out = {
        "business": reg.business,
        "api_key": reg.api_key.key,
        "key_id": reg.api_key.key_id,
        "signing_secret": reg.signing_secret,
        "jwt_secret": reg.jwt_secret,
    }
    return JSONResponse(out, status_code=201, headers={"Location": f"/api/v1/businesses/{body.code}"})


@router.get("", response_model=BusinessList, summary="List business systems (operator)")
async def list_businesses(ctx: Ctx, caller: Operator) -> Response:
    return JSONResponse({"businesses": await ctx.businesses.list_businesses()})


@router.get("/{code}", response_model=BusinessOut, summary="A business system's settings, limits and keys")
async def show(code: str, ctx: Ctx, caller: Caller) -> Response:
    """Its own key or an operator; keys are listed by id and prefix only."""
    return JSONResponse(await ctx.businesses.show(_visible(caller, code)))


@router.put("/{code}", response_model=BusinessOut, summary="Change a business system (operator)")
async def update(code: str, body: BusinessUpdate, ctx: Ctx, caller: Operator) -> Response:
    """Only the fields given change; ``"status": "disabled"`` locks its keys out."""
    changes = body.model_dump(exclude_unset=True)
    return JSONResponse(await ctx.businesses.update(_code(code), changes, actor=caller.actor))


@router.delete("/{code}", response_model=BusinessOut, summary="Disable a business system (operator)")
async def disable(code: str, ctx: Ctx, caller: Operator) -> Response:
    """Its keys and JWTs stop working; its tasks stay. Re-enable with PUT ``{"status": "active"}``."""
    return JSONResponse(await ctx.businesses.disable(_code(code), actor=caller.actor))


@router.put("/{code}/credentials", response_model=Rotated, summary="Rotate a business system's API key")
async def rotate(
    code: str, ctx: Ctx, caller: Caller, body: Annotated[CredentialsRotate | None, Body()] = None
) -> Response:
    """Issue a new key (shown once); older keys stay valid for ``grace_hours`` (default 24 h)."""
    options = body or CredentialsRotate()
    rotation = await ctx.businesses.rotate(
        _visible(caller, code),
        actor=caller.actor,
        grace_hours=options.grace_hours,
        signing_secret=options.signing_secret,
        jwt_secret=options.jwt_secret,
    )
    return JSONResponse(
        {
            "api_key": rotation.api_key.key,
            "key_id": rotation.api_key.key_id,
            "old_keys_expire_at": rotation.old_keys_expire_at,
            "signing_secret": rotation.signing_secret,
            "jwt_secret": rotation.jwt_secret,
        }
    )


@router.get(
    "/{code}/stats",
    response_model=StatsOut,
    summary="A business system's figures",
    dependencies=[Depends(once_each())],
)
async def stats(
    code: str, ctx: Ctx, caller: Caller, window_hours: Annotated[float, Query(gt=0, le=2160)] = 24.0
) -> Response:
    """Counts by status, success rate, attempt latency p50/p90/p95/p99 and the busiest hosts."""
    business = own_business(caller, _code(code)) or await ctx.businesses.business(code)
    return JSONResponse(await ctx.stats.figures(business, window_hours=window_hours))
