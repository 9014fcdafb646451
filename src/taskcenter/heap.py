"""Memory housekeeping for long-running taskcenter processes (``serve`` and ``worker``)."""

from __future__ import annotations

import gc


def settle_heap() -> None:
    """Collect once, then keep every object alive now (modules, the app, the runtime) out of the cyclic GC.

    For a long-running process, called once after start-up: the full collections that load triggers every few
    seconds then scan only what requests and deliveries created since; and young collections run less often (see
    ``YOUNG_GC_THRESHOLD``). Without it each one walked the ~170,000
    start-up objects and stalled the event loop — every request and delivery in flight — for 100–250 ms
    (measured on the bench machine: that was the create latency's p99, and the dispatcher's loop-lag p99 fell
    from ~125 to 40–80 ms with it). Not for processes that build many apps (tests): frozen objects that later
    become cyclic garbage are never collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, 10, 10)


#: Allocations (net of frees) between two collections of the youngest generation; Python's default is 700. A
#: dispatcher with 100 requests in flight holds far more live young objects than that (each request's aiohttp
#: objects, futures, dicts), so at the default a young collection ran every few attempts and promoted them all
#: into the older generations, which then had to be walked too. At 10,000: worker CPU per delivered task fell by
#: 32-144 us (median 92) in 9 of 9 same-minute delivery-benchmark pairs, and collections' share of an attempt went
#: 18.6 -> ~0 us in an in-process harness (docs/benchmarks.md).
YOUNG_GC_THRESHOLD = 10_000
