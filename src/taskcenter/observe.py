"""What a probe and a scraper see of a process: the health report ``/health`` answers with (API and worker
alike), and the small HTTP endpoint through which a ``taskcenter worker`` serves it and its ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Literal

import orjson
from aiohttp import web

from taskcenter.errors import ConfigError, StorageError
from taskcenter.metrics import CONTENT_TYPE_LATEST, Metrics
from taskcenter.storage.database import Database

log = logging.getLogger("taskcenter.observe")

DispatcherState = Literal["running", "stopping", "off"]
HEALTH_TIMEOUT_S = 5.0
"""A database that has not answered ``SELECT 1`` within this long counts as unreachable."""


async def health(
    db: Database, dispatcher: DispatcherState, *, timeout_s: float = HEALTH_TIMEOUT_S
) -> tuple[int, dict[str, str]]:
    """The ``/health`` answer: ``(200, {"status": "ok", "database": "ok", "dispatcher": …})``, or 503 with
    ``status: unavailable`` when the database does not answer or the dispatcher is stopping."""
    database = "ok"
    try:
        async with asyncio.timeout(timeout_s):
            await db.ping()
    # A refused connection arrives from the driver as OSError, and so does the timeout (TimeoutError).
    except (StorageError, OSError):
        database = "unreachable"
    ok = database == "ok" and dispatcher != "stopping"
    body = {"status": "ok" if ok else "unavailable", "database": database, "dispatcher": dispatcher}
    return (200 if ok else 503), body


class WorkerEndpoint:
    """``GET /metrics`` and ``GET /health`` of a worker process, on aiohttp's server in the worker's own event
    loop: nothing runs unless scraped, and the port closes with the worker. Any other path is a plain 404.

    A worker's ``/metrics`` is its registry as it stands; the queue gauge (``taskcenter_tasks``, a count over the
    whole table) is left to ``serve``, whose scrape reads it, so that adding workers adds no such query.
    """

    def __init__(
        self,
        db: Database,
        metrics: Metrics,
        dispatcher: Callable[[], DispatcherState],
        *,
        health_timeout_s: float = HEALTH_TIMEOUT_S,
    ) -> None:
        self._db = db
        self._health_timeout_s = health_timeout_s
        self._metrics = metrics
        self._dispatcher = dispatcher
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/health", self._health)
        # No access log (a scrape every few seconds is noise); a second to finish a scrape on shutdown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        self.url = ""

    async def start(
        self, host: str, port: int, *, setting: str = "TASKCENTER_WORKER_METRICS_PORT / --metrics-port"
    ) -> None:
        """Listen on ``host:port``; a port that cannot be had is a :class:`ConfigError` saying why, in one line
        (naming ``setting``, where the port came from)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            # asyncio words EADDRINUSE as "error while attempting to bind on address (…): address already in use".
            reason = (
                os.strerror(exc.errno) if exc.errno is not None and exc.errno in errno.errorcode else str(exc)
            )
            raise ConfigError(
                f"worker metrics endpoint cannot listen on {host}:{port}: {reason} ({setting})"
            ) from exc
        bound_host, bound_port = self._runner.addresses[0][:2]  # the port that port 0 picked, for tests
        self.url = (
            f"http://{bound_host}:{bound_port}"
            if ":" not in bound_host
            else f"http://[{bound_host}]:{bound_port}"
        )

    async def close(self) -> None:
        """Stop listening and release the port."""
        await self._runner.cleanup()

    async def _metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        status, body = await health(self._db, self._dispatcher(), timeout_s=self._health_timeout_s)
        # orjson, as the API's /health: the same bytes from either kind of process.
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@contextlib.asynccontextmanager
async def worker_endpoint(
    db: Database,
    metrics: Metrics,
    dispatcher: Callable[[], DispatcherState],
    host: str,
    port: int,
    *,
    setting: str = "TASKCENTER_WORKER_METRICS_PORT / --metrics-port",
) -> AsyncIterator[WorkerEndpoint | None]:
    """Serve a worker's ``/metrics`` and ``/health`` on ``host:port`` for as long as the block runs (``None``:
    port 0, nothing served). Enter it before the dispatcher claims anything: a port that cannot be had is a
    :class:`ConfigError` before any task is held. Used by ``taskcenter worker`` and the library's worker alike.
    """
    if not port:
        yield None
        return
    endpoint = WorkerEndpoint(db, metrics, dispatcher)
    await endpoint.start(host, port, setting=setting)
    try:
        yield endpoint
    finally:
        # Served until the dispatcher has drained (/health answers 503 "stopping" meanwhile), then released.
        await endpoint.close()
