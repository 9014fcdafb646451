"""Host policies through the REST API and ``taskcenter host``: read, change, pause, resume; validation and access;
the live state a real dispatcher leaves behind (an opened breaker, a Retry-After pause, tasks held by a pause)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from typer.testing import CliRunner, Result

from taskcenter.cli import app
from taskcenter.errors import ValidationError
from taskcenter.hosts import decode_cursor, encode_cursor, parse_host
from tests.receiver import Receiver, Reply
from tests.test_api_support import OPERATOR, PROBLEM, Api, bearer, serving
from tests.test_delivery import running

HOST = "api.example.com:443"
DESIGN_POLICY = {
    "rate_per_second": 10,
    "burst": 10,
    "max_in_flight": 20,
    "breaker_failures": 5,
    "breaker_cooldown": 30,
}
ONE_ATTEMPT = {"strategy": "intervals", "intervals": []}


@pytest_asyncio.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    async with serving(db_url) as client:
        yield client


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still {value!r} after {timeout}s")
        await asyncio.sleep(0.05)


def at(text: str | None) -> datetime:
    assert text is not None
    return datetime.fromisoformat(text)


async def get_host(api: Api, host: str = HOST) -> dict[str, Any]:
    response = await api.client.get(f"/hosts/{host}", headers=OPERATOR)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def put_host(api: Api, body: dict[str, Any], host: str = HOST) -> dict[str, Any]:
    response = await api.client.put(f"/hosts/{host}", json=body, headers=OPERATOR)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def shop(api: Api) -> dict[str, str]:
    """A business whose own rate limit never gets in the way of these tests."""
    return await api.business_key("shop", rate_limit_per_minute=600_000)


# -- reading and changing ---------------------------------------------------------------------------------


async def test_a_host_nobody_configured_has_the_defaults_and_a_closed_breaker(api: Api) -> None:
    body = await get_host(api)
    assert body["host"] == HOST and body["explicit"] == [] and body["updated_at"] is None
    assert body["policy"] == {"rate_per_second": None, "burst": None, "max_in_flight": None, "breaker_failures": 5,
                              "breaker_ratio": None, "breaker_window": 20, "breaker_cooldown": 30.0}  # fmt: skip
    assert body["state"] == {"breaker": "closed", "failures": 0, "open_until": None, "probe_until": None,
                             "paused": False, "paused_until": None, "operator_paused_until": None,
                             "retry_after_until": None, "tokens": None}  # fmt: skip
    assert body["in_flight"] == 0


async def test_the_defaults_come_from_the_settings(db_url: str) -> None:
    async with serving(db_url, host_rate_per_second=50, host_max_in_flight=7, breaker_failures=3) as api:
        body = await get_host(api)
    assert body["policy"]["rate_per_second"] == 50 and body["policy"]["max_in_flight"] == 7
    assert body["policy"]["breaker_failures"] == 3 and body["state"]["tokens"] == 50


async def test_put_sets_the_given_fields_and_the_rest_follow_the_defaults(api: Api) -> None:
    body = await put_host(api, DESIGN_POLICY)
    assert body["policy"] == {**DESIGN_POLICY, "breaker_ratio": None, "breaker_window": 20}
    assert sorted(body["explicit"]) == sorted(DESIGN_POLICY)
    assert body["state"]["tokens"] == 10 and body["updated_at"] is not None
    assert await get_host(api) == body


async def test_a_second_put_changes_only_its_fields_and_null_resets_one(api: Api) -> None:
    await put_host(api, DESIGN_POLICY)
    body = await put_host(api, {"burst": 3, "max_in_flight": None, "breaker_ratio": 0.5})
    assert body["policy"]["burst"] == 3 and body["policy"]["rate_per_second"] == 10
    assert body["policy"]["max_in_flight"] is None and body["policy"]["breaker_ratio"] == 0.5
    assert "max_in_flight" not in body["explicit"] and "breaker_ratio" in body["explicit"]


async def test_a_change_reaches_this_process_dispatcher_policies_at_once(api: Api) -> None:
    await api.runtime.policies.load()
    await put_host(api, {"rate_per_second": 4, "breaker_failures": 2})
    limits = api.runtime.policies.host_limits(HOST)
    assert limits.rate_per_second == 4 and limits.breaker_failures == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"burst": 0}, "burst"),
        ({"rate_per_second": 0}, "rate_per_second"),
        ({"rate_per_second": "fast"}, "rate_per_second"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_in_flight": 2.5}, "max_in_flight"),
        ({"breaker_failures": -1}, "breaker_failures"),
        ({"breaker_ratio": 0}, "breaker_ratio"),
        ({"breaker_ratio": 1.5}, "breaker_ratio"),
        ({"breaker_window": 101}, "breaker_window"),
        ({"breaker_cooldown": 0}, "breaker_cooldown"),
        ({"breaker_cooldown": True}, "breaker_cooldown"),
        ({"colour": "red"}, "colour"),
        ({"paused_until": "2030-01-01T00:00:00"}, "paused_until"),
        ({"paused_until": "2001-01-01T00:00:00Z"}, "paused_until"),
        ({"paused_until": "2030-01-01T00:00:00Z", "pause_seconds": 60}, "paused_until"),
        ({"pause_seconds": 0}, "pause_seconds"),
        ({}, "body"),
    ],
)
async def test_bad_policy_fields_are_422_naming_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    response = await api.client.put(f"/hosts/{HOST}", json=body, headers=OPERATOR)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM and response.json()["field"] == field
    assert (await get_host(api))["explicit"] == []


@pytest.mark.parametrize(
    "host",
    ["API.example.com:443", "api.example.com", "api.example.com:0", "api.example.com:65536", "api.example.com:0443",
     "api.example.com:https", "::1:80", "[::g]:80", "[::1]", "-a.example.com:80", "processor:resize", "a b:80"],
)  # fmt: skip
async def test_a_host_that_is_not_host_colon_port_is_422_naming_host(api: Api, host: str) -> None:
    for response in (
        await api.client.get(f"/hosts/{host}", headers=OPERATOR),
        await api.client.put(f"/hosts/{host}", json={"burst": 2}, headers=OPERATOR),
        await api.client.post(f"/hosts/{host}/pause", json={"seconds": 5}, headers=OPERATOR),
        await api.client.post(f"/hosts/{host}/resume", headers=OPERATOR),
    ):
        assert response.status_code == 422, (host, response.text)
        assert response.json()["field"] == "host"


@pytest.mark.parametrize(
    "host", ["[::1]:8080", "127.0.0.1:80", "a_b.example.com:99", "bücher.de:443", "x:65535"]
)
def test_host_keys_tasks_carry_are_accepted_as_they_are(host: str) -> None:
    assert parse_host(host) == host


def test_a_cursor_this_api_did_not_hand_out_is_refused() -> None:
    assert decode_cursor(encode_cursor(HOST)) == HOST
    with pytest.raises(ValidationError) as caught:
        decode_cursor("bm9wZQ")
    assert caught.value.field == "cursor"


async def test_host_endpoints_need_an_operator(api: Api) -> None:
    business = await shop(api)
    calls = [("GET", "/hosts", None), ("GET", f"/hosts/{HOST}", None), ("PUT", f"/hosts/{HOST}", {"burst": 2}),
             ("POST", f"/hosts/{HOST}/pause", {"seconds": 5}), ("POST", f"/hosts/{HOST}/resume", None)]  # fmt: skip
    for method, path, body in calls:
        anonymous = await api.client.request(method, path, json=body)
        assert anonymous.status_code == 401 and anonymous.json()["type"].endswith("/unauthenticated"), path
        wrong = await api.client.request(method, path, json=body, headers=bearer("tc_not-a-key"))
        assert wrong.status_code == 401, path
        tenant = await api.client.request(method, path, json=body, headers=business)
        assert tenant.status_code == 403 and tenant.json()["type"].endswith("/forbidden"), path
    assert (await get_host(api))["explicit"] == []


async def test_changes_are_audited_with_the_operator_and_the_values(api: Api) -> None:
    await put_host(api, {"burst": 4})
    await api.client.post(f"/hosts/{HOST}/pause", json={"seconds": 60}, headers=OPERATOR)
    await api.client.post(f"/hosts/{HOST}/resume", json={"reset_breaker": True}, headers=OPERATOR)
    entries = (await api.client.get("/audit", params={"target": HOST}, headers=OPERATOR)).json()["entries"]
    assert [e["action"] for e in entries] == ["host.resume", "host.pause", "host.update"]
    assert {e["actor"] for e in entries} == {"operator:env"} and {e["target_type"] for e in entries} == {
        "host"
    }
    assert entries[2]["details"] == {"burst": 4} and entries[1]["details"]["paused_until"].endswith("Z")
    assert entries[0]["details"] == {"reset_breaker": True, "breaker_closed": False, "released": 0}


async def test_the_document_example_is_a_valid_put(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    assert {"/api/v1/hosts", "/api/v1/hosts/{host}", "/api/v1/hosts/{host}/pause",
            "/api/v1/hosts/{host}/resume"} <= set(spec["paths"])  # fmt: skip
    example = spec["components"]["schemas"]["HostPolicyIn"]["examples"][0]
    assert example == DESIGN_POLICY
    assert (await put_host(api, example))["policy"]["max_in_flight"] == 20


# -- listing ----------------------------------------------------------------------------------------------


async def test_list_pages_through_configured_hosts_by_name(api: Api) -> None:
    for name in ("c.example.com:443", "a.example.com:443", "b.example.com:80"):
        await put_host(api, {"burst": 2}, host=name)
    first = (await api.client.get("/hosts", params={"limit": 2}, headers=OPERATOR)).json()
    assert [h["host"] for h in first["hosts"]] == ["a.example.com:443", "b.example.com:80"]
    assert first["defaults"]["breaker_failures"] == 5 and first["next_cursor"]
    rest = (
        await api.client.get("/hosts", params={"limit": 2, "cursor": first["next_cursor"]}, headers=OPERATOR)
    ).json()
    assert [h["host"] for h in rest["hosts"]] == ["c.example.com:443"] and rest["next_cursor"] is None


@pytest.mark.parametrize(("params", "field"), [({"cursor": "nope"}, "cursor"), ({"limit": 0}, "limit"),
                                               ({"breaker": "broken"}, "breaker"),
                                               ({"cursor": "aDE6YQBi"}, "cursor")])  # fmt: skip  # h1:a\x00b
async def test_bad_list_queries_are_422(api: Api, params: dict[str, Any], field: str) -> None:
    response = await api.client.get("/hosts", params=params, headers=OPERATOR)
    assert response.status_code == 422 and response.json()["field"] == field


async def test_list_filters_paused_hosts(api: Api) -> None:
    await put_host(api, {"burst": 2}, host="calm.example.com:443")
    await api.client.post("/hosts/held.example.com:443/pause", json={"seconds": 600}, headers=OPERATOR)
    paused = (await api.client.get("/hosts", params={"paused": "true"}, headers=OPERATOR)).json()["hosts"]
    assert [h["host"] for h in paused] == ["held.example.com:443"] and paused[0]["state"]["paused"] is True
    running_ = (await api.client.get("/hosts", params={"paused": "false"}, headers=OPERATOR)).json()["hosts"]
    assert [h["host"] for h in running_] == ["calm.example.com:443"]


# -- with a real dispatcher -------------------------------------------------------------------------------


async def test_a_breaker_a_dispatcher_opened_is_shown_and_lists_as_open(api: Api, receiver: Receiver) -> None:
    key = await shop(api)
    host = f"127.0.0.1:{receiver.port}"
    await put_host(api, {"breaker_failures": 2, "breaker_cooldown": 60}, host=host)
    await put_host(api, {"burst": 2}, host="quiet.example.com:443")
    receiver.set_default(Reply(status=503))
    tasks = [
        await api.create(key, f"down-{n}", url=receiver.url("/down"), retry=ONE_ATTEMPT) for n in range(2)
    ]
    async with running(api.runtime):
        await receiver.wait_for(2, "/down", timeout=10)

        async def opened() -> dict[str, Any] | None:
            body = await get_host(api, host)
            return body if body["state"]["breaker"] == "open" else None

        body = await eventually(opened)
        for task_id in [t["id"] for t in tasks]:
            await eventually(lambda: _status_is(api, key, task_id, "failed"))  # noqa: B023 (awaited at once)
    state = body["state"]
    assert state["failures"] == 2 and state["paused"] is False
    assert timedelta(seconds=50) < at(state["open_until"]) - datetime.now(UTC) <= timedelta(seconds=60)
    assert body["in_flight"] == 0 and body["policy"]["breaker_failures"] == 2
    listed = (await api.client.get("/hosts", params={"breaker": "open"}, headers=OPERATOR)).json()["hosts"]
    assert [h["host"] for h in listed] == [host]


async def test_resume_with_reset_breaker_closes_it_and_sends_the_held_task(
    api: Api, receiver: Receiver
) -> None:
    key = await shop(api)
    host = f"127.0.0.1:{receiver.port}"
    await put_host(api, {"breaker_failures": 1, "breaker_cooldown": 600}, host=host)
    receiver.script("/down", Reply(status=500))
    async with running(api.runtime):
        await api.create(key, "first", url=receiver.url("/down"), retry=ONE_ATTEMPT)
        await receiver.wait_for(1, "/down", timeout=10)
        await eventually(lambda: _breaker_is(api, host, "open"))
        held = await api.create(key, "held", url=receiver.url("/up"))
        await eventually(lambda: _due_after(api, key, held["id"], timedelta(seconds=500)))
        assert receiver.requests_for("/up") == []
        response = await api.client.post(
            f"/hosts/{host}/resume", json={"reset_breaker": True}, headers=OPERATOR
        )
        assert response.status_code == 200 and response.json()["state"]["breaker"] == "closed"
        assert response.json()["state"]["failures"] == 0 and response.json()["state"]["open_until"] is None
        await receiver.wait_for(1, "/up", timeout=10)
        await eventually(lambda: _status_is(api, key, held["id"], "succeeded"))


async def test_a_paused_host_gets_nothing_until_it_is_resumed(api: Api, receiver: Receiver) -> None:
    """Tasks held by the pause come due again on resume; one scheduled for the pause's end keeps its time."""
    key = await shop(api)
    host = f"127.0.0.1:{receiver.port}"
    end = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    paused = await api.client.post(f"/hosts/{host}/pause", json={"until": end.isoformat()}, headers=OPERATOR)
    assert paused.status_code == 200, paused.text
    assert at(paused.json()["state"]["paused_until"]) == end and paused.json()["state"]["paused"] is True
    scheduled = await api.create(key, "at-the-end", url=receiver.url("/later"), scheduled_at=end.isoformat())
    async with running(api.runtime):
        held = await api.create(key, "now", url=receiver.url("/now"))
        await eventually(lambda: _due_after(api, key, held["id"], timedelta(minutes=59)))
        assert receiver.requests == []
        response = await api.client.post(f"/hosts/{host}/resume", headers=OPERATOR)
        assert response.status_code == 200 and response.json()["state"]["paused"] is False
        await receiver.wait_for(1, "/now", timeout=10)
    later = (await api.client.get(f"/tasks/{scheduled['id']}", headers=key)).json()
    assert later["status"] == "pending" and at(later["next_attempt_at"]) == end
    entry = (await api.client.get("/audit", params={"action": "host.resume"}, headers=OPERATOR)).json()[
        "entries"
    ][0]
    assert entry["details"]["released"] == 1


