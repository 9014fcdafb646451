"""``taskcenter host …``: show and change target hosts' policies, pause and resume them, reset their breakers.

Mounted by :mod:`taskcenter.cli` with ``add_typer``. Changes are audited as ``cli:<user>``; running dispatchers
pick them up within a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table

from taskcenter.audit import AuditLog
from taskcenter.cli_admin import (
    ConfigOpt,
    JsonOpt,
    _actor,
    _console,
    _fail,
    _print_json,
    duration_s,
    run_with_runtime,
)
from taskcenter.config import Settings
from taskcenter.domain.task import rfc3339
from taskcenter.hosts import POLICY_FIELDS, HostService, HostView
from taskcenter.runtime import Runtime

T = TypeVar("T")
host_app = typer.Typer(
    help="Target hosts: rate limits, in-flight caps, circuit breakers and pauses.", no_args_is_help=True
)
HostArg = Annotated[
    str, typer.Argument(help="The host as tasks carry it: host:port, e.g. api.example.com:443.")
]
_BREAKER_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}
#: How a policy field without a limit reads.
_NONE_READS = {"burst": "1 s of the rate", "breaker_ratio": "off"}


def _run(config: Path | None, work: Callable[[HostService], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` with the host service of a fresh runtime."""

    async def with_service(rt: Runtime, settings: Settings) -> T:
        service = HostService(
            db=rt.db,
            audit=AuditLog(rt.db, clock=rt.clock),
            defaults=settings.host_defaults(),
            clock=rt.clock,
            settle_s=rt.policies.refresh_s,
        )
        return await work(service)

    return run_with_runtime(config, with_service)


def _moment(text: str) -> datetime:
    """An ISO 8601 time; UTC when it names no zone."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(escape(f"{text!r} is not a time like 2026-01-31T12:00:00Z"), 2) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _relative(when: datetime, now: datetime) -> str:
    seconds = int((when - now).total_seconds())
    span = abs(seconds)
    if span < 120:
        text = f"{span}s"
    elif span < 7200:
        text = f"{span // 60}m"
    elif span < 172800:
        text = f"{span // 3600}h"
    else:
        text = f"{span // 86400}d"
    return f"in {text}" if seconds > 0 else f"{text} ago"


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    return f"{rfc3339(when.replace(microsecond=0))} ({_relative(when, now)})"


def _value(name: str, value: Any) -> str:
    if value is None:
        return _NONE_READS.get(name, "unlimited")
    return f"{value:g}" if isinstance(value, float) else str(value)


def _breaker(view: HostView) -> str:
    return f"[{_BREAKER_STYLE[view.breaker]}]{view.breaker}[/]"


def _hosts_table(views: list[HostView], now: datetime) -> Table:
    # Narrow enough for 80 columns: the full times are in `host show`.
    table = Table("host", "rate/s", "in flight", "breaker", "failures", "paused", "policy")
    for column in table.columns[1:]:
        column.no_wrap = True
        column.min_width = len(str(column.header))
    table.columns[0].overflow = "fold"
    for v in views:
        cap = v.policy["max_in_flight"]
        table.add_row(
            escape(v.host),
            _value("rate_per_second", v.policy["rate_per_second"]).replace("unlimited", "-"),
            f"{v.in_flight}/{cap}" if cap is not None else str(v.in_flight),
            _breaker(v),
            str(v.failures),
            _relative(v.paused_until, now) if v.paused_until else "-",
            "own" if v.explicit else "defaults",
        )
    return table


def _print_host(view: HostView) -> None:
    out = _console()
    now = datetime.now(UTC)
    pause = (
        "[bold yellow]paused[/] until " + _ago(view.paused_until, now) if view.paused_until else "not paused"
    )
    out.print(
        f"[bold]{escape(view.host)}[/bold]  breaker {_breaker(view)}  {pause}  in flight {view.in_flight}"
    )
    policy = Table("policy", "value", "from")
    for name in POLICY_FIELDS:
        own = name in view.explicit
        policy.add_row(name, _value(name, view.policy[name]), "host" if own else "[dim]default[/dim]")
    out.print(policy)
    state = Table("state", "value")
    rows = [
        ("breaker", _breaker(view)),
        ("consecutive failures", str(view.failures)),
        ("open until", _ago(view.open_until, now)),
        ("probe until", _ago(view.probe_until, now)),
        ("paused by operator until", _ago(view.operator_paused_until, now)),
        ("paused by Retry-After until", _ago(view.retry_after_until, now)),
        ("tokens", "-" if view.tokens is None else f"{view.tokens:g}"),
        ("in flight", str(view.in_flight)),
        ("policy changed", _ago(view.updated_at, now)),
    ]
    for label, value in rows:
        state.add_row(label, value)
    out.print(state)


def _show(view: HostView, as_json: bool) -> None:
    if as_json:
        _print_json(view.to_dict())
    else:
        _print_host(view)


@host_app.command("list")
def host_list(
    breaker: Annotated[
        str | None, typer.Option(help="Only hosts whose breaker is closed, open or half_open.")
    ] = None,
    paused: Annotated[
        bool | None, typer.Option("--paused/--not-paused", help="Only (un)paused hosts.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Most hosts shown.")] = 100,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """List hosts with a policy or a state (every host a dispatcher sent to), by name."""

    async def work(svc: HostService) -> tuple[list[HostView], dict[str, Any]]:
        views, _ = await svc.list_hosts(breaker=breaker, paused=paused, limit=limit)
        return views, svc.default_policy()

    views, defaults = _run(config, work)
    if as_json:
        _print_json({"defaults": defaults, "hosts": [v.to_dict() for v in views]})
        return
    out = _console()
    out.print(_hosts_table(views, datetime.now(UTC)))
    out.print("defaults: " + ", ".join(f"{k} {_value(k, v)}" for k, v in defaults.items()))


@host_app.command("show")
def host_show(host: HostArg, as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """Show a host's effective policy (its own values and the defaults), breaker, pause and load."""
    _show(_run(config, lambda svc: svc.get(host)), as_json)


