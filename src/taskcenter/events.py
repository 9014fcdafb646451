"""In-process lifecycle events (created, attempted, succeeded, failed, cancelled) for library listeners."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from taskcenter.errors import ValidationError

log = logging.getLogger("taskcenter.events")

EVENTS = frozenset({"created", "attempted", "succeeded", "failed", "cancelled"})
Handler = Callable[[str, dict[str, Any]], Awaitable[None] | None]


class EventBus:
    """Calls the handlers registered for an event. A failing handler is logged, never breaks delivery."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = defaultdict(list)

    def on(self, event: str, handler: Handler) -> None:
        """Register ``handler(event, data)``; it may be a plain function or a coroutine function."""
        if event not in EVENTS:
            raise ValidationError(
                f"unknown event {event!r}; one of {', '.join(sorted(EVENTS))}", field="event"
            )
        if not callable(handler):  # else it would fail, logged only, at every event
            raise ValidationError(f"the handler for {event!r} is not callable", field="handler")
        self._handlers[event].append(handler)

    def __bool__(self) -> bool:
        return any(self._handlers.values())

    def wants(self, event: str) -> bool:
        return bool(self._handlers.get(event))

    async def emit(self, event: str, data: dict[str, Any]) -> None:
        for handler in self._handlers.get(event, ()):
            try:
                result = handler(event, data)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event handler for %s failed", event)