async def test_a_shorter_pause_brings_held_tasks_to_its_end(api: Api, receiver: Receiver) -> None:
    key = await shop(api)
    host = f"127.0.0.1:{receiver.port}"
    await api.client.post(f"/hosts/{host}/pause", json={"seconds": 3600}, headers=OPERATOR)
    async with running(api.runtime):
        held = await api.create(key, "held", url=receiver.url("/hook"))
        await eventually(lambda: _due_after(api, key, held["id"], timedelta(minutes=59)))
        shorter = await api.client.put(f"/hosts/{host}", json={"pause_seconds": 30}, headers=OPERATOR)
        assert shorter.status_code == 200
        end = at(shorter.json()["state"]["operator_paused_until"])
    task = (await api.client.get(f"/tasks/{held['id']}", headers=key)).json()
    assert abs(at(task["next_attempt_at"]) - end) < timedelta(milliseconds=5)
    assert receiver.requests == []


async def test_a_retry_after_pause_is_shown_and_resume_lifts_it(api: Api, receiver: Receiver) -> None:
    key = await shop(api)
    host = f"127.0.0.1:{receiver.port}"
    receiver.script("/busy", Reply(status=503, headers={"Retry-After": "600"}))
    async with running(api.runtime):
        await api.create(key, "busy", url=receiver.url("/busy"))
        await receiver.wait_for(1, "/busy", timeout=10)
        state = (await eventually(lambda: _retry_after_pause(api, host)))["state"]
    assert state["paused"] is True and state["operator_paused_until"] is None
    assert (
        timedelta(seconds=590) < at(state["retry_after_until"]) - datetime.now(UTC) <= timedelta(seconds=600)
    )
    assert state["paused_until"] == state["retry_after_until"]
    resumed = await api.client.post(f"/hosts/{host}/resume", headers=OPERATOR)
    assert resumed.json()["state"]["paused"] is False and resumed.json()["state"]["retry_after_until"] is None


