"""Delivery throughput: one worker process sending a backlog of immediate tasks to a loopback receiver, against
the raw ceiling of a bare aiohttp client at the same concurrency, measured in the same run.

    python3 dev.py bench delivery --backend both --tasks 20000 --concurrency 100 --fail-fraction 0.2 [--profile]

A round, per backend and scenario: the raw ceiling; then per variant a fresh database holding the backlog
(created through ``TaskService.create_tasks``, not timed) and one worker process timed from its start to the
last arrival and to all tasks succeeded in the database; then the raw ceiling again. Each ratio compares the
worker with the mean of the two ceilings around it; with ``--repeat`` the verdict is on the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (dev.py bench): make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    EXPERIMENTS,
    OUT,
    Delivery,
    Fleet,
    Receiver,
    backends,
    cpu_seconds,
    deliver_backlog,
    enqueue,
    fresh_database,
    header,
    print_worker_details,
    run_script,
    script_parser,
    summarise_profile,
    table,
    task_item,
)

TARGETS = {"plain": 0.50, "failures": 0.40}
SHIPPED = "shipped"


@dataclass(frozen=True)
class Ceiling:
    """One raw-client run: its rate, its own CPU per request and the receiver CPU it cost."""

    rps: float
    client_cpu_us: float
    receiver_cpu_s: float


class AgainstCeiling:
    """A delivery set against the raw ceilings measured just before and after it (mixed into the runs of
    ``delivery`` and ``peers``, which declare both fields)."""

    delivery: Delivery
    ceilings: list[Ceiling]

    @property
    def ceiling(self) -> float:
        return statistics.fmean(c.rps for c in self.ceilings)

    @property
    def ratio(self) -> float:
        """Tasks per second to the last arrival, over the ceiling."""
        return self.delivery.arrival_rate / self.ceiling

    @property
    def ratio_done(self) -> float:
        """Tasks per second until the queue shows every task done, over the ceiling (the verdicts use this)."""
        return self.delivery.done_rate / self.ceiling


@dataclass
class Run(AgainstCeiling):
    """One worker run with the ceilings measured around it."""

    backend: str
    scenario: str
    variant: str
    enqueue_rate: float
    delivery: Delivery
    ceilings: list[Ceiling] = field(default_factory=list)

    @property
    def target(self) -> float:
        return TARGETS[self.scenario]

    @property
    def key(self) -> tuple[str, str, str]:
        return self.backend, self.scenario, self.variant

    @property
    def label(self) -> str:
        variant = "" if self.variant == SHIPPED else f" [{self.variant}]"
        return f"{self.backend} {self.scenario}{variant}"


def experiments_of(variant: str) -> list[str]:
    """``no-traffic+no-pre-ping`` → its experiments; ``shipped`` → none."""
    return [] if variant == SHIPPED else variant.split("+")


async def ceiling(fleet: Fleet, receiver: Receiver, n: int, concurrency: int) -> Ceiling:
    """The raw ceiling: a bare aiohttp client process posting ``n`` requests at ``concurrency``."""
    await receiver.reset()
    before = cpu_seconds(receiver.child.pid)
    done = await fleet.raw_ceiling(receiver.url(), requests=n, concurrency=concurrency)
    return Ceiling(float(done["rps"]), done["cpu_s"] / n * 1e6, cpu_seconds(receiver.child.pid) - before)


async def deliver(
    fleet: Fleet,
    receiver: Receiver,
    backend: str,
    scenario: str,
    variant: str,
    args: argparse.Namespace,
    *,
    profile: str | None = None,
) -> Run:
    """A fresh database holding the backlog, then one worker delivering it."""
    fail = args.fail_fraction if scenario == "failures" else 0.0
    db_url = await fresh_database(backend, f"delivery-{backend}", args.pg_url)
    count, enqueue_s = await enqueue(db_url, (task_item(i, receiver.url()) for i in range(args.tasks)))
    delivery = await deliver_backlog(
        fleet,
        receiver,
        db_url,
        count,
        concurrency=args.concurrency,
        name=f"worker-{backend}",
        timeout=max(120.0, args.tasks / 100),
        fail_fraction=fail,
        settings={"breaker_failures": args.breaker_failures} if fail and args.breaker_failures else None,
        experiments=experiments_of(variant),
        profile=profile,
    )
    return Run(backend, scenario, variant, count / enqueue_s, delivery)


async def round_once(
    fleet: Fleet, receiver: Receiver, backend: str, scenario: str, args: argparse.Namespace
) -> list[Run]:
    """Ceiling, every variant, ceiling."""
    before = await ceiling(fleet, receiver, args.tasks, args.concurrency)
    runs = []
    for variant in args.variant or [SHIPPED]:
        print(f"-- {backend} / {scenario} / {variant}: {args.tasks:,} tasks ...", flush=True)
        runs.append(await deliver(fleet, receiver, backend, scenario, variant, args))
    after = await ceiling(fleet, receiver, args.tasks, args.concurrency)
    for run in runs:
        run.ceilings = [before, after]
    return runs


def cpu_us(run: Run) -> float:
    """The worker's CPU microseconds per task."""
    return run.delivery.worker_cpu_s / run.delivery.tasks * 1e6


