"""Wires the parts together from settings: database, secret box, service, sender, dispatcher."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from taskcenter import host_policy
from taskcenter._version import __version__
from taskcenter.clock import utcnow
from taskcenter.config import GuardConfig, Settings
from taskcenter.crypto import SETTING, BusinessSecretError, SecretBox, SecretKeyError
from taskcenter.dispatcher import Dispatcher
from taskcenter.domain.retry import RetryPolicy
from taskcenter.domain.traffic import Limits, relaxed
from taskcenter.errors import StorageError, ValidationError
from taskcenter.events import EventBus
from taskcenter.mail import EMAIL_RETRY, EMAIL_TYPE, Mailer
from taskcenter.metrics import Metrics
from taskcenter.processors import ProcessorRegistry
from taskcenter.sender import HttpConfig, Sender
from taskcenter.service import TaskService
from taskcenter.signals import NOTIFY_CHANNEL, Notifier
from taskcenter.signing import Signer, signature_headers
from taskcenter.ssrf import GuardPolicy
from taskcenter.storage import leases
from taskcenter.storage.database import Database
from taskcenter.storage.holds import held_businesses, release_held
from taskcenter.storage.schema import businesses, host_policies
from taskcenter.storage.traffic import TrafficControl

log = logging.getLogger("taskcenter")
USER_AGENT = f"taskcenter/{__version__}"
SignFn = Callable[[str, int, bytes], dict[str, str]]
SIGNING_HOLD = "signing_secret"
"""The business hold (``Limits.held``) of a business whose signing secret cannot be decrypted."""
UNSIGNED_LOG_EVERY_S = 300.0
"""How often the error about a business whose signing secret cannot be decrypted is repeated while it lasts."""


@dataclass
class BusinessPolicies:
    """What dispatchers need of businesses and hosts — SSRF policy, signer, limits, host policies — refreshed
    from the database every few seconds, so changes reach running workers without a restart."""

    db: Database
    box: SecretBox
    global_guard: GuardConfig
    host_defaults: Limits = field(default_factory=Limits)
    refresh_s: float = 2.0
    wake: Callable[[], None] | None = None
    """Wakes this process's dispatchers when held tasks were pulled forward."""
    clock: Callable[[], datetime] = utcnow
    _guards: dict[int, GuardPolicy | None] = field(default_factory=dict)
    _signers: dict[int, SignFn | None] = field(default_factory=dict)
    _limits: dict[int, Limits] = field(default_factory=dict)
    _hosts: dict[str, Limits] = field(default_factory=dict)
    _unsigned: dict[int, str] = field(default_factory=dict)
    """The businesses whose signing secret cannot be decrypted, as last loaded: pk to code."""
    _unsigned_logged: dict[int, float] = field(default_factory=dict)
    _previous_logged: dict[int, float] = field(default_factory=dict)
    _loaded: bool = False
    _loading: asyncio.Future[None] | None = None

    def __post_init__(self) -> None:
        g = self.global_guard
        self._default: GuardPolicy | None = (
            GuardPolicy.from_lists(g.allow_networks, g.allow_hosts, g.deny_hosts) if g.enabled else None
        )

    def guard(self, business_pk: int) -> GuardPolicy | None:
        return self._guards.get(business_pk, self._default)

    def signer(self, business_pk: int) -> SignFn | None:
        """The business's signer, None when it has no signing secret. A business registered since the last load
        is not known yet to have none: its signer refuses (the dispatcher reloads and asks again) rather than
        let a request leave unsigned that its signing secret should sign."""
        return self._signers.get(business_pk, _not_loaded)

    def business_limits(self, business_pk: int) -> Limits:
        return self._limits.get(business_pk) or _business_limits(1000, None)

    def host_limits(self, host: str) -> Limits:
        return self._hosts.get(host, self.host_defaults)

    def business_pks(self) -> list[int]:
        return list(self._limits)

    def unsigned(self) -> list[str]:
        """The codes of the businesses held because their signing secret cannot be decrypted (as last loaded)."""
        return sorted(self._unsigned.values())

    async def load(self) -> None:
        async with self.db.read() as conn:
            rows = (await conn.execute(sa.select(businesses))).mappings().all()
            host_rows = (await conn.execute(sa.select(host_policies))).mappings().all()
        guards: dict[int, GuardPolicy | None] = {}
        signers: dict[int, SignFn | None] = {}
        unsigned: dict[int, str] = {}
        for row in rows:
            if self._default is None:
                guards[row["id"]] = None
            elif row["allow_networks"] or row["allow_hosts"] or row["deny_hosts"]:
                own = GuardPolicy.from_lists(
                    row["allow_networks"] or (), row["allow_hosts"] or (), row["deny_hosts"] or ()
                )
                guards[row["id"]] = self._default.merged(own)
            signers[row["id"]] = self._signer_of(row, unsigned)
        old_hosts, old_limits = self._hosts, self._limits
        self._hosts = {r["host"]: host_policy.host_limits(r, self.host_defaults) for r in host_rows}
        self._limits = {
            r["id"]: _business_limits(
                r["rate_limit_per_minute"], r["max_in_flight"], SIGNING_HOLD if r["id"] in unsigned else None
            )
            for r in rows
        }
        # Signers first: a task pulled forward below must find its business's signer.
        self._guards, self._signers = guards, signers
        self._report(unsigned)
        if self._loaded:
            await self._after_relaxing(old_hosts, old_limits)
        else:
            await self._release_at_start()
            await self._release_sealed_at_start()
        self._loaded = True

    def _signer_of(self, row: Any, unsigned: dict[int, str]) -> SignFn | None:
        """The business's signer; one that refuses (and the business noted in ``unsigned``) when its newest
        signing secret cannot be decrypted, so that its requests are never sent unsigned. An older secret that
        cannot be (kept alongside during a rotation) is left out: the newest still signs."""
        sealed = row["signing_secrets"] or ()
        opened: list[str] = []
        for position, value in enumerate(sealed):
            try:
                secret = self.box.open(value)
                Signer.from_secrets(secret)  # a corrupt value that still decrypts is as unusable
            except (SecretKeyError, ValidationError) as exc:
                if position == 0:
                    unsigned[row["id"]] = row["code"]
                    return _refuse(row["code"])
                now = time.monotonic()
                if self._previous_logged.get(row["id"], -math.inf) + UNSIGNED_LOG_EVERY_S <= now:
                    self._previous_logged[row["id"]] = now
                    log.warning(
                        "business system %r: its previous signing secret cannot be used (%s); signing with the "
                        "newest one only",
                        row["code"],
                        exc,
                    )
                continue
            opened.append(secret)
        return _sign_with(Signer.from_secrets(*opened)) if opened else None

    def _report(self, unsigned: dict[int, str]) -> None:
        """An error for each held business when it is first seen so and every ``UNSIGNED_LOG_EVERY_S`` while it
        stays so (not per task, nor per reload); an info line when it signs again."""
        now = time.monotonic()
        for pk, code in sorted(unsigned.items()):
            if self._unsigned_logged.get(pk, -math.inf) + UNSIGNED_LOG_EVERY_S <= now:
                self._unsigned_logged[pk] = now
                log.error(
                    "business system %r: its signing secret cannot be decrypted with TASKCENTER_SECRET_KEY (a "
                    "key missing from the list, or a corrupt value); its HTTP tasks are held unsent until the key "
                    "that sealed it is configured again or the secret is rotated "
                    "(taskcenter business rotate-key %s --signing-secret)",
                    code,
                    code,
                )
        for pk in self._unsigned.keys() - unsigned.keys():
            self._unsigned_logged.pop(pk, None)
            log.info("business system %r signs again: its held tasks are released", self._unsigned[pk])
        self._unsigned = unsigned

    async def _release_at_start(self) -> None:
        """Release the tasks an earlier process held for a signing secret that opens now (restarted with the key
        that sealed it, or rotated meanwhile); others come back with their hold's end."""
        try:
            async with self.db.read() as conn:
                held = await held_businesses(conn, SIGNING_HOLD)
            fixed = [pk for pk in held if pk in self._limits and pk not in self._unsigned]
            if fixed:
                await self.pull_forward((), fixed)
        except StorageError as exc:
            log.warning("releasing the tasks held for a signing secret failed: %s", exc)

    async def _release_sealed_at_start(self, page: int = 1000) -> int:
        """Bring due the tasks an earlier process held because their sealed header values did not open, if they
        open now (restarted with the key that sealed them back in the list); the others keep their hour. Reads
        only the held tasks (``ix_tasks_held``), a page at a time. Returns how many moved."""
        moved, after = 0, 0
        try:
            while True:
                async with self.db.read() as conn:
                    held = await leases.sealed_held(conn, after=after, limit=page)
                if not held:
                    break
                after = held[-1][0]
                opens = [i for i, headers in held if not self.box.unopened(headers)]
                if opens:
                    async with self.db.write() as conn:
                        moved += await leases.release_sealed(conn, opens, due=self.clock())
                        if self.db.is_postgres:
                            await conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))
        except StorageError as exc:  # they still come due at the end of their hold
            log.warning("releasing the tasks held for their sealed header values failed: %s", exc)
        if moved:
            log.info("released %d tasks held for sealed header values that %s opens now", moved, SETTING)
            if self.wake is not None:
                self.wake()
        return moved

    async def _after_relaxing(self, old_hosts: dict[str, Limits], old_limits: dict[int, Limits]) -> None:
        """Pull forward the tasks held under limits that were just relaxed (by any process: every dispatcher
        process sees the change on its next reload, so this works across a cluster)."""
        now = self.clock().timestamp()
        hosts = [
            h
            for h in old_hosts.keys() | self._hosts.keys()
            if relaxed(old_hosts.get(h, self.host_defaults), self.host_limits(h), now)
        ]
        bizs = [
            b for b in old_limits.keys() & self._limits.keys() if relaxed(old_limits[b], self._limits[b], now)
        ]
        if hosts or bizs:
            try:
                await self.pull_forward(sorted(hosts), sorted(bizs))
            except StorageError as exc:  # the held tasks still come due at the time they were given
                log.warning("pulling forward tasks held under relaxed limits failed: %s", exc)

    async def pull_forward(self, hosts: Sequence[str], businesses: Sequence[int] = ()) -> int:
        """Bring the tasks traffic control holds for these hosts and businesses due again, paced by their
        current rate (see ``storage.holds.release_held``); wakes the dispatchers. Returns how many moved."""
        now = self.clock()
        moved = 0
        async with self.db.write() as conn:
            for host in hosts:
                limits = self.host_limits(host)
                due = max(now, datetime.fromtimestamp(limits.paused_until, UTC))
                moved += await release_held(conn, host=host, due=due, step_s=_step(limits))
            for pk in businesses:
                limits = self.business_limits(pk)
                moved += await release_held(conn, business=pk, due=now, step_s=_step(limits))
            if moved and self.db.is_postgres:
                await conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, "")))
        if moved:
            log.info(
                "pulled forward %d held tasks (hosts %s, businesses %s)", moved, list(hosts), list(businesses)
            )
            if self.wake is not None:
                self.wake()
        return moved

    async def close_released(self, hosts: list[str]) -> None:
        """A circuit closed, or a host a dispatcher held back for never answering well answered well: its held
        backlog drains at the host's rate (called by a dispatcher's traffic control)."""
        try:
            await self.pull_forward(hosts)
        except StorageError as exc:
            log.warning("pulling forward the tasks held for %s failed: %s", hosts, exc)

    async def reload(self) -> None:
        """Load now, or wait for the load already under way (a dispatcher met a business it does not know yet)."""
        if self._loading is None or self._loading.done():
            self._loading = asyncio.ensure_future(self.load())
            # Retrieved here too: every caller may have been cancelled by the time it fails.
            self._loading.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(self._loading)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.reload()
            except Exception as exc:  # keep the last known policies; the database may be back soon
                log.warning("reloading business policies failed: %s", exc)