async def _status_is(api: Api, key: dict[str, str], task_id: str, status: str) -> bool:
    return bool((await api.client.get(f"/tasks/{task_id}", headers=key)).json()["status"] == status)


async def _breaker_is(api: Api, host: str, breaker: str) -> bool:
    return bool((await get_host(api, host))["state"]["breaker"] == breaker)


async def _due_after(api: Api, key: dict[str, str], task_id: str, ahead: timedelta) -> bool:
    task = (await api.client.get(f"/tasks/{task_id}", headers=key)).json()
    return task["status"] == "pending" and at(task["next_attempt_at"]) > datetime.now(UTC) + ahead


async def _retry_after_pause(api: Api, host: str) -> dict[str, Any] | None:
    body = await get_host(api, host)
    return body if body["state"]["retry_after_until"] else None


# -- the CLI ----------------------------------------------------------------------------------------------


class HostCli:
    """``taskcenter host …`` in-process against the test's database."""

    def __init__(self, db_url: str) -> None:
        self.env = {"TASKCENTER_DATABASE_URL": db_url}
        self.runner = CliRunner()

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(app, ["host", *args], env=self.env)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))


@pytest.fixture
def cli(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostCli]:
    monkeypatch.chdir(tmp_path)  # no stray ./taskcenter.toml
    for name in [k for k in os.environ if k.startswith("TASKCENTER_")]:
        monkeypatch.delenv(name)
    yield HostCli(db_url)


