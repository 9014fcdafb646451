"""A private event loop in a daemon thread, started on first use: the library's sync methods run the async ones
on it and wait, so that sync callers get exactly the behaviour of the async API."""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class PrivateLoop:
    """An event loop of its own, run in a daemon thread from the first :meth:`running` until :meth:`stop`.

    Args:
        at_exit: registered with :mod:`atexit` while the loop runs, so that what an application left open is
            closed before the interpreter's exit tears down the loop's connections under it.
    """

    def __init__(self, at_exit: Callable[[], None]) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self._at_exit = at_exit
        self._registered = False

    def running(self) -> asyncio.AbstractEventLoop:
        """The loop, started in a new thread if it is not running."""
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, name="taskcenter-loop", daemon=True)
            self.thread.start()
            atexit.register(self._at_exit)
            self._registered = True
        return self.loop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (or its exception)."""
        loop = self.running()
        try:
            self.check_not_on_it()
        except RuntimeError:
            coro.close()
            raise
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        while True:
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                if future.done():  # the call itself raised TimeoutError
                    raise
                if loop.is_closed():  # submitted as close() stopped the loop: it will never run
                    future.cancel()
                    coro.close()
                    raise RuntimeError("TaskCenter was closed while this call waited to run") from None

    def check_not_on_it(self) -> None:
        """Raise :class:`RuntimeError` on the loop's own thread, where waiting for the loop would wait for ever."""
        if threading.current_thread() is self.thread:
            # An event handler or an async processor run by the sync worker: blocking the private loop to wait
            # for work queued on that same loop would wait forever.
            raise RuntimeError(
                "TaskCenter's sync methods cannot be called from its own event loop (an event handler or an "
                "async processor); await the async twin there (e.g. `await tc.aget_task(...)`)"
            )

    def stop(self) -> None:
        """Stop the loop, wait for its thread (up to 5 s) and close it; a later :meth:`running` starts afresh."""
        loop, thread = self.loop, self.thread
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)
        if not loop.is_running():
            loop.close()
        self.loop = self.thread = None
        if self._registered:
            atexit.unregister(self._at_exit)
            self._registered = False
