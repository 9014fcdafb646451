"""Traffic control across real worker processes on one PostgreSQL database: one host limit for all of them,
and one circuit breaker."""

from __future__ import annotations

import asyncio
import collections
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from taskcenter.runtime import Runtime
from taskcenter.storage.schema import attempts as attempts_table
from tests.processes import WorkerProcess
from tests.receiver import Receiver, Reply
from tests.test_traffic import (
    FAST,
    all_finished,
    arrivals,
    assert_within_rate,
    host_of,
    host_row,
    make_tasks,
    set_host_policy,
    task_rows,
    wait_until,
)

pytestmark = [
    pytest.mark.parametrize("backend", ["postgres"], indirect=True),
    pytest.mark.usefixtures(
        "quiet_gc"
    ),  # the receiver shares this process: keep its GC pauses out of arrival times
]

RATE, BURST, TOTAL = 50, 10, 600


def stop_all(procs: list[WorkerProcess]) -> list[int]:
    """SIGTERM every worker; their exit codes (a worker that will not stop is killed)."""
    codes = []
    for proc in procs:
        try:
            codes.append(proc.terminate())
        except Exception:
            proc.kill()
            codes.append(-9)
    return codes


@pytest.mark.parametrize("workers", [2, 3])
async def test_worker_processes_share_one_host_rate_limit(
    runtime: Runtime, receiver: Receiver, db_url: str, workers: int
) -> None:
    """Host policy 50/s burst 10, 600 tasks: no one-second window above 60 arrivals once the first burst is out
    (see assert_within_rate), 50/s ± 5 % in the long run, and every process sending its share."""
    biz = await runtime.service.ensure_business("bulk", rate_limit_per_minute=FAST)
    await set_host_policy(runtime, host_of(receiver), rate_per_second=RATE, burst=BURST)
    ids = await make_tasks(runtime, biz, receiver.url("/limited"), TOTAL, "k")
    procs = [WorkerProcess(db_url, concurrency=20) for _ in range(workers)]
    try:
        await receiver.wait_for(TOTAL, "/limited", timeout=TOTAL / RATE + 30)
        rows = await all_finished(runtime, ids, timeout=20)
    finally:
        codes = await asyncio.to_thread(stop_all, procs)
    times = arrivals(receiver, "/limited")
    assert len(times) == TOTAL
    # Two or three processes starting at once on a small machine send the first burst late and bunched.
    assert_within_rate(times, RATE, BURST, first_slack=0.1)
    after_burst = times[BURST:]
    long_run = (len(after_burst) - 1) / (after_burst[-1] - after_burst[0])
    assert long_run == pytest.approx(RATE, rel=0.05)
    assert {(r["status"], r["attempts"]) for r in rows} == {("succeeded", 1)}
    async with runtime.db.read() as conn:
        counts = await conn.execute(
            sa.select(attempts_table.c.worker, sa.func.count()).group_by(attempts_table.c.worker)
        )
        by_worker: dict[str, int] = {worker: n for worker, n in counts.all()}
    assert len(by_worker) == workers, "every process took a share of the one limit"
    assert sum(by_worker.values()) == TOTAL
    assert codes == [0] * workers


async def test_circuit_opened_by_one_worker_holds_for_another(
    runtime: Runtime, receiver: Receiver, db_url: str
) -> None:
    """Worker A sees 5 consecutive 503s and opens the circuit; worker B, started after A is gone, keeps the
    host's tasks waiting (no attempt spent) while it delivers to other hosts."""
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=FAST)
    host = host_of(receiver)
    await set_host_policy(runtime, host, breaker_cooldown=60)
    receiver.set_default(Reply(status=503), "/down")
    retry = {"strategy": "intervals", "intervals": [0.2] * 5}
    failing = await make_tasks(runtime, biz, receiver.url("/down"), 5, "f", retry=retry)
    first = WorkerProcess(db_url, concurrency=20)
    try:
        await receiver.wait_for(5, "/down", timeout=20)

        async def circuit_open() -> bool:
            row = await host_row(runtime, host)
            return row is not None and row["breaker"] == "open"

        await wait_until(circuit_open, 5, "worker A to open the circuit")
    finally:
        code = await asyncio.to_thread(first.terminate)
    assert code == 0
    sent_by_a = len(receiver.requests_for("/down"))
    receiver.set_default(Reply(status=200), "/down")
    async with Receiver() as elsewhere:
        waiting = await make_tasks(runtime, biz, receiver.url("/down"), 10, "w")
        flowing = await make_tasks(runtime, biz, elsewhere.url("/ok"), 10, "o")
        second = WorkerProcess(db_url, concurrency=20)
        try:
            await all_finished(runtime, flowing, timeout=20)
            await asyncio.sleep(1.0)
        finally:
            code = await asyncio.to_thread(second.terminate)
    assert code == 0
    assert len(receiver.requests_for("/down")) == sent_by_a, "B sent nothing to the open circuit"
    row = await host_row(runtime, host)
    assert row is not None and row["breaker"] == "open"
    held = await task_rows(runtime, failing + waiting)
    assert {r["status"] for r in held} <= {"pending", "retrying"}
    assert sum(r["attempts"] for r in held) == sent_by_a
    reopen = datetime.fromtimestamp(row["open_until"], UTC)
    for r in held:
        if r["uuid"] in waiting:
            assert r["attempts"] == 0
            assert r["next_attempt_at"] >= reopen - timedelta(
                milliseconds=1
            )  # parked until the cool-down ends
    per_worker = collections.Counter(
        r["worker"] for r in await _attempt_rows(runtime) if r["worker"] is not None
    )
    assert len(per_worker) == 2, "A sent the failures, B the other host's tasks"
    assert time.time() < row["open_until"]


async def _attempt_rows(rt: Runtime) -> list[dict[str, object]]:
    async with rt.db.read() as conn:
        return [dict(r) for r in (await conn.execute(sa.select(attempts_table))).mappings()]
