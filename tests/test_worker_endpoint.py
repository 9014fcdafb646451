"""``taskcenter worker --metrics-port``: a real worker process's ``/metrics`` and ``/health`` on loopback, how it
stops and what a taken port does; and the endpoint in-process against a database that is not there."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from taskcenter.config import load_settings
from taskcenter.errors import ValidationError
from taskcenter.metrics import Metrics
from taskcenter.observe import DispatcherState, WorkerEndpoint
from taskcenter.runtime import Runtime
from taskcenter.storage.database import Database
from tests.processes import TASKCENTER, WorkerProcess
from tests.receiver import Receiver, Reply
from tests.test_delivery import wait_status

NO_RETRY = {"strategy": "intervals", "intervals": []}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def fetch(session: aiohttp.ClientSession, url: str, method: str = "GET") -> tuple[int, str, str]:
    async with session.request(method, url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page (parsed by prometheus-client's own parser), by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def wait_metrics(session: aiohttp.ClientSession, url: str, want: dict[Any, float]) -> dict[Any, float]:
    """Scrape until the samples in ``want`` have those values (a count moves as the attempt is recorded)."""
    for _ in range(200):
        status, _type, text = await fetch(session, url)
        assert status == 200
        got = samples(text)
        if all(got.get(key) == value for key, value in want.items()):
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"metrics never reached {want}: {[got.get(key) for key in want]}")


# -- a real worker process ----------------------------------------------------------------------------------


async def test_a_worker_process_serves_its_delivery_counters_and_health_then_releases_the_port(
    runtime: Runtime, receiver: Receiver, db_url: str
) -> None:
    receiver.set_default(Reply(status=500), path="/fail")
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    port = free_port()
    worker = WorkerProcess(db_url, args=["--metrics-port", str(port)], poll_interval_s=0.5)
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(worker.wait_ready)
        assert f"/metrics and /health on {base}" in worker.output()
        async with aiohttp.ClientSession() as session:
            status, content_type, body = await fetch(session, base + "/health")
            assert (status, content_type) == (200, "application/json")
            assert json.loads(body) == {"status": "ok", "database": "ok", "dispatcher": "running"}
            ids = [
                (
                    await runtime.service.create_task(
                        biz, {"business_id": f"ok-{i}", "url": receiver.url("/ok")}
                    )
                ).id
                for i in range(5)
            ]
            ids += [
                (
                    await runtime.service.create_task(
                        biz, {"business_id": f"fail-{i}", "url": receiver.url("/fail"), "retry": NO_RETRY}
                    )
                ).id
                for i in range(2)
            ]
            for task_id in ids:
                await wait_status(runtime, biz, task_id, "succeeded", "failed", timeout=30)
            got = await wait_metrics(
                session,
                base + "/metrics",
                {
                    ("taskcenter_attempts_total", (("outcome", "success"),)): 5,
                    ("taskcenter_attempts_total", (("outcome", "server_error"),)): 2,
                    ("taskcenter_tasks_finished_total", (("status", "succeeded"),)): 5,
                    ("taskcenter_tasks_finished_total", (("status", "failed"),)): 2,
                    ("taskcenter_tasks_claimed_total", ()): 7,
                    ("taskcenter_attempt_duration_seconds_count", ()): 7,
                },
            )
            assert got[("taskcenter_in_flight", ())] == 0
            # The queue gauge is serve's to export: a worker's scrape runs no count over the table.
            assert not [key for key in got if key[0] == "taskcenter_tasks"]
            # No prometheus-client creation timestamps beside the counters and the histogram.
            assert not [key for key in got if key[0].endswith("_created")]
            _status, content_type, _text = await fetch(session, base + "/metrics")
            assert content_type.startswith("text/plain")
    finally:
        code = worker.terminate()
    assert code == 0, worker.output()
    assert port_closed(port)
    assert "Traceback" not in worker.output()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_stopping_worker_answers_503_while_it_drains_and_exits_0_with_a_scraper_still_connected(
    runtime: Runtime, receiver: Receiver, db_url: str
) -> None:
    """The port is served until the dispatcher has drained (a probe then sees "stopping"), and an idle keep-alive
    connection of a scraper does not hold the process up."""
    hold = asyncio.Event()
    receiver.script("/slow", Reply(hold=hold))
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    port = free_port()
    # The setting this time, not the option.
    worker = WorkerProcess(db_url, worker_metrics_port=port, poll_interval_s=0.5, shutdown_grace_s=60)
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(worker.wait_ready)
        task = await runtime.service.create_task(biz, {"business_id": "slow", "url": receiver.url("/slow")})
        await receiver.wait_for(1, "/slow", timeout=30)
        async with aiohttp.ClientSession() as session:  # its connection stays open, idle, until the end
            assert (await fetch(session, base + "/health"))[0] == 200
            worker.proc.send_signal(signal.SIGTERM)
            for _ in range(400):
                status, _type, body = await fetch(session, base + "/health")
                if status != 200:
                    break
                await asyncio.sleep(0.05)
            assert status == 503
            assert json.loads(body) == {"status": "unavailable", "database": "ok", "dispatcher": "stopping"}
            assert worker.alive()  # still draining: the attempt in flight is held by the receiver
            hold.set()
            code = await asyncio.to_thread(worker.proc.wait, 30)
    finally:
        hold.set()
        if worker.alive():
            worker.kill()
    assert code == 0, worker.output()
    assert port_closed(port)
    assert await wait_status(runtime, biz, task.id, "succeeded") == "succeeded"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_worker_on_a_port_in_use_says_so_in_one_line_and_claims_nothing(
    runtime: Runtime, receiver: Receiver, db_url: str, tmp_path: Path
) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=600_000)
    task = await runtime.service.create_task(biz, {"business_id": "due", "url": receiver.url("/due")})
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKCENTER_")}
    env.update(
        TASKCENTER_DATABASE_URL=db_url, TASKCENTER_ALLOW_NETWORKS="127.0.0.0/8", TASKCENTER_LOG_FORMAT="json"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = await asyncio.to_thread(
            subprocess.run,
            [TASKCENTER, "worker", "--metrics-port", str(port)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines == [
        f"error: worker metrics endpoint cannot listen on 127.0.0.1:{port}: Address already in use "
        "(TASKCENTER_WORKER_METRICS_PORT / --metrics-port)"
    ], done.stderr
    assert receiver.requests_for("/due") == []
    assert (await runtime.service.get_task(biz, task.id)).status == "pending"


# -- the endpoint in-process ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _endpoint(
    db: Database, state: DispatcherState = "running", **options: Any
) -> AsyncIterator[WorkerEndpoint]:
    endpoint = WorkerEndpoint(db, Metrics(), lambda: state, **options)
    await endpoint.start("127.0.0.1", 0)
    try:
        yield endpoint
    finally:
        await endpoint.close()
        await db.close()


async def test_health_is_503_when_the_database_refuses_connections() -> None:
    """Nothing listens on port 1: the driver's connection is refused, as when the database server is down."""
    db = Database("postgresql://taskcenter@127.0.0.1:1/none")
    async with _endpoint(db) as endpoint, aiohttp.ClientSession() as session:
        status, _type, body = await fetch(session, endpoint.url + "/health")
    assert status == 503
    assert json.loads(body) == {"status": "unavailable", "database": "unreachable", "dispatcher": "running"}