@host_app.command("set")
def host_set(
    host: HostArg,
    rate: Annotated[float | None, typer.Option("--rate", help="Requests per second.")] = None,
    burst: Annotated[int | None, typer.Option(help="Requests that may go at once (bucket size).")] = None,
    max_in_flight: Annotated[int | None, typer.Option(help="Requests in flight at once.")] = None,
    breaker_failures: Annotated[
        int | None, typer.Option(help="Consecutive failures that open the circuit.")
    ] = None,
    breaker_ratio: Annotated[
        float | None, typer.Option(help="Failure share (0-1] that opens the circuit.")
    ] = None,
    breaker_window: Annotated[int | None, typer.Option(help="Attempts the failure ratio looks at.")] = None,
    breaker_cooldown: Annotated[
        float | None, typer.Option(help="Seconds an open circuit holds tasks back.")
    ] = None,
    reset: Annotated[
        list[str] | None,
        typer.Option(help="A policy field to give back to the default, e.g. --reset burst (repeatable)."),
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Set a host's policy: only the options given change; running dispatchers see it within seconds."""
    given = {"rate_per_second": rate, "burst": burst, "max_in_flight": max_in_flight,
             "breaker_failures": breaker_failures, "breaker_ratio": breaker_ratio, "breaker_window": breaker_window,
             "breaker_cooldown": breaker_cooldown}  # fmt: skip
    changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    for name in reset or ():
        field = name.replace("-", "_")
        if field not in POLICY_FIELDS:
            raise _fail(escape(f"--reset {name}: not a policy field ({', '.join(POLICY_FIELDS)})"), 2)
        changes[field] = None
    view = _run(config, lambda svc: svc.put(host, changes, actor=_actor()))
    if not as_json:
        _console().print(f"policy of {escape(view.host)} saved")
    _show(view, as_json)


@host_app.command("pause")
def host_pause(
    host: HostArg,
    for_: Annotated[str | None, typer.Option("--for", help="How long: 45s, 30m, 12h, 7d.")] = None,
    until: Annotated[
        str | None, typer.Option(help="Until then, e.g. 2026-01-31T12:00:00Z (UTC if no zone).")
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Hold back every task for a host (no attempt charged) for a while or until a time."""
    if (for_ is None) == (until is None):  # the service's own words name the API's fields, not these options
        raise _fail(
            "give --for (e.g. 10m) or --until (a time)"
            if for_ is None
            else "give --for or --until, not both",
            2,
        )
    seconds = duration_s(for_) if for_ is not None else None
    moment = _moment(until) if until is not None else None
    view = _run(config, lambda svc: svc.pause(host, actor=_actor(), until=moment, seconds=seconds))
    if not as_json:
        _console().print(f"{escape(view.host)} paused until {_ago(view.paused_until, datetime.now(UTC))}")
    _show(view, as_json)


@host_app.command("resume")
def host_resume(
    host: HostArg,
    reset_breaker: Annotated[bool, typer.Option(help="Also close the circuit if it is open.")] = False,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Lift a host's pause (the operator's and any Retry-After pause); held tasks go within seconds."""
    view = _run(config, lambda svc: svc.resume(host, actor=_actor(), reset_breaker=reset_breaker))
    if not as_json:
        _console().print(f"{escape(view.host)} resumed")
    _show(view, as_json)
