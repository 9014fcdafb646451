"""Custom task processors (library mode): a payload in, a JSON result out.

An exception means "retry by policy"; :class:`~taskcenter.errors.PermanentFailure` means "fail now".
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from taskcenter.domain.retry import RetryPolicy
from taskcenter.errors import ValidationError

ProcessorFunc = Callable[[Any], Awaitable[Any] | Any]


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

    def register(
        self, name: str, func: ProcessorFunc, *, retry: RetryPolicy | None = None, priority: int = 0
    ) -> Processor:
        if not name or name == "http" or len(name) > 100:
            raise ValidationError(f"processor name {name!r} is not allowed", field="type")
        processor = Processor(name, func, retry, priority)
        self._by_name[name] = processor
        return processor

    def get(self, name: str) -> Processor | None:
        return self._by_name.get(name)

    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def __call__(self) -> frozenset[str]:
        return self.names()