async def test_health_is_503_when_the_database_does_not_answer_in_time() -> None:
    """A server that takes the connection and never says a word (a hung database) is unreachable too."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        db = Database(f"postgresql://taskcenter@127.0.0.1:{silent.getsockname()[1]}/none")
        async with _endpoint(db, health_timeout_s=0.5) as endpoint, aiohttp.ClientSession() as session:
            status, _type, body = await fetch(session, endpoint.url + "/health")
    assert status == 503
    assert json.loads(body) == {"status": "unavailable", "database": "unreachable", "dispatcher": "running"}


async def test_other_paths_are_404_and_other_methods_405_never_500(db_url: str) -> None:
    async with _endpoint(Database(db_url)) as endpoint, aiohttp.ClientSession() as session:
        answers = [
            (await fetch(session, endpoint.url + path, method))[0]
            for method, path in [
                ("GET", "/"),
                ("GET", "/api/v1/tasks"),
                ("GET", "/metrics/x"),
                ("POST", "/metrics"),
                ("DELETE", "/health"),
            ]
        ]
        head = (await fetch(session, endpoint.url + "/metrics", "HEAD"))[0]
    assert answers == [404, 404, 404, 405, 405]
    assert head == 200


# -- the setting ----------------------------------------------------------------------------------------------


def test_the_worker_metrics_port_is_off_by_default_and_read_from_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("TASKCENTER_")]:
        monkeypatch.delenv(name)
    assert load_settings().worker_metrics_port == 0
    config = tmp_path / "taskcenter.toml"
    config.write_text('worker_metrics_port = 9100\nworker_metrics_host = "0.0.0.0"\n')
    settings = load_settings(config)
    assert (settings.worker_metrics_host, settings.worker_metrics_port) == ("0.0.0.0", 9100)
    monkeypatch.setenv("TASKCENTER_WORKER_METRICS_PORT", "65536")
    with pytest.raises(ValidationError) as info:
        load_settings(config)
    assert info.value.field == "worker_metrics_port"
