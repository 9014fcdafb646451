import asyncio, bisect
import pytest
from tests.test_traffic_cluster import *
from tests.test_traffic_cluster import stop_all
pytestmark = pytest.mark.parametrize("backend", ["postgres"], indirect=True)

async def test_dbg(runtime, receiver, db_url):
    biz = await runtime.service.ensure_business("bulk", rate_limit_per_minute=FAST)
    await set_host_policy(runtime, host_of(receiver), rate_per_second=RATE, burst=BURST)
    ids = await make_tasks(runtime, biz, receiver.url("/limited"), TOTAL, "k")
    procs = [WorkerProcess(db_url, concurrency=20) for _ in range(2)]
    try:
        await receiver.wait_for(TOTAL, "/limited", timeout=60)
    finally:
        await asyncio.to_thread(stop_all, procs)
    reqs = sorted(receiver.requests_for("/limited"), key=lambda r: r.arrived_monotonic)
    times = [r.arrived_monotonic for r in reqs]
    counts = [bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)]
    m = max(counts); i = counts.index(m)
    print("max", m, "at", i, "t=", round(times[i]-times[0], 3))
    print([round((t - times[0]) * 1000) for t in times[:70]])
    print([r.client_port for r in reqs[:15]])