def test_cli_set_takes_the_design_options_and_show_reads_them_back(cli: HostCli) -> None:
    cli.ok("set", HOST, "--rate", "10", "--burst", "10", "--max-in-flight", "20", "--breaker-failures", "5",
           "--breaker-cooldown", "30")  # fmt: skip
    shown = cli.json("show", HOST)
    assert shown["policy"] == {**DESIGN_POLICY, "breaker_ratio": None, "breaker_window": 20}
    cli.ok("set", HOST, "--reset", "burst", "--breaker-ratio", "0.5")
    again = cli.json("show", HOST)
    assert "burst" not in again["explicit"] and again["policy"]["breaker_ratio"] == 0.5


def test_cli_show_is_readable(cli: HostCli) -> None:
    cli.ok("set", HOST, "--rate", "2.5", "--max-in-flight", "3")
    out = cli.ok("show", HOST)
    assert HOST in out and "breaker closed" in out and "not paused" in out
    assert "2.5" in out and "unlimited" not in out.split("max_in_flight")[1].splitlines()[0]
    assert "default" in out and "tokens" in out


def test_cli_pause_shows_the_pause_and_resume_lifts_it(cli: HostCli) -> None:
    out = cli.ok("pause", HOST, "--for", "10m")
    assert "paused until" in out and ("(in 9m" in out or "(in 10m" in out)
    listed = cli.json("list", "--paused")["hosts"]
    assert [h["host"] for h in listed] == [HOST]
    until = at(listed[0]["state"]["paused_until"]) - datetime.now(UTC)
    assert timedelta(minutes=9) < until <= timedelta(minutes=10)
    assert "resumed" in cli.ok("resume", HOST, "--reset-breaker")
    assert cli.json("show", HOST)["state"]["paused"] is False
    assert cli.json("list", "--paused")["hosts"] == []


