"""Host policies as operators write them: the ``host:port`` key, the policy fields and their ranges, pauses; and
how a policy row resolves over the defaults into a host's limits (the host service and the dispatchers' policy
loader both read it so)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from taskcenter.domain.traffic import MAX_BREAKER_WINDOW, Limits
from taskcenter.errors import ValidationError


@dataclass(frozen=True, slots=True)
class _Range:
    kind: type
    low: float
    high: float
    low_open: bool = False

    def describe(self, name: str) -> str:
        what = "an integer" if self.kind is int else "a number"
        low = f"greater than {self.low:,g}" if self.low_open else f"at least {self.low:,g}"
        return f"{name} must be {what} {low} and at most {self.high:,.0f}, or null for the default"


#: Policy fields, their types and ranges. Zero is refused where the dispatcher would read it as "block all"
#: (``max_in_flight``) or "open on any failure" (``breaker_ratio``): ``null`` gives back the default instead.
POLICY_FIELDS: Mapping[str, _Range] = {
    "rate_per_second": _Range(float, 0, 1_000_000, low_open=True),
    "burst": _Range(int, 1, 1_000_000),
    "max_in_flight": _Range(int, 1, 100_000),
    "breaker_failures": _Range(int, 1, 10_000),
    "breaker_ratio": _Range(float, 0, 1, low_open=True),
    "breaker_window": _Range(int, 1, MAX_BREAKER_WINDOW),
    "breaker_cooldown": _Range(float, 0, 86_400, low_open=True),
}
PAUSE_FIELDS = frozenset({"paused_until", "pause_seconds"})
#: Longest operator pause: as far ahead as a task may be scheduled.
MAX_PAUSE_S = 365 * 86_400.0
_HOST_HELP = (
    "host must be host:port with a lower-case host name or a [bracketed] IPv6 address and a port 1-65535"
)


def parse_host(text: str) -> str:
    """Check a ``host:port`` key as tasks carry it (``api.example.com:443``, ``[::1]:8080``); return it.

    Raises:
        ValidationError: naming ``host`` when it is not one.
    """
    name, colon, port = text.rpartition(":")
    # At most 5 digits before int(): a port of thousands of them is past int()'s limit (a ValueError).
    if not colon or not port.isascii() or not port.isdigit() or len(port) > 5 or port != str(int(port)):
        raise ValidationError(_HOST_HELP, field="host")
    if not 1 <= int(port) <= 65535:
        raise ValidationError(_HOST_HELP, field="host")
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValidationError(_HOST_HELP, field="host") from None
        if inner != inner.lower():
            raise ValidationError(_HOST_HELP, field="host")
        return text
    if (
        not 1 <= len(name) <= 253
        or name != name.lower()
        or not all(c.isalnum() or c in "-._" for c in name)
        or name[0] in "-."
    ):
        raise ValidationError(_HOST_HELP, field="host")
    return text


def _number(name: str, value: Any) -> int | float:
    rule = POLICY_FIELDS[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(rule.describe(name), field=name)
    if rule.kind is int and not (isinstance(value, int) or value.is_integer()):
        raise ValidationError(rule.describe(name), field=name)
    too_low = value <= rule.low if rule.low_open else value < rule.low
    # "not <= high" rather than "> high": NaN fails every comparison, so this refuses it too.
    if too_low or not value <= rule.high:
        raise ValidationError(rule.describe(name), field=name)
    return int(value) if rule.kind is int else float(value)


def pause_end(until: Any, seconds: Any, now: datetime, *, names: tuple[str, str]) -> datetime:
    """The end of a pause given as a time or as seconds from now (exactly one of them)."""
    until_name, seconds_name = names
    if until is not None and seconds is not None:
        raise ValidationError(f"give {until_name} or {seconds_name}, not both", field=until_name)
    if until is None and seconds is None:
        raise ValidationError(f"give {until_name} (a time) or {seconds_name}", field=seconds_name)
    if seconds is not None:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int | float)
            or not 0 < seconds <= MAX_PAUSE_S
        ):
            raise ValidationError(
                f"{seconds_name} must be greater than 0 and at most {MAX_PAUSE_S:,.0f} seconds (a year)",
                field=seconds_name,
            )
        return now + timedelta(seconds=seconds)
    if isinstance(until, str):
        try:
            until = datetime.fromisoformat(until.replace("Z", "+00:00"))
        except ValueError:
            raise ValidationError(f"{until_name} must be an RFC 3339 date-time", field=until_name) from None
    if not isinstance(until, datetime):
        raise ValidationError(f"{until_name} must be an RFC 3339 date-time", field=until_name)
    if until.tzinfo is None:
        raise ValidationError(f"{until_name} needs a time zone (e.g. Z)", field=until_name)
    try:
        end: datetime = until.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValidationError(f"{until_name} is out of range", field=until_name) from None
    if end <= now:
        raise ValidationError(
            f"{until_name} must be in the future (to lift a pause, resume)", field=until_name
        )
    if end - now > timedelta(seconds=MAX_PAUSE_S):
        raise ValidationError(f"{until_name} is more than a year ahead", field=until_name)
    return end


def validate_policy(data: Mapping[str, Any], now: datetime) -> tuple[dict[str, Any], bool, datetime | None]:
    """Check a policy change: returns (column values, whether the pause changes, the new operator pause end).

    ``null`` for a policy field resets it to the default; ``"paused_until": null`` lifts the operator pause.

    Raises:
        ValidationError: naming the offending field.
    """
    unknown = sorted(set(data) - set(POLICY_FIELDS) - PAUSE_FIELDS)
    if unknown:
        raise ValidationError(f"{unknown[0]} is not a known field", field=unknown[0])
    values = {
        name: None if data[name] is None else _number(name, data[name])
        for name in POLICY_FIELDS
        if name in data
    }
    until, seconds = data.get("paused_until"), data.get("pause_seconds")
    if until is None and seconds is None:
        return values, "paused_until" in data, None
    return values, True, pause_end(until, seconds, now, names=("paused_until", "pause_seconds"))


def host_limits(row: Mapping[Any, Any] | None, defaults: Limits) -> Limits:
    """The limits a policy row (or none) gives a host: its own values where set, else ``defaults``, and the
    operator's pause."""
    policy = effective_policy(row, defaults)
    paused = row["paused_until"] if row is not None else None
    return Limits(
        rate_per_second=policy["rate_per_second"],
        burst=policy["burst"],
        max_in_flight=policy["max_in_flight"],
        breaker_failures=policy["breaker_failures"],
        breaker_ratio=policy["breaker_ratio"],
        breaker_window=policy["breaker_window"],
        breaker_cooldown_s=policy["breaker_cooldown"],
        paused_until=paused.timestamp() if paused is not None else 0.0,
    )


def effective_policy(row: Mapping[Any, Any] | None, defaults: Limits) -> dict[str, Any]:
    """A host's policy: its own values where set, else ``defaults`` (the dict form of :func:`host_limits`)."""
    fallback = {
        "rate_per_second": defaults.rate_per_second,
        "burst": defaults.burst,
        "max_in_flight": defaults.max_in_flight,
        "breaker_failures": defaults.breaker_failures,
        "breaker_ratio": defaults.breaker_ratio,
        "breaker_window": defaults.breaker_window,
        "breaker_cooldown": defaults.breaker_cooldown_s,
    }
    if row is None:
        return fallback
    return {name: row[name] if row[name] is not None else default for name, default in fallback.items()}