def _step(limits: Limits) -> float:
    return 1.0 / limits.rate_per_second if limits.rate_per_second else 0.0


def _refuse(code: str) -> SignFn:
    """A signer for a business whose signing secret cannot be decrypted: it refuses, so nothing leaves unsigned."""

    def refuse(msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        raise BusinessSecretError(
            f"the signing secret of business system {code!r} cannot be decrypted with {SETTING}",
            setting=SETTING,
        )

    return refuse


def _not_loaded(msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    raise BusinessSecretError(
        "the business's signing secrets are not loaded yet (registered since the last reload)"
    )


def _sign_with(signer: Signer) -> SignFn:
    def sign(msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        return signature_headers(signer, msg_id, timestamp, body)

    return sign


def _business_limits(per_minute: int, max_in_flight: int | None, held: str | None = None) -> Limits:
    rate = per_minute / 60.0
    # One second's worth of burst: a per-minute budget is not meant to be spent in one go.
    return Limits(rate_per_second=rate, burst=max(1, round(rate)), max_in_flight=max_in_flight, held=held)


class Runtime:
    """One process's taskcenter: everything built once from :class:`Settings`."""

    def __init__(
        self,
        settings: Settings,
        *,
        processors: ProcessorRegistry | None = None,
        events: EventBus | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.db = Database(settings.database_url)
        self.box = SecretBox.from_setting(
            settings.secret_key.get_secret_value() if settings.secret_key else None
        )
        self.processors = processors if processors is not None else ProcessorRegistry()
        smtp = settings.smtp()
        if smtp is not None:
            # Every process with an SMTP server can send e-mail notifications, a plain `taskcenter worker` too.
            mailer = Mailer(smtp)
            self.processors.register(
                EMAIL_TYPE, mailer.send, retry=RetryPolicy.from_dict(EMAIL_RETRY), builtin=True
            )
        self.events = events if events is not None else EventBus()
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.events.on_drop = lambda event: self.metrics.events_dropped.labels(event).inc()
        self.clock = clock
        self.service = TaskService(
            db=self.db,
            box=self.box,
            default_retry=settings.retry_policy(),
            clock=clock,
            notifier=self.notifier,
            events=self.events,
            processors=self.processors,
            poll_interval_s=settings.poll_interval_s,
            email=smtp is not None,
        )
        self.policies = BusinessPolicies(
            self.db,
            self.box,
            settings.guard(),
            settings.host_defaults(),
            wake=self.notifier.wake,
            clock=clock,
        )
        self._background: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        """Check the schema: SQLite (embedded) migrates itself, PostgreSQL refuses an out-of-date schema."""
        await self.db.check_schema(auto_migrate=self.db.dialect == "sqlite")

    def dispatcher(self, *, concurrency: int | None = None, sender: Sender | None = None) -> Dispatcher:
        cfg = self.settings.dispatch()
        if concurrency is not None:
            from dataclasses import replace

            cfg = replace(cfg, concurrency=concurrency)
        sender = sender or Sender(
            HttpConfig(
                max_response_bytes=cfg.max_response_bytes,
                pool_size=max(cfg.concurrency, 10),
                user_agent=USER_AGENT,
            )
        )
        return Dispatcher(
            db=self.db,
            sender=sender,
            config=cfg,
            box=self.box,
            processors=self.processors,
            events=self.events,
            notifier=self.notifier,
            guard=self.policies.guard,
            signer=self.policies.signer,
            user_agent=USER_AGENT,
            clock=self.clock,
            metrics=self.metrics,
            traffic=TrafficControl(
                self.policies.host_limits,
                self.policies.business_limits,
                slow_window=self.settings.host_slow_window,
                slow_after_s=self.settings.host_slow_after_s,
                on_close=self.policies.close_released,
            ),
            businesses=self.policies.business_pks,
            notify=self.service.enqueue_notifications,
            notify_sweep=self.service.sweep_notifications,
            reload_policies=self.policies.reload,
            purge=self._purge,
        )

    async def _purge(self) -> int:
        return await self.service.purge(older_than_s=self.settings.retention_days * 86400.0)

    async def run_dispatcher(self, dispatcher: Dispatcher) -> None:
        """Run a dispatcher with its sender and the policy refresher until it is stopped."""
        await self.policies.load()
        helpers = [
            asyncio.create_task(self.policies.run(), name="tc-policies"),
            asyncio.create_task(self.db.checkpoints(), name="tc-checkpoints"),
        ]
        try:
            async with dispatcher.sender:
                await dispatcher.run()
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def close(self) -> None:
        """Deliver the lifecycle events still queued (within the shutdown grace period), then close the database."""
        await self.events.drain(self.settings.shutdown_grace_s)
        await self.db.close()
