"""Claimed tasks whose sealed header values the configured keys cannot open: given back held, in batches, and
reported in a rate-limited error line. The dispatcher hands each one over; nothing here runs on the success path."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from taskcenter.crypto import SETTING, SecretBox
from taskcenter.domain.traffic import BUSINESS_HOLD_S
from taskcenter.storage import leases

log = logging.getLogger("taskcenter.dispatcher")
SEALED_LOG_EVERY_S = 300.0
"""How often a dispatcher logs the error about tasks held for sealed header values it cannot open, at most."""

GiveBack = Callable[[list[Mapping[str, Any]], str, tuple[str, Mapping[int, str]]], Awaitable[bool]]
"""The dispatcher's give-back of claimed tasks, unsent and held: rows, why, (``held_by``, errors by task id); whether
they went back."""


@dataclass(eq=False)
class SealedHolds:
    """One dispatcher's tasks that cannot be sent because their sealed header values do not open."""

    box: SecretBox
    give_back: GiveBack
    background: set[asyncio.Task[None]]
    delay_s: float = 1.0
    """How long the first task of a batch waits for the others that fail alike (at most so often should the
    give-back fail)."""
    _unopened: dict[int, tuple[Mapping[str, Any], list[str]]] = field(default_factory=dict)
    _logged: float = -SEALED_LOG_EVERY_S
    _unlogged: int = 0

    def cannot_open(self, row: Mapping[str, Any]) -> None:
        """Give back, unsent and held, a task whose sealed header values the configured keys cannot open (the key
        that sealed them dropped too early, a row restored from another installation, a corrupt value): no attempt
        is charged, for nothing was sent, and a fix on taskcenter's side (the key back in the list) lets it go.
        Due again in an hour, marked ``held_by = 'task:sealed_headers'``, so that a dispatcher that starts
        with the key back finds it at once (see ``runtime.BusinessPolicies``). The tasks of one batch that fail
        alike go back in one statement, ``delay_s`` later."""
        self._unopened[row["id"]] = (row, self.box.unopened(row["headers"] or {}))
        if len(self._unopened) == 1:  # the others of the batch fail in the time it waits
            task = asyncio.create_task(self._hold(), name="tc-hold-sealed")
            self.background.add(task)
            task.add_done_callback(self.background.discard)

    async def _hold(self) -> None:
        await asyncio.sleep(self.delay_s)
        unopened, self._unopened = self._unopened, {}
        rows = [row for row, _ in unopened.values()]
        errors = {i: leases.sealed_headers_error(names) for i, (_, names) in unopened.items()}
        if await self.give_back(
            rows, "whose sealed header values do not open", (leases.SEALED_HEADERS, errors)
        ):
            self._report(unopened)

    def _report(self, unopened: Mapping[int, tuple[Mapping[str, Any], list[str]]]) -> None:
        """An error naming the tasks just held and their headers, at most every ``SEALED_LOG_EVERY_S`` (those held
        meanwhile are counted in the next one; each held task comes back once an hour, and ``held`` in the
        figures counts them all)."""
        now = time.monotonic()
        if self._logged + SEALED_LOG_EVERY_S > now:
            self._unlogged += len(unopened)
            return
        ids = [str(row["uuid"]) for row, _ in unopened.values()]
        names = sorted({n for _, found in unopened.values() for n in found})
        more = f" and {len(ids) - 10} more" if len(ids) > 10 else ""
        since = f" ({self._unlogged} more held since the last report)" if self._unlogged else ""
        self._logged, self._unlogged = now, 0
        log.error(
            "%s %s%s held unsent: sealed header values (%s) cannot be decrypted with %s (a key missing from the "
            "list, or a corrupt value); no attempt charged, due again in %d minutes, until the key that sealed "
            "them is configured again (a dispatcher that starts with it sends them) or the headers are replaced%s",
            "task" if len(ids) == 1 else "tasks",
            ", ".join(ids[:10]),
            more,
            ", ".join(names) or "unknown",
            SETTING,
            BUSINESS_HOLD_S // 60,
            since,
        )