def test_cli_pause_until_a_time_without_a_zone_reads_it_as_utc(cli: HostCli) -> None:
    end = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0, tzinfo=None)
    cli.ok("pause", HOST, "--until", end.isoformat())
    assert at(cli.json("show", HOST)["state"]["operator_paused_until"]) == end.replace(tzinfo=UTC)


def test_cli_pause_with_both_a_length_and_an_end_names_the_options(cli: HostCli) -> None:
    """It said the API's words, ``give until or seconds, not both``, for options called --until and --for."""
    both = cli("pause", HOST, "--for", "10m", "--until", "2030-01-01T00:00:00Z")
    assert both.exit_code == 2 and both.stderr.splitlines() == ["error: give --for or --until, not both"]


def test_cli_list_shows_breaker_and_pause_in_a_table(cli: HostCli) -> None:
    cli.ok("set", "b.example.com:443", "--max-in-flight", "4")
    cli.ok("pause", "a.example.com:443", "--for", "1h")
    out = cli.ok("list")
    assert out.index("a.example.com") < out.index("b.example.com")
    assert "0/4" in out and "closed" in out and ("in 59m" in out or "in 60m" in out)
    assert "defaults:" in out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("set", "API.example.com:443", "--rate", "1"), 1, "host must be host:port"),
        (("set", HOST, "--burst", "0"), 1, "burst must be an integer at least 1"),
        (("set", HOST, "--reset", "colour"), 2, "not a policy field"),
        (("set", HOST), 1, "nothing to change"),
        (("pause", HOST, "--for", "soon"), 2, "not a duration"),
        (("pause", HOST), 2, "give --for (e.g. 10m) or --until (a time)"),  # were the API's words
        (("pause", HOST, "--until", "yesterday"), 2, "not a time"),
        (("show", "api.example.com:" + "9" * 5000), 1, "host must be host:port"),  # past int()'s 4300 digits
    ],
)
def test_cli_errors_are_one_line(cli: HostCli, args: tuple[str, ...], code: int, message: str) -> None:
    result = cli(*args)
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
