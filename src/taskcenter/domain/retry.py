"""Retry policies: when to try again, and how many times at most."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from taskcenter.errors import ValidationError

#: At most 10 retries: one first attempt plus ten more.
MAX_ATTEMPTS = 11
MAX_DELAY_S = 30 * 24 * 3600.0

Strategy = Literal["exponential", "fixed", "intervals"]


def _number(data: Mapping[str, Any], key: str, default: float, *, lo: float, hi: float, field_: str) -> float:
    """``data[key]`` as a float in ``[lo, hi]``; errors name ``field_.key`` (``field_`` if key is "")."""
    value = data.get(key, default)
    where = f"{field_}.{key}" if key else field_
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{where} must be a number", field=where)
    if not lo <= value <= hi:
        unit = " seconds (30 days)" if hi == MAX_DELAY_S else ""
        raise ValidationError(f"{where} must be between {_plain(lo)} and {_plain(hi)}{unit}", field=where)
    return float(value)


def _plain(bound: float) -> str:
    """A bound as people write it: ``2592000``, not ``:g``'s ``2.592e+06``."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _count(value: Any, *, field_: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{field_} must be an integer", field=field_)
    if not 1 <= value <= MAX_ATTEMPTS:
        raise ValidationError(
            f"{field_} must be between 1 and {MAX_ATTEMPTS} (at most 10 retries)", field=field_
        )
    return value


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to wait before each retry, and how many attempts a task gets.

    * ``exponential``: the delay before retry *n* (n = 1, 2, …) is
      ``min(max_delay, initial_delay × multiplier^(n−1))``, then scaled by a uniform factor in
      ``[1 − jitter, 1 + jitter]``.
    * ``fixed``: ``interval`` before every retry.
    * ``intervals``: the *n*-th entry of ``intervals``; ``max_attempts = len(intervals) + 1``
      (an empty list means one attempt only).

    Seconds everywhere. At most 10 retries (``max_attempts`` ≤ 11).
    """

    strategy: Strategy = "exponential"
    max_attempts: int = 5
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 3600.0
    jitter: float = 0.1
    interval: float = 60.0
    intervals: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.strategy not in ("exponential", "fixed", "intervals"):
            raise ValidationError(
                "retry.strategy must be exponential, fixed or intervals", field="retry.strategy"
            )
        _count(self.max_attempts, field_="retry.max_attempts")
        if self.strategy == "intervals" and self.max_attempts != len(self.intervals) + 1:
            raise ValidationError(
                "retry.max_attempts must equal len(intervals) + 1", field="retry.max_attempts"
            )
        # Built directly (not through from_dict) the numbers must hold the same bounds, or delay() could go
        # negative or overflow.
        for name, lo, hi in (
            ("initial_delay", 0.0, MAX_DELAY_S),
            ("multiplier", 1.0, 100.0),
            ("max_delay", 0.0, MAX_DELAY_S),
            ("jitter", 0.0, 1.0),
            ("interval", 0.0, MAX_DELAY_S),
        ):
            _number({name: getattr(self, name)}, name, 0.0, lo=lo, hi=hi, field_="retry")
        for n, value in enumerate(self.intervals):
            _number({"": value}, "", 0.0, lo=0, hi=MAX_DELAY_S, field_=f"retry.intervals[{n}]")

    # -- constructors ---------------------------------------------------------------------------------

    @classmethod
    def exponential(
        cls,
        initial_delay: float = 1.0,
        multiplier: float = 2.0,
        max_delay: float = 3600.0,
        jitter: float = 0.1,
        max_attempts: int = 5,
    ) -> RetryPolicy:
        """Exponential back-off with jitter."""
        return cls.from_dict(
            {
                "strategy": "exponential",
                "initial_delay": initial_delay,
                "multiplier": multiplier,
                "max_delay": max_delay,
                "jitter": jitter,
                "max_attempts": max_attempts,
            }
        )

    @classmethod
    def fixed(cls, interval: float = 60.0, max_attempts: int = 4) -> RetryPolicy:
        """The same ``interval`` before every retry."""
        return cls.from_dict({"strategy": "fixed", "interval": interval, "max_attempts": max_attempts})

    @classmethod
    def from_intervals(cls, intervals: Sequence[float]) -> RetryPolicy:
        """An explicit list of delays, one per retry."""
        return cls.from_dict({"strategy": "intervals", "intervals": list(intervals)})

    @classmethod
    def none(cls) -> RetryPolicy:
        """One attempt, no retry."""
        return cls(strategy="intervals", max_attempts=1, intervals=())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, field_: str = "retry") -> RetryPolicy:
        """Build and validate a policy from its JSON form (see DESIGN "Retry policy")."""
        if not isinstance(data, Mapping):
            raise ValidationError(f"{field_} must be an object", field=field_)
        strategy = data.get("strategy", "exponential")
        if not isinstance(strategy, str):  # an unhashable value would make the lookup below raise TypeError
            raise ValidationError(
                f"{field_}.strategy must be exponential, fixed or intervals", field=f"{field_}.strategy"
            )
        known = {
            "exponential": {"strategy", "initial_delay", "multiplier", "max_delay", "jitter", "max_attempts"},
            "fixed": {"strategy", "interval", "max_attempts", "max_delay"},
            "intervals": {"strategy", "intervals", "max_attempts", "max_delay"},
        }
        if strategy not in known:
            raise ValidationError(
                f"{field_}.strategy must be exponential, fixed or intervals", field=f"{field_}.strategy"
            )
        unknown = sorted(set(data) - known[strategy])
        if unknown:
            raise ValidationError(
                f"{field_}.{unknown[0]} is not a field of the {strategy} strategy",
                field=f"{field_}.{unknown[0]}",
            )
        max_delay = _number(data, "max_delay", 3600.0, lo=0, hi=MAX_DELAY_S, field_=field_)
        if strategy == "exponential":
            return cls(
                strategy="exponential",
                initial_delay=_number(data, "initial_delay", 1.0, lo=0, hi=MAX_DELAY_S, field_=field_),
                multiplier=_number(data, "multiplier", 2.0, lo=1, hi=100, field_=field_),
                max_delay=max_delay,
                jitter=_number(data, "jitter", 0.1, lo=0, hi=1, field_=field_),
                max_attempts=_count(data.get("max_attempts", 5), field_=f"{field_}.max_attempts"),
            )
        if strategy == "fixed":
            return cls(
                strategy="fixed",
                interval=_number(data, "interval", 60.0, lo=0, hi=MAX_DELAY_S, field_=field_),
                max_delay=max_delay,
                max_attempts=_count(data.get("max_attempts", 4), field_=f"{field_}.max_attempts"),
            )
        raw = data.get("intervals", [])
        if not isinstance(raw, list | tuple):
            raise ValidationError(
                f"{field_}.intervals must be a list of seconds", field=f"{field_}.intervals"
            )
        if len(raw) > MAX_ATTEMPTS - 1:
            raise ValidationError(
                f"{field_}.intervals allows at most 10 retries", field=f"{field_}.intervals"
            )
        intervals = tuple(
            _number({"": v}, "", 0, lo=0, hi=MAX_DELAY_S, field_=f"{field_}.intervals[{n}]")
            for n, v in enumerate(raw)
        )
        if "max_attempts" in data and data["max_attempts"] != len(intervals) + 1:
            raise ValidationError(
                f"{field_}.max_attempts must equal len(intervals) + 1", field=f"{field_}.max_attempts"
            )
        return cls(
            strategy="intervals", intervals=intervals, max_attempts=len(intervals) + 1, max_delay=max_delay
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with only the fields of this strategy."""
        if self.strategy == "exponential":
            return {
                "strategy": "exponential",
                "initial_delay": self.initial_delay,
                "multiplier": self.multiplier,
                "max_delay": self.max_delay,
                "jitter": self.jitter,
                "max_attempts": self.max_attempts,
            }
        # max_delay also caps a receiver's Retry-After, so it belongs to every strategy's stored form.
        if self.strategy == "fixed":
            return {
                "strategy": "fixed",
                "interval": self.interval,
                "max_attempts": self.max_attempts,
                "max_delay": self.max_delay,
            }
        return {
            "strategy": "intervals",
            "intervals": list(self.intervals),
            "max_attempts": self.max_attempts,
            "max_delay": self.max_delay,
        }

    # -- arithmetic -----------------------------------------------------------------------------------

    def base_delay(self, retry: int) -> float:
        """The delay before retry number ``retry`` (1-based), without jitter."""
        if retry < 1:
            raise ValueError("retry numbers start at 1")
        if self.strategy == "exponential":
            try:
                growth = self.multiplier ** (retry - 1)
            except OverflowError:  # past ~1e308 only the cap matters (and 0 times anything stays 0)
                growth = float("inf")
            return min(self.max_delay, self.initial_delay * growth if self.initial_delay else 0.0)
        if self.strategy == "fixed":
            return self.interval
        return self.intervals[min(retry, len(self.intervals)) - 1] if self.intervals else 0.0

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """The delay before retry number ``retry`` (1-based), jitter applied for ``exponential``."""
        base = self.base_delay(retry)
        if self.strategy != "exponential" or self.jitter == 0:
            return base
        factor = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return base * factor
