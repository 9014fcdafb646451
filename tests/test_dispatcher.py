"""The dispatcher's own bookkeeping: the retry-policy cache and the metrics of its attempts, on both backends."""

from __future__ import annotations

import asyncio
import re
from typing import Any, cast

import pytest

from taskcenter.dispatcher import Dispatcher
from taskcenter.errors import ValidationError
from taskcenter.runtime import Runtime
from tests.receiver import Receiver, Reply
from tests.test_delivery import running, wait_status


def sample(rt: Runtime, name: str, **labels: str) -> float | None:
    """The value of one sample as /metrics shows it, or None when it is not there."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(wanted)}\}})? (\S+)$" if wanted else rf"^{name} (\S+)$"
    match = re.search(pattern, rt.metrics.render().decode(), re.MULTILINE)
    return float(match.group(1)) if match else None


def test_policy_cache_tells_apart_what_the_policy_parser_tells_apart() -> None:
    parse = Dispatcher(db=cast(Any, None), sender=cast(Any, None))._recorder.policy
    fixed = {"strategy": "fixed", "interval": 1, "max_attempts": 3}
    policy = parse(fixed)
    assert parse({"max_attempts": 3, "interval": 1, "strategy": "fixed"}) is policy  # key order
    # Equal in Python (3 == 3.0 == True is not far) but not the same stored policy: each is judged on its own.
    for odd in (3.0, True):
        with pytest.raises(ValidationError):
            parse({**fixed, "max_attempts": odd})
    assert parse({**fixed, "interval": 1.0}).interval == 1.0
    assert parse({**fixed, "interval": 2}).interval == 2.0


async def test_metrics_count_attempts_outcomes_and_slots_in_use(runtime: Runtime, receiver: Receiver) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    hold = asyncio.Event()
    receiver.set_default(Reply(hold=hold), "/held")
    receiver.script("/down", Reply(status=503), Reply(status=503))
    held = [
        await runtime.service.create_task(biz, {"business_id": f"h{i}", "url": receiver.url("/held")})
        for i in range(3)
    ]
    down = await runtime.service.create_task(
        biz,
        {
            "business_id": "d",
            "url": receiver.url("/down"),
            "retry": {"strategy": "intervals", "intervals": [0.05]},
        },
    )
    async with running(runtime):
        await receiver.wait_for(3, "/held", timeout=10)
        await wait_status(runtime, biz, down.id, "failed")
        assert sample(runtime, "taskcenter_in_flight") == 3.0
        hold.set()
        for task in held:
            await wait_status(runtime, biz, task.id, "succeeded")
        assert sample(runtime, "taskcenter_in_flight") == 0.0
    assert sample(runtime, "taskcenter_attempts_total", outcome="success") == 3.0
    assert sample(runtime, "taskcenter_attempts_total", outcome="server_error") == 2.0
    assert sample(runtime, "taskcenter_tasks_finished_total", status="succeeded") == 3.0
    assert sample(runtime, "taskcenter_tasks_finished_total", status="failed") == 1.0
    assert sample(runtime, "taskcenter_attempt_duration_seconds_count") == 5.0


async def test_a_claim_loop_that_crashes_ends_the_dispatcher_instead_of_leaving_it_hung(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error out of the claim (a tiny host rate once raised OverflowError there) used to leave
    run() waiting on the result writer forever: no delivery, health still 'running', and stop() hung too."""
    dispatcher = runtime.dispatcher()

    async def broken(_limit: int) -> Any:
        raise OverflowError("timestamp out of range for platform time_t")

    monkeypatch.setattr(dispatcher, "_claim", broken)
    with pytest.raises(OverflowError):
        await asyncio.wait_for(runtime.run_dispatcher(dispatcher), timeout=10)
