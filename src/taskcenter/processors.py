"""Custom task processors (library mode): a payload in, a JSON result out.

An exception means "retry by policy"; :class:`~taskcenter.errors.PermanentFailure` means "fail now".
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from taskcenter.domain.outcome import AttemptResult
from taskcenter.domain.retry import RetryPolicy
from taskcenter.errors import PermanentFailure, ProcessorError, ValidationError

ProcessorFunc = Callable[[Any], Awaitable[Any] | Any]
#: Task types of this prefix are taskcenter's own (e.g. ``taskcenter.email``): registered by the runtime, run by
#: workers, never created, changed or registered by a caller.
BUILTIN_PREFIX = "taskcenter."


def is_builtin(task_type: str) -> bool:
    """Whether ``task_type`` names one of taskcenter's own processors."""
    return task_type.startswith(BUILTIN_PREFIX)


def _json_result(name: str, value: Any) -> Any:
    """``value`` if the database can store it as JSON, else :class:`ProcessorError` (an ordinary retry).

    Checked while the attempt is still running: a result that cannot be written would otherwise only fail
    when the dispatcher writes the batch, leaving the task leased until its lease expires, again and again.
    The options match the database's JSON serialiser.
    """
    try:
        orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        raise ProcessorError(f"processor {name!r} returned a result that is not JSON: {exc}") from exc
    return value


def _is_async(func: ProcessorFunc) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one (a processor class)."""
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def _checked(name: str, func: ProcessorFunc) -> ProcessorFunc:
    """Wrap ``func`` so its result is checked as JSON, keeping it a coroutine function if it was one."""
    if _is_async(func):

        @functools.wraps(func)
        async def run_async(payload: Any) -> Any:
            return _json_result(name, await func(payload))

        return run_async

    @functools.wraps(func)
    def run(payload: Any) -> Any:
        value = func(payload)
        if inspect.isawaitable(value):  # run in a thread, where nothing would await it
            if inspect.iscoroutine(value):
                value.close()
            raise ProcessorError(f"processor {name!r} returned an awaitable: make it an async def")
        return _json_result(name, value)

    return run


async def run_in_thread(func: Callable[[Any], Any], payload: Any) -> Any:
    """Run a sync processor in a daemon thread of its own and await its result.

    Not the loop's default executor (``asyncio.to_thread``): a processor that hangs past its timeout keeps its
    thread, and a few such threads would fill that small pool, which aiohttp's DNS resolver shares, so every
    HTTP task of the worker would time out; and the pool's threads are joined at exit, so a hung processor
    would keep the process alive after a graceful shutdown. An abandoned attempt is already recorded (timeout)
    or released (shutdown), so nothing waits for its thread.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():  # timed out or cancelled meanwhile
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def work() -> None:
        try:
            outcome = (True, context.run(func, payload))
        except BaseException as exc:  # handed to the awaiting coroutine, like a to_thread future would
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed while the processor ran
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name="taskcenter-processor", daemon=True).start()
    return await future


@dataclass(frozen=True, slots=True)
class Processor:
    """A registered processor and the defaults its tasks get."""

    name: str
    func: ProcessorFunc
    retry: RetryPolicy | None = None
    priority: int = 0

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.func)


class ProcessorRegistry:
    """Processors by task type name."""

    def __init__(self) -> None:
        self._by_name: dict[str, Processor] = {}
        self._types: tuple[str, ...] = ()
        self._creatable: frozenset[str] = frozenset()  # read per create: built per register, not per call

    def register(
        self,
        name: str,
        func: ProcessorFunc,
        *,
        retry: RetryPolicy | None = None,
        priority: int = 0,
        builtin: bool = False,
    ) -> Processor:
        """Register ``func`` for task type ``name``; ``builtin`` is for taskcenter's own (``taskcenter.…``)."""
        if not name or name == "http" or len(name) > 100 or is_builtin(name) != builtin:
            raise ValidationError(f"processor name {name!r} is not allowed", field="type")
        processor = Processor(name, _checked(name, func), retry, priority)
        self._by_name[name] = processor
        self._types = tuple(sorted(self._by_name))
        self._creatable = frozenset(n for n in self._by_name if not is_builtin(n))
        return processor

    def get(self, name: str) -> Processor | None:
        return self._by_name.get(name)

    async def attempt(self, row: Mapping[str, Any]) -> tuple[AttemptResult, Any, int]:
        """Run a claimed task's processor once, within the task's timeout: the attempt's result, the value the
        processor returned (``None`` unless it succeeded) and how long it ran, in ms.

        A cancellation of the attempt itself (shutdown) propagates: the dispatcher records it as interrupted.
        """
        processor = self._by_name.get(row["type"])
        t0 = time.perf_counter()
        if processor is None:
            return (
                AttemptResult(
                    error_kind="permanent_failure", error=f"no processor registered for {row['type']!r}"
                ),
                None,
                0,
            )
        try:
            if processor.is_async:
                value = await asyncio.wait_for(processor.func(row["payload"]), timeout=row["timeout"])
            else:
                value = await asyncio.wait_for(
                    run_in_thread(processor.func, row["payload"]), timeout=row["timeout"]
                )
            return AttemptResult(status_code=200), value, int((time.perf_counter() - t0) * 1000)
        except PermanentFailure as exc:
            kind, text = "permanent_failure", str(exc)
        except TimeoutError:
            kind, text = "timeout", f"processor took longer than {row['timeout']:g} s"
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this attempt was cancelled (shutdown): the dispatcher records it as interrupted
            # Raised by the processor itself (e.g. awaiting something cancelled): an ordinary failure, not a
            # shutdown, which would retry it at once and without end.
            kind, text = "processor_error", f"CancelledError: {exc}".rstrip(": ")
        except Exception as exc:
            kind, text = "processor_error", f"{type(exc).__name__}: {exc}"
        return AttemptResult(error_kind=kind, error=text[:2000]), None, int((time.perf_counter() - t0) * 1000)

    def names(self) -> frozenset[str]:
        """Every task type this process can run, taskcenter's own included."""
        return frozenset(self._by_name)

    def types(self) -> tuple[str, ...]:
        """The registered names, sorted: the task types (besides ``http``) a worker with these processors claims."""
        return self._types

    def creatable(self) -> frozenset[str]:
        """The task types callers may create: the registered ones that are not taskcenter's own."""
        return self._creatable

    def __call__(self) -> frozenset[str]:
        return self.names()
