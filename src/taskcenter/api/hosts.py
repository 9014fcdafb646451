"""Host endpoints (operator only): each target host's policy, circuit breaker and pause, and changes to them.

A host is addressed as ``host:port`` exactly as tasks carry it (``/hosts/api.example.com:443``). A host nobody
configured answers 200 with the defaults and a closed breaker: every host has a policy.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from taskcenter.api.auth import Ctx, Operator
from taskcenter.api.problems import JSONResponse, OrjsonRoute, once_each
from taskcenter.hosts import MAX_PAUSE_S, POLICY_FIELDS, HostService

router = APIRouter(prefix="/hosts", tags=["hosts"], route_class=OrjsonRoute)
Breaker = Literal["closed", "open", "half_open"]
HostKey = Annotated[
    str,
    Path(
        description="The target host as tasks carry it: `host:port`, lower case, IPv6 in brackets.",
        examples=["api.example.com:443"],
        max_length=300,
    ),
]


def _limit(name: str, description: str) -> Any:
    rule = POLICY_FIELDS[name]
    return Field(
        None,
        gt=rule.low if rule.low_open else None,
        ge=None if rule.low_open else rule.low,
        le=rule.high,
        description=description + " `null` resets it to the default.",
    )


class HostPolicyIn(BaseModel):
    """Changes to a host's policy: only the fields given change. Running dispatchers see them within seconds."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"rate_per_second": 10, "burst": 10, "max_in_flight": 20, "breaker_failures": 5,
                 "breaker_cooldown": 30}
            ]
        },
    )  # fmt: skip
    rate_per_second: float | None = _limit("rate_per_second", "Requests per second (token bucket).")
    burst: int | None = _limit("burst", "Bucket size: requests that may go at once after a quiet spell.")
    max_in_flight: int | None = _limit("max_in_flight", "Requests in flight at once, across the cluster.")
    breaker_failures: int | None = _limit("breaker_failures", "Consecutive failures that open the circuit.")
    breaker_ratio: float | None = _limit("breaker_ratio", "Failure share over the window that opens it.")
    breaker_window: int | None = _limit("breaker_window", "Recent attempts the failure ratio looks at.")
    breaker_cooldown: float | None = _limit("breaker_cooldown", "Seconds an open circuit holds tasks back.")
    paused_until: datetime | None = Field(
        None,
        strict=False,
        description="Pause the host until then (RFC 3339); `null` lifts the operator pause.",
    )
    pause_seconds: float | None = Field(
        None, gt=0, le=MAX_PAUSE_S, description="Pause the host for this long."
    )


class PauseIn(BaseModel):
    """How long to pause: ``seconds`` from now, or ``until`` a time."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{"seconds": 600}]})
    until: datetime | None = Field(None, strict=False, description="RFC 3339 with a zone.")
    seconds: float | None = Field(None, gt=0, le=MAX_PAUSE_S)


class ResumeIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"reset_breaker": True}]}
    )
    reset_breaker: bool = Field(False, description="Also close the circuit if it is open or half-open.")


class HostPolicyOut(BaseModel):
    """Effective values; `null` means no limit (`burst`: one second's worth of the rate; `breaker_ratio`: off)."""

    rate_per_second: float | None
    burst: int | None
    max_in_flight: int | None
    breaker_failures: int
    breaker_ratio: float | None
    breaker_window: int
    breaker_cooldown: float


class HostStateOut(BaseModel):
    breaker: Breaker
    failures: int = Field(description="Consecutive failures so far.")
    open_until: datetime | None = Field(description="While open: when a probe may go.")
    probe_until: datetime | None = Field(description="While half-open: when the probe in flight times out.")
    paused: bool
    paused_until: datetime | None = Field(description="The later of the two pauses below.")
    operator_paused_until: datetime | None
    retry_after_until: datetime | None = Field(description="A pause the receiver asked for with Retry-After.")
    tokens: float | None = Field(description="Requests the rate limit lets through now; null without one.")


class HostOut(BaseModel):
    """A target host: effective policy, which fields it sets itself, live state, requests in flight."""

    host: str = Field(examples=["api.example.com:443"])
    policy: HostPolicyOut
    explicit: list[str] = Field(description="Policy fields this host sets; the others follow the defaults.")
    state: HostStateOut
    in_flight: int
    updated_at: datetime | None = Field(description="Last change of its policy; null if it has none.")


class HostList(BaseModel):
    defaults: HostPolicyOut = Field(description="The policy of hosts that set nothing themselves.")
    hosts: list[HostOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end.")


def _service(ctx: Ctx) -> HostService:
    rt = ctx.runtime
    return HostService(
        db=rt.db,
        audit=ctx.audit,
        defaults=rt.policies.host_defaults,
        clock=rt.clock,
        settle_s=rt.policies.refresh_s,
        wake=rt.notifier.wake,
        # A dispatcher in this process (``taskcenter serve``) sees the change at once, not at its next reload.
        changed=rt.policies.load,
    )


Hosts = Annotated[HostService, Depends(_service)]


@router.get(
    "",
    response_model=HostList,
    summary="List hosts with a policy or a state (operator)",
    dependencies=[Depends(once_each())],
)
async def list_hosts(
    hosts: Hosts,
    caller: Operator,
    breaker: Breaker | None = None,
    paused: bool | None = None,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    """Every host an operator configured or a dispatcher sent to, by name; filter by breaker state or pause."""
    views, next_cursor = await hosts.list_hosts(
        breaker=breaker, paused=paused, cursor=cursor or None, limit=limit
    )
    return JSONResponse(
        {
            "defaults": hosts.default_policy(),
            "hosts": [v.to_dict() for v in views],
            "next_cursor": next_cursor,
        }
    )


@router.get("/{host}", response_model=HostOut, summary="A host's policy, breaker and pause (operator)")
async def show(host: HostKey, hosts: Hosts, caller: Operator) -> Response:
    """A host nobody configured answers with the defaults and a closed breaker."""
    return JSONResponse((await hosts.get(host)).to_dict())


@router.put("/{host}", response_model=HostOut, summary="Set a host's policy (operator)")
async def put(host: HostKey, body: HostPolicyIn, hosts: Hosts, caller: Operator) -> Response:
    """Only the fields given change; `null` resets one to the default. `paused_until` or `pause_seconds` pause
    the host as ``POST …/pause`` does; `"paused_until": null` lifts the operator's pause."""
    view = await hosts.put(host, body.model_dump(exclude_unset=True), actor=caller.actor)
    return JSONResponse(view.to_dict())


@router.post("/{host}/pause", response_model=HostOut, summary="Pause a host (operator)")
async def pause(host: HostKey, body: PauseIn, hosts: Hosts, caller: Operator) -> Response:
    """Hold back the host's tasks until then: no attempt is charged, they go when the pause ends."""
    view = await hosts.pause(host, actor=caller.actor, until=body.until, seconds=body.seconds)
    return JSONResponse(view.to_dict())


@router.post("/{host}/resume", response_model=HostOut, summary="Resume a paused host (operator)")
async def resume(
    host: HostKey, hosts: Hosts, caller: Operator, body: Annotated[ResumeIn | None, Body()] = None
) -> Response:
    """Lift the operator's pause and any Retry-After pause (and, with `reset_breaker`, close the circuit); the
    tasks they held back come due within about two seconds."""
    view = await hosts.resume(host, actor=caller.actor, reset_breaker=(body or ResumeIn()).reset_breaker)
    return JSONResponse(view.to_dict())
