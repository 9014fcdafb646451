"""Admin commands for the ``taskcenter`` CLI: ``business …``, ``operator create-key`` and ``audit list``.

Mounted by :mod:`taskcenter.cli` with ``add_typer``. Actions are audited as ``cli:<user>``.
"""

from __future__ import annotations

import asyncio
import getpass
import json
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.engine import make_url

from taskcenter.audit import AuditLog
from taskcenter.businesses import BusinessService
from taskcenter.config import Settings, load_settings
from taskcenter.domain.task import rfc3339
from taskcenter.errors import TaskCenterError, ValidationError
from taskcenter.runtime import Runtime

T = TypeVar("T")
business_app = typer.Typer(help="Register and manage business systems and their keys.", no_args_is_help=True)
operator_app = typer.Typer(help="Operator credentials.", no_args_is_help=True)
audit_app = typer.Typer(help="Read the audit log.", no_args_is_help=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="A taskcenter.toml file (default: ./taskcenter.toml).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    _console(stderr=True).print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_DURATION_S = 100 * 365.25 * 86400


def duration_s(text: str) -> float:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w`` or plain seconds; anything else exits 2 with one line."""
    text = text.strip().lower()
    try:
        unit = _UNITS.get(text[-1:], 0)
        seconds = float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        raise _fail(escape(f"{text!r} is not a duration like 90d, 12h, 30m or 45s"), 2) from None
    # float() also reads nan, inf and 1e400; a time that far back has no datetime (a traceback further on).
    if not 0 <= seconds <= _MAX_DURATION_S:
        raise _fail(escape(f"{text[:40]!r} is not a duration from 0 to 100 years"), 2)
    return seconds


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in some containers
        return "cli:unknown"


def require_database(settings: Settings) -> Settings:
    """Refuse a SQLite file that does not exist, for commands that only use what a database holds.

    Opening it would make its directories and a fresh, empty database (embedded mode migrates itself): a
    mistyped path then listed no tasks instead of saying it found none.
    """
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        path = Path(url.database).expanduser()
        if not path.exists():
            raise _fail(
                escape(
                    f"no database at {path} (TASKCENTER_DATABASE_URL={settings.database_url}): check the "
                    "path, or create it with `taskcenter migrate` (or `taskcenter serve`)"
                )
            )
    return settings


def settings_or_exit(config: Path | None, **overrides: Any) -> Settings:
    """The settings a command runs with (overrides that are None left out); a bad setting or config file is one
    line and exit code 2."""
    try:
        return load_settings(config, **{k: v for k, v in overrides.items() if v is not None})
    except TaskCenterError as exc:
        raise _fail(escape(" ".join(exc.message.split())), 2) from None


def run_with_runtime(
    config: Path | None,
    work: Callable[[Runtime, Settings], Coroutine[Any, Any, T]],
    *,
    existing: bool = False,
) -> T:
    """Load the settings, start a runtime, run ``work``, close the runtime — for every admin command.

    A bad setting is one line and exit code 2; a TaskCenterError while working is one line and exit code 1.
    With ``existing``, a SQLite database that does not exist is refused rather than made (:func:`require_database`).
    """
    settings = settings_or_exit(config)
    if existing:
        require_database(settings)

    async def main() -> T:
        rt = Runtime(settings)
        try:
            await rt.start()
            return await work(rt, settings)
        finally:
            await rt.close()

    try:
        return asyncio.run(main())
    except TaskCenterError as exc:
        raise _fail(escape(exc.message)) from None


def _run(
    config: Path | None,
    work: Callable[[Runtime, BusinessService], Coroutine[Any, Any, T]],
    *,
    existing: bool = True,
) -> T:
    """Run ``work`` with the business service of a fresh runtime (on an existing database unless not
    ``existing``: registering a business or an operator key may be the first use of a SQLite file)."""

    async def with_service(rt: Runtime, settings: Settings) -> T:
        service = BusinessService(
            db=rt.db, box=rt.box, tasks=rt.service, audit=AuditLog(rt.db, clock=rt.clock),
            key_grace_hours=settings.key_grace_hours, clock=rt.clock,
        )  # fmt: skip
        return await work(rt, service)

    return run_with_runtime(config, with_service, existing=existing)


def _print_json(data: Any) -> None:
    _console().print_json(json.dumps(data, default=str))


def _business_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("code", "name", "status", "per min", "in flight", "max active", "keys")
    for b in rows:
        keys = b.get("keys")
        table.add_row(
            b["code"], b["name"], b["status"], str(b["rate_limit_per_minute"]), str(b["max_in_flight"] or "-"),
            str(b["max_active_tasks"]), str(len(keys)) if keys is not None else "",
        )  # fmt: skip
    return table


@business_app.command("create")
def business_create(
    code: Annotated[str, typer.Argument(help="Business code, e.g. payments.")],
    name: Annotated[str | None, typer.Option(help="Display name (default: the code).")] = None,
    rate_limit_per_minute: Annotated[
        int | None, typer.Option(help="Callbacks per minute (default 1000).")
    ] = None,
    max_in_flight: Annotated[
        int | None, typer.Option(help="Requests in flight at once (default: no cap).")
    ] = None,
    max_active_tasks: Annotated[int | None, typer.Option(help="Live tasks at most (default 10000).")] = None,
    allow_network: Annotated[list[str] | None, typer.Option(help="CIDR the SSRF guard lets through.")] = None,
    retry: Annotated[
        str | None, typer.Option(help='Default retry policy as JSON, e.g. {"strategy": "fixed"}.')
    ] = None,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Register a business system; prints its first API key, signing secret and JWT secret once."""
    data: dict[str, Any] = {"code": code, "name": name, "rate_limit_per_minute": rate_limit_per_minute,
                            "max_in_flight": max_in_flight, "max_active_tasks": max_active_tasks}  # fmt: skip
    data = {k: v for k, v in data.items() if v is not None}
    if allow_network:
        data["allow_networks"] = allow_network
    if retry is not None:
        try:
            data["retry"] = json.loads(retry)
        except (ValueError, RecursionError):  # RecursionError: nested too deep for the decoder
            raise _fail(ValidationError("--retry is not JSON", field="retry").message) from None
    reg = _run(config, lambda rt, svc: svc.register(data, actor=_actor()), existing=False)
    secrets = {"api_key": reg.api_key.key, "signing_secret": reg.signing_secret, "jwt_secret": reg.jwt_secret}
    if as_json:
        _print_json({"business": reg.business, **secrets})
        return
    out = _console()
    out.print(f"business system [bold]{code}[/bold] registered. Store these now: they are not shown again.")
    for label, value in secrets.items():
        out.print(f"  {label:15} {value}")


@business_app.command("list")
def business_list(as_json: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List every business system."""
    rows = _run(config, lambda rt, svc: svc.list_businesses())
    if as_json:
        _print_json(rows)
    else:
        _console().print(_business_table(rows))


@business_app.command("show")
def business_show(
    code: Annotated[str, typer.Argument(help="Business code.")],
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Show a business system's settings, limits and keys (prefixes only)."""
    info = _run(config, lambda rt, svc: svc.show(code))
    if as_json:
        _print_json(info)
        return
    out = _console()
    out.print(_business_table([info]))
    out.print(
        f"retry: {json.dumps(info['retry'])}  allow_networks: {', '.join(info['allow_networks']) or '-'}"
    )
    keys = Table("id", "prefix", "name", "created", "expires", "last used")
    for k in info["keys"]:
        keys.add_row(str(k["id"]), k["prefix"], k["name"] or "", k["created_at"], k["expires_at"] or "-",
                     k["last_used_at"] or "-")  # fmt: skip
    out.print(keys)


@business_app.command("rotate-key")
def business_rotate_key(
    code: Annotated[str, typer.Argument(help="Business code.")],
    grace_hours: Annotated[
        float | None,
        typer.Option(help="Hours the old keys keep working (default TASKCENTER_KEY_GRACE_HOURS, 24)."),
    ] = None,
    signing_secret: Annotated[bool, typer.Option(help="Also issue a new signing secret.")] = False,
    jwt_secret: Annotated[bool, typer.Option(help="Also replace the JWT secret (at once).")] = False,
    config: ConfigOpt = None,
) -> None:
    """Issue a new API key; the old ones stay valid for the grace period."""
    rot = _run(
        config,
        lambda rt, svc: svc.rotate(
            code,
            actor=_actor(),
            grace_hours=grace_hours,
            signing_secret=signing_secret,
            jwt_secret=jwt_secret,
        ),
    )
    out = _console()
    out.print(f"new API key for [bold]{code}[/bold] (shown once): {rot.api_key.key}")
    out.print(f"older keys stop working at {rfc3339(rot.old_keys_expire_at)}")
    if rot.signing_secret:
        out.print(f"new signing secret: {rot.signing_secret}")
    if rot.jwt_secret:
        out.print(f"new JWT secret: {rot.jwt_secret}")


@business_app.command("disable")
def business_disable(
    code: Annotated[str, typer.Argument(help="Business code.")], config: ConfigOpt = None
) -> None:
    """Disable a business system: its keys and JWTs stop working; its tasks stay."""
    _run(config, lambda rt, svc: svc.disable(code, actor=_actor()))
    _console().print(f"business system {code} disabled")


@operator_app.command("create-key")
def operator_create_key(
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None, config: ConfigOpt = None
) -> None:
    """Make an operator API key (shown once)."""
    issued = _run(config, lambda rt, svc: svc.create_operator_key(actor=_actor(), name=name), existing=False)
    _console().print(f"operator key {issued.key_id} (shown once): {issued.key}")


@audit_app.command("list")
def audit_list(
    business: Annotated[str | None, typer.Option(help="Only this business code.")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. task.cancel.")] = None,
    actor: Annotated[str | None, typer.Option(help="Only this actor, e.g. key:12.")] = None,
    since: Annotated[
        datetime | None, typer.Option(help="Only entries at or after this time (UTC if no zone).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Most entries shown.")] = 50,
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Show the audit log, newest first."""
    when = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since
    try:
        when = when.astimezone(UTC) if when is not None else None
    except OverflowError:  # e.g. 0001-01-01T00:00:00+14:00, which has no UTC form
        raise _fail("--since is out of range", 2) from None

    async def work(rt: Runtime, svc: BusinessService) -> list[dict[str, Any]]:
        pk = (await svc.business(business)).pk if business is not None else None
        entries, _ = await svc.audit.list_entries(
            business_pk=pk, action=action, actor=actor, since=when, limit=limit
        )
        return [e.to_dict() for e in entries]

    rows = _run(config, work)
    if as_json:
        _print_json(rows)
        return
    table = Table("at", "actor", "action", "target", "business", "details")
    for column in table.columns[:3]:
        column.no_wrap = True
    for e in rows:
        table.add_row(e["at"], e["actor"], e["action"], f"{e['target_type']}:{e['target']}", e["business_code"] or "",
                      json.dumps(e["details"]) if e["details"] else "")  # fmt: skip
    _console().print(table)