def queued(run: Run) -> str:
    """The share of the run the worker's main thread waited for a core, or '-' where the kernel does not say."""
    waited = run.delivery.main_thread_queued_s
    return "-" if waited is None else f"{waited / run.delivery.done_s:.0%}"


def main_us(run: Run) -> float:
    """The worker main thread's CPU microseconds per task."""
    return run.delivery.main_thread_cpu_s / run.delivery.tasks * 1e6


def report(runs: list[Run]) -> None:
    print(
        table(
            ["run", "raw ceiling req/s (before / after)", "taskcenter tasks/s (to last arrival)", "ratio",
             "tasks/s (to all succeeded in DB)", "ratio", "target", "verdict"],
            [
                [r.label, " / ".join(f"{c.rps:,.0f}" for c in r.ceilings), r.delivery.arrival_rate,
                 f"{r.ratio:.0%}", r.delivery.done_rate, f"{r.ratio_done:.0%}", f">= {r.target:.0%}",
                 "pass" if r.ratio_done >= r.target else "FAIL"]
                for r in runs
            ],
        )
    )  # fmt: skip
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault(r.key, []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        print("\nmedian over the rounds (the verdict uses the ratio to all tasks succeeded in the database):")
        print(
            table(
                ["run", "rounds", "median ratio (arrival)", "median ratio (DB)", "min / max ratio (DB)", "target",
                 "verdict"],
                [
                    [g[0].label, len(g), f"{statistics.median(r.ratio for r in g):.0%}",
                     f"{statistics.median(r.ratio_done for r in g):.0%}",
                     f"{min(r.ratio_done for r in g):.0%} / {max(r.ratio_done for r in g):.0%}", f">= {g[0].target:.0%}",
                     "pass" if statistics.median(r.ratio_done for r in g) >= g[0].target else "FAIL"]
                    for g in groups.values()
                ],
            )
        )  # fmt: skip
    print(
        "\nCPU cost: the worker is one process, so at 100% of one core it could deliver at most 1e6 / (its CPU per"
    )
    print(
        "task) tasks/s; 'of ceiling' puts that bound beside the raw ceiling (what removing all starvation buys)."
    )
    print(
        "Its main thread runs the event loop (every request, all of taskcenter's Python); only SQLite's statements"
    )
    print(
        "leave it, in the driver's thread, so the main thread's CPU per task is the firmer bound; the time it"
    )
    print(
        "waited for a core (runnable, while other processes or threads held both) is what the machine took."
    )
    print(
        table(
            ["run", "worker CPU/task", "main thread CPU/task", "raw client CPU/request", "worker bound (1 core)",
             "of ceiling", "worker busy", "main thread busy", "main thread waiting for a core",
             "enqueue tasks/s (not timed)"],
            [
                [r.label, f"{cpu_us(r):.0f} us", f"{main_us(r):.0f} us",
                 f"{statistics.fmean(c.client_cpu_us for c in r.ceilings):.0f} us",
                 f"{1e6 / cpu_us(r):,.0f}/s", f"{1e6 / cpu_us(r) / r.ceiling:.0%}",
                 f"{r.delivery.worker_cpu_s / r.delivery.done_s:.0%}",
                 f"{r.delivery.main_thread_cpu_s / r.delivery.done_s:.0%}", queued(r), r.enqueue_rate]
                for r in runs
            ],
        )
    )  # fmt: skip
    machine = [r for r in runs if r.delivery.machine is not None]
    if machine:
        cores = machine[0].delivery.machine.cores  # type: ignore[union-attr]
        print(
            f"\nThe whole machine from the worker's start to the last task succeeded: once its {cores} cores are busy,"
        )
        print(
            "tasks/s is at most cores x 1e6 / (all CPU per task), whatever the worker does with its own share."
        )
        print(table(["run", f"machine busy (of {cores} cores)", "steal", "all CPU/task", "worker", "receiver",
                     "PostgreSQL", "rest (kernel, this script)", f"bound at that cost ({cores} cores)",
                     "of ceiling"], [machine_row(r) for r in machine]))  # fmt: skip
    print()
    print_worker_details([(r.label, r.delivery) for r in runs])


def machine_row(run: Run) -> list[Any]:
    """Where the machine's CPU went per task during a worker run, and the rate those costs allow."""
    d, m = run.delivery, run.delivery.machine
    assert m is not None
    per_task = m.busy_s / d.tasks * 1e6
    parts = [d.worker_cpu_s, d.receiver_cpu_s, d.postgres_cpu_s]
    rest = max(0.0, m.busy_s - sum(parts)) / d.tasks * 1e6
    bound = m.cores * 1e6 / per_task if per_task else 0.0
    return [
        run.label, f"{m.busy_s / m.wall_s / m.cores:.0%}", f"{m.steal_s / m.wall_s / m.cores:.0%}",
        f"{per_task:.0f} us", *(f"{p / d.tasks * 1e6:.0f} us" if p else "-" for p in parts), f"{rest:.0f} us",
        f"{bound:,.0f}/s", f"{bound / run.ceiling:.0%}",
    ]  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    scenarios = ["plain", "failures"] if args.scenario == "both" else [args.scenario]
    runs: list[Run] = []
    profiled: list[str] = []
    async with Fleet(args.timeout) as fleet, asyncio.timeout(args.timeout):
        receiver = await fleet.receiver(max_seconds=args.timeout)
        for _ in range(args.repeat):
            for backend in backends(args.backend):
                for scenario in scenarios:
                    runs += await round_once(fleet, receiver, backend, scenario, args)
        if args.profile:
            for backend in backends(args.backend):
                stem = f"profile-{backend}"
                print(f"-- {backend} / plain under py-spy (figures not reported) ...", flush=True)
                await deliver(fleet, receiver, backend, "plain", SHIPPED, args, profile=stem)
                profiled.append(stem)
    header(f"delivery throughput: one worker process, concurrency {args.concurrency}, {args.tasks:,} tasks")
    if "failures" in scenarios:
        breaker = (
            f"breaker_failures={args.breaker_failures:,}" if args.breaker_failures else "default breaker"
        )
        print(
            f"   failures: {args.fail_fraction:.0%} of first attempts answered 500, retried after 1 s; {breaker}"
        )
    for variant in args.variant:
        if variant != SHIPPED:
            print(f"   variant {variant} is an EXPERIMENT, not taskcenter as shipped: " + "; ".join(
                EXPERIMENTS[e] for e in experiments_of(variant)))  # fmt: skip
    report(runs)
    for stem in profiled:
        print(f"\nworker profile {stem} (py-spy, share of the worker's busy samples; {OUT / stem}.svg):")
        print(summarise_profile(OUT / f"{stem}.txt"))


def variant(value: str) -> str:
    """Validate ``--variant``: ``shipped`` or experiments joined with ``+``."""
    if value != SHIPPED:
        unknown = [e for e in value.split("+") if e not in EXPERIMENTS]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown experiment {unknown[0]!r}; known: {', '.join(EXPERIMENTS)}"
            )
    return value


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser("bench/delivery.py", __doc__, timeout=3600)
    parser.add_argument("--scenario", choices=["plain", "failures", "both"], default="both")
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--fail-fraction", type=float, default=0.2, help="first attempts answered 500 (failures)"
    )
    parser.add_argument(
        "--breaker-failures",
        type=int,
        default=1_000_000,
        help="breaker_failures setting in the failures scenario (default: the breaker is effectively off, because "
        "taskcenter's default of 5 consecutive failures trips under 20%% random failures and pauses the host "
        "for 30 s; 0 keeps taskcenter's default)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        type=variant,
        default=[],
        help=f"run this variant in every round (repeatable; default {SHIPPED}): {SHIPPED}, or what-if experiments "
        "joined with '+': " + "; ".join(f"{k} = {v}" for k, v in EXPERIMENTS.items()),
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds over every backend and scenario")
    parser.add_argument("--profile", action="store_true", help="one more run per backend under py-spy")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_script(main(parse()))
