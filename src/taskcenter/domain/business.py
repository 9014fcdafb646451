"""A business system (tenant) as the services need it: its code, status, limits, retry policy and guard lists."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from taskcenter.domain.retry import RetryPolicy


@dataclass(frozen=True, slots=True)
class Business:
    """A business system (tenant) as the service needs it."""

    pk: int
    code: str
    name: str
    status: str
    rate_limit_per_minute: int
    max_in_flight: int | None
    max_active_tasks: int
    retry: RetryPolicy | None
    allow_networks: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    deny_hosts: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Business:
        return cls(
            pk=row["id"],
            code=row["code"],
            name=row["name"],
            status=row["status"],
            rate_limit_per_minute=row["rate_limit_per_minute"],
            max_in_flight=row["max_in_flight"],
            max_active_tasks=row["max_active_tasks"],
            retry=RetryPolicy.from_dict(row["retry"]) if row["retry"] else None,
            allow_networks=tuple(row["allow_networks"] or ()),
            allow_hosts=tuple(row["allow_hosts"] or ()),
            deny_hosts=tuple(row["deny_hosts"] or ()),
        )
