"""In-process lifecycle events (created, attempted, succeeded, failed, cancelled) for library listeners.

Raising an event only queues it: the handlers run later, in a delivery task of their own, so that a slow or
blocking handler never holds up the writing of results, the claim or the call that raised the event.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from taskcenter.errors import ValidationError
from taskcenter.processors import run_in_thread

log = logging.getLogger("taskcenter.events")

EVENTS = frozenset({"created", "attempted", "succeeded", "failed", "cancelled"})
Handler = Callable[[str, dict[str, Any]], Awaitable[None] | None]
MAX_QUEUED = 10_000
"""Events waiting for their handlers, at most; past it new events are dropped (see :class:`EventBus`)."""
DELIVERY_BATCH = 256
"""Events taken off the queue per turn of the delivery task (the sync handlers' calls of a turn share one thread)."""
_DROP_WARNING_EVERY_S = 10.0
_LEAVES = (str, int, float, bool, type(None))


def fresh(value: Any) -> Any:
    """A deep copy of JSON-shaped data (dicts, lists, scalars), several times cheaper than ``copy.deepcopy``;
    anything else is handed to ``copy.deepcopy``."""
    kind = type(value)
    if kind is dict:
        return {key: fresh(item) for key, item in value.items()}
    if kind is list:
        return [fresh(item) for item in value]
    if kind in _LEAVES:
        return value
    return copy.deepcopy(value)


def _is_async(handler: Handler) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(type(handler).__call__)


_Call = tuple[Handler, bool, str, dict[str, Any]]
"""One handler's call: the handler, whether it is async, the event, the event's data (copied per call)."""


class EventBus:
    """Delivers events to the handlers registered for them, in the order the events were raised.

    :meth:`publish` never waits: it queues the event, and one delivery task per event loop (started when there is
    something to deliver, ended when the queue is empty) calls the handlers in turn. Async handlers run on the loop;
    sync ones in a daemon thread (one per batch of calls, :func:`~taskcenter.processors.run_in_thread`), so that a
    handler that blocks never blocks the loop. Each handler gets its own copy of the event's data.

    A handler that raises is logged and the next one is called. A handler that is slow delays the handlers after it
    (so that the events of one task keep their order: ``attempted`` before ``succeeded``/``failed``) but nothing
    else; while the handlers cannot keep up, events queue up to ``max_queued`` and beyond that new events are
    dropped — logged as a warning and counted in :attr:`dropped` (the ``taskcenter_events_dropped`` metric) —
    rather than slow down delivery. :meth:`drain` waits for the queue to empty (shutdown).
    """

    def __init__(self, *, max_queued: int = MAX_QUEUED) -> None:
        self._handlers: dict[str, tuple[tuple[Handler, bool], ...]] = {}
        self.max_queued = max_queued
        self._queue: collections.deque[tuple[str, dict[str, Any], tuple[tuple[Handler, bool], ...]]] = (
            collections.deque()
        )
        self._delivery: asyncio.Task[None] | None = None
        self.dropped: collections.Counter[str] = collections.Counter()
        """Events dropped because the queue was full, by event name."""
        self.on_drop: Callable[[str], None] | None = None
        """Called with the event's name for each event dropped (the runtime counts them in its metrics)."""
        self._dropped_since_warning = 0
        self._warned_at = -_DROP_WARNING_EVERY_S

    def on(self, event: str, handler: Handler) -> None:
        """Register ``handler(event, data)``; it may be a plain function or a coroutine function."""
        if event not in EVENTS:
            raise ValidationError(
                f"unknown event {event!r}; one of {', '.join(sorted(EVENTS))}", field="event"
            )
        if not callable(handler):  # else it would fail, logged only, at every event
            raise ValidationError(f"the handler for {event!r} is not callable", field="handler")
        self._handlers[event] = (*self._handlers.get(event, ()), (handler, _is_async(handler)))

    def __bool__(self) -> bool:
        return bool(self._handlers)

    def wants(self, event: str) -> bool:
        return event in self._handlers

    def delivers(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` is this bus's delivery task."""
        return task is self._delivery

    def publish(self, event: str, data: dict[str, Any]) -> None:
        """Queue ``event`` for its handlers and return at once; call it on the event loop.

        ``data`` is the bus's from then on: the caller must not change it (each handler gets a copy).
        """
        handlers = self._handlers.get(event)
        if handlers is None:
            return
        if len(self._queue) >= self.max_queued:
            self._drop(event)
            return
        self._queue.append((event, data, handlers))
        delivery = self._delivery
        if delivery is None or delivery.done():
            # Ends once the queue is empty: no task lingers on a loop (an application's, or a closing one).
            self._delivery = asyncio.get_running_loop().create_task(self._deliver(), name="tc-events")

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - a bound on this wait, as its name says
        """Wait up to ``timeout`` seconds for the queued events to be delivered; drop (and log) what is left."""
        delivery = self._delivery
        if delivery is None or delivery.done() or delivery.get_loop() is not asyncio.get_running_loop():
            return
        await asyncio.wait({delivery}, timeout=timeout)
        if delivery.done():
            return
        delivery.cancel()
        await asyncio.gather(delivery, return_exceptions=True)
        left = len(self._queue)
        self._queue.clear()
        log.warning(
            "event handlers did not finish within %g s: dropped %d queued events and what was left of the batch"
            " being delivered (at most %d events)",
            timeout,
            left,
            DELIVERY_BATCH,
        )

    def _drop(self, event: str) -> None:
        self.dropped[event] += 1
        if self.on_drop is not None:
            self.on_drop(event)
        self._dropped_since_warning += 1
        now = time.monotonic()
        if now - self._warned_at >= _DROP_WARNING_EVERY_S:
            log.warning(
                "event handlers cannot keep up: %d events waiting; dropped %d since the last warning (the last %s)",
                len(self._queue),
                self._dropped_since_warning,
                event,
            )
            self._warned_at = now
            self._dropped_since_warning = 0

    async def _deliver(self) -> None:
        queue = self._queue
        while queue:
            calls: list[_Call] = []
            for _ in range(min(len(queue), DELIVERY_BATCH)):
                event, data, handlers = queue.popleft()
                calls += [(handler, is_async, event, data) for handler, is_async in handlers]
            start = 0
            while start < len(calls):
                if calls[start][1]:
                    await _call_async(calls[start])
                    start += 1
                    continue
                end = start + 1
                while end < len(calls) and not calls[end][1]:
                    end += 1
                # One thread for a run of sync calls, not one per call; awaitables they return run here, after.
                for returned, event in await run_in_thread(_call_sync, calls[start:end]):
                    await _settle(returned, event)
                start = end


def _call_sync(calls: list[_Call]) -> list[tuple[Awaitable[Any], str]]:
    """Call sync handlers in order (in a thread of their own); returns the awaitables they returned, if any."""
    returned: list[tuple[Awaitable[Any], str]] = []
    for handler, _is_async, event, data in calls:
        try:
            result = handler(event, fresh(data))
        except Exception:
            log.exception("event handler for %s failed", event)
            continue
        if inspect.isawaitable(result):  # e.g. a lambda returning a coroutine
            returned.append((result, event))
    return returned


async def _call_async(call: _Call) -> None:
    handler, _is_async, event, data = call
    try:
        result = handler(event, fresh(data))
    except Exception:
        log.exception("event handler for %s failed", event)
        return
    if inspect.isawaitable(result):
        await _settle(result, event)


async def _settle(awaitable: Awaitable[Any], event: str) -> None:
    try:
        await awaitable
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("event handler for %s failed", event)
