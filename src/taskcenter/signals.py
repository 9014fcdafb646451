"""How the dispatchers hear of tasks created or cancelled: in this process through a :class:`Notifier`, in others
by PostgreSQL's NOTIFY on the channels below (the cancel channel's payloads carry the row ids)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

NOTIFY_CHANNEL = "taskcenter_tasks"
#: NOTIFY'd with the row ids of cancelled tasks that a worker held, comma-separated (see :func:`cancel_payloads`),
#: so that the worker drops those it has not started yet.
CANCEL_CHANNEL = "taskcenter_cancelled"
#: PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
NOTIFY_PAYLOAD_MAX = 7999


def cancel_payloads(ids: Sequence[int], limit: int = NOTIFY_PAYLOAD_MAX) -> list[str]:
    """The ids as comma-separated NOTIFY payloads of at most ``limit`` bytes each (a bulk cancel may need several)."""
    payloads: list[str] = []
    chunk: list[str] = []
    size = 0
    for text in map(str, ids):
        if chunk and size + 1 + len(text) > limit:
            payloads.append(",".join(chunk))
            chunk, size = [], 0
        size += len(text) + (1 if chunk else 0)
        chunk.append(text)
    if chunk:
        payloads.append(",".join(chunk))
    return payloads


def parse_cancel_payload(payload: str) -> list[int]:
    """The row ids of a :data:`CANCEL_CHANNEL` payload (anything else in it is ignored)."""
    return [int(part) for part in payload.split(",") if part.isascii() and part.isdigit()]


class Notifier:
    """Tells the dispatchers of this process that a task falls due soon, or that tasks one of them may hold were
    cancelled (PostgreSQL's NOTIFY reaches the rest)."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._cancel_listeners: list[Callable[[Sequence[int]], None]] = []

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def wake(self) -> None:
        for callback in self._listeners:
            callback()

    def subscribe_cancelled(self, callback: Callable[[Sequence[int]], None]) -> None:
        self._cancel_listeners.append(callback)

    def unsubscribe_cancelled(self, callback: Callable[[Sequence[int]], None]) -> None:
        if callback in self._cancel_listeners:
            self._cancel_listeners.remove(callback)

    def cancelled(self, ids: Sequence[int]) -> None:
        """Tasks held by a worker (leased) were cancelled: the dispatcher holding one drops it unless it started."""
        for callback in self._cancel_listeners:
            callback(ids)
