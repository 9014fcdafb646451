"""Business systems and their credentials: registration, keys stored as hashes, rotation with grace, disable,
JWTs, operator keys, the auth cache, and the ``business``/``operator``/``audit`` CLI commands."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import pytest_asyncio
import sqlalchemy as sa
import typer
from typer.testing import CliRunner, Result

from taskcenter.cli_admin import audit_app, business_app, operator_app
from taskcenter.crypto import SecretBox
from taskcenter.storage.schema import api_keys, businesses
from tests.test_api_support import OPERATOR, Api, bearer, serving, task_body


@pytest_asyncio.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    async with serving(db_url) as client:
        yield client


async def _key_rows(api: Api) -> list[dict[str, Any]]:
    async with api.runtime.db.read() as conn:
        return [dict(r) for r in (await conn.execute(sa.select(api_keys).order_by(api_keys.c.id))).mappings()]


async def test_registration_returns_the_first_key_and_secrets_once(api: Api) -> None:
    reg = await api.register("payments", name="Payments", rate_limit_per_minute=600, max_active_tasks=50)
    assert reg["api_key"].startswith("tc_") and len(reg["api_key"]) > 40
    assert reg["signing_secret"].startswith("whsec_") and reg["jwt_secret"]
    assert reg["business"]["code"] == "payments" and reg["business"]["max_active_tasks"] == 50
    shown = (await api.client.get("/businesses/payments", headers=OPERATOR)).json()
    for secret in (reg["api_key"], reg["signing_secret"], reg["jwt_secret"]):
        assert secret not in str(shown)


async def test_the_registration_lists_the_first_key_as_reading_the_business_does(api: Api) -> None:
    """Before, the registration's business showed ``"keys": []`` beside the key it had just issued."""
    reg = await api.register("payments")
    [key] = reg["business"]["keys"]
    assert key["id"] == reg["key_id"] and key["prefix"] == reg["api_key"][:12] and key["name"] == "initial"
    shown = (await api.client.get("/businesses/payments", headers=OPERATOR)).json()
    assert shown["keys"] == [key]


async def test_keys_are_stored_only_as_a_sha256_hash(api: Api) -> None:
    reg = await api.register("payments")
    [row] = await _key_rows(api)
    assert row["key_hash"] == hashlib.sha256(reg["api_key"].encode()).hexdigest()
    assert row["prefix"] == reg["api_key"][:12]
    assert reg["api_key"] not in str(row)


async def test_signing_and_jwt_secrets_are_encrypted_at_rest_when_a_secret_key_is_set(db_url: str) -> None:
    async with serving(db_url, secret_key=SecretBox.generate_key()) as api:
        reg = await api.register("payments")
        async with api.runtime.db.read() as conn:
            row = dict((await conn.execute(sa.select(businesses))).mappings().one())
        assert row["signing_secrets"][0].startswith("fernet:") and row["jwt_secret"].startswith("fernet:")
        assert reg["signing_secret"] not in str(row) and reg["jwt_secret"] not in str(row)
        jwt_headers = _jwt(reg["jwt_secret"], sub="payments")
        assert (await api.client.get("/tasks", headers=jwt_headers)).status_code == 200


async def test_a_business_code_registers_once(api: Api) -> None:
    await api.register("payments")
    again = await api.client.post("/businesses", json={"code": "payments"}, headers=OPERATOR)
    assert again.status_code == 409 and again.json()["field"] == "code"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"code": "Bad Code"}, "code"),
        ({"code": "ok", "max_active_tasks": 0}, "max_active_tasks"),
        ({"code": "ok", "allow_networks": ["not-a-cidr"]}, "allow_networks[0]"),
        ({"code": "ok", "retry": {"strategy": "fixed", "max_attempts": 12}}, "retry.max_attempts"),
        ({"code": "ok", "api_key": "mine"}, "api_key"),
    ],
)
async def test_invalid_registrations_are_422_naming_the_field(
    api: Api, body: dict[str, Any], field: str
) -> None:
    response = await api.client.post("/businesses", json=body, headers=OPERATOR)
    assert response.status_code == 422 and response.json()["field"] == field


async def test_registration_needs_an_operator(api: Api) -> None:
    key = await api.business_key("shop")
    assert (await api.client.post("/businesses", json={"code": "x"})).status_code == 401
    assert (await api.client.post("/businesses", json={"code": "x"}, headers=key)).status_code == 403


async def test_a_business_reads_itself_with_its_keys_listed_by_prefix_only(api: Api) -> None:
    reg = await api.register("shop")
    response = await api.client.get("/businesses/shop", headers=bearer(reg["api_key"]))
    assert response.status_code == 200
    [key] = response.json()["keys"]
    assert key["prefix"] == reg["api_key"][:12] and "key_hash" not in key
    listed = (await api.client.get("/businesses", headers=OPERATOR)).json()["businesses"]
    assert [b["code"] for b in listed] == ["shop"]


async def test_operators_change_limits_and_the_change_applies_at_once(api: Api) -> None:
    key = await api.business_key("shop")
    changed = await api.client.put(
        "/businesses/shop", json={"max_active_tasks": 1, "name": "Shop"}, headers=OPERATOR
    )
    assert changed.status_code == 200 and changed.json()["max_active_tasks"] == 1
    await api.create(key, "a")
    assert (await api.client.post("/tasks", json=task_body("b"), headers=key)).status_code == 429


async def test_a_disabled_business_is_locked_out_and_can_be_enabled_again(api: Api) -> None:
    key = await api.business_key("shop")
    await api.create(key, "a")
    assert (await api.client.delete("/businesses/shop", headers=OPERATOR)).json()["status"] == "disabled"
    locked = await api.client.get("/tasks", headers=key)
    assert locked.status_code == 403 and "disabled" in locked.json()["detail"]
    await api.client.put("/businesses/shop", json={"status": "active"}, headers=OPERATOR)
    assert (await api.client.get("/tasks", headers=key)).status_code == 200


async def test_rotation_issues_a_new_key_and_keeps_the_old_one_for_the_grace_period(api: Api) -> None:
    reg = await api.register("shop")
    old = bearer(reg["api_key"])
    rotated = await api.client.put("/businesses/shop/credentials", json={"grace_hours": 1}, headers=old)
    assert rotated.status_code == 200
    new = bearer(rotated.json()["api_key"])
    assert rotated.json()["api_key"] != reg["api_key"] and rotated.json()["signing_secret"] is None
    assert (await api.client.get("/tasks", headers=new)).status_code == 200
    assert (await api.client.get("/tasks", headers=old)).status_code == 200
    rows = await _key_rows(api)
    assert rows[0]["expires_at"] is not None and rows[1]["expires_at"] is None


async def test_with_no_grace_the_old_key_stops_working_at_once(api: Api) -> None:
    reg = await api.register("shop")
    old = bearer(reg["api_key"])
    assert (await api.client.get("/tasks", headers=old)).status_code == 200  # now cached
    rotated = await api.client.put("/businesses/shop/credentials", json={"grace_hours": 0}, headers=OPERATOR)
    assert (await api.client.get("/tasks", headers=old)).status_code == 401
    assert (await api.client.get("/tasks", headers=bearer(rotated.json()["api_key"]))).status_code == 200


async def test_rotating_the_signing_secret_keeps_the_previous_one_signing_beside_it(api: Api) -> None:
    reg = await api.register("shop")
    body = {"signing_secret": True, "jwt_secret": True}
    rotated = (await api.client.put("/businesses/shop/credentials", json=body, headers=OPERATOR)).json()
    assert (
        rotated["signing_secret"].startswith("whsec_") and rotated["signing_secret"] != reg["signing_secret"]
    )
    assert rotated["jwt_secret"] and rotated["jwt_secret"] != reg["jwt_secret"]
    assert (await api.client.get("/businesses/shop", headers=OPERATOR)).json()["signing_secrets"] == 2


def _jwt(secret: str, **claims: Any) -> dict[str, str]:
    payload = {"sub": "shop", "exp": int(time.time()) + 60, **claims}
    return bearer(jwt.encode({k: v for k, v in payload.items() if v is not None}, secret, algorithm="HS256"))


async def test_a_jwt_signed_with_the_business_secret_works_like_a_key(api: Api) -> None:
    reg = await api.register("shop")
    response = await api.client.post("/tasks", json=task_body("a"), headers=_jwt(reg["jwt_secret"]))
    assert response.status_code == 201 and response.json()["business_code"] == "shop"


@pytest.mark.parametrize(
    "claims",
    [{"exp": 1}, {"exp": None}, {"sub": None}, {"sub": "other"}, {"wrong_secret": True}, {"alg": "none"}],
)
async def test_bad_jwts_are_401(api: Api, claims: dict[str, Any]) -> None:
    claims = dict(claims)  # the parametrised dict is shared by both backends' runs
    reg = await api.register("shop")
    await api.register("other")
    if claims.pop("wrong_secret", False):
        headers = _jwt("x" * 43)
    elif claims.pop("alg", None) == "none":
        token = jwt.encode({"sub": "shop", "exp": int(time.time()) + 60}, key=None, algorithm="none")
        headers = bearer(token)
    else:
        headers = _jwt(reg["jwt_secret"], **claims)
    response = await api.client.get("/tasks", headers=headers)
    assert response.status_code == 401, response.text


async def test_an_operator_key_made_by_the_service_works_on_operator_endpoints(api: Api) -> None:
    issued = await api.app.state.ctx.businesses.create_operator_key(actor="cli:test", name="ops")
    assert issued.key.startswith("tc_")
    assert (await api.client.get("/businesses", headers=bearer(issued.key))).status_code == 200
    assert (await api.client.get("/tasks", headers=bearer(issued.key))).status_code == 403


async def test_last_use_is_recorded_but_not_on_every_request(api: Api) -> None:
    key = await api.business_key("shop")
    await api.client.get("/tasks", headers=key)
    [first] = await _key_rows(api)
    await api.client.get("/tasks", headers=key)
    [second] = await _key_rows(api)
    assert first["last_used_at"] is not None and second["last_used_at"] == first["last_used_at"]


async def test_another_process_sees_a_disable_within_the_auth_cache_ttl(
    api: Api, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("taskcenter.credentials.AUTH_CACHE_TTL_S", 1.0)
    key = await api.business_key("shop")
    assert (await api.client.get("/tasks", headers=key)).status_code == 200
    async with serving(db_url) as other:  # a second process on the same database
        assert (await other.client.delete("/businesses/shop", headers=OPERATOR)).status_code == 200
        assert (await other.client.get("/tasks", headers=key)).status_code == 403
    await asyncio.sleep(1.1)
    assert (await api.client.get("/tasks", headers=key)).status_code == 403


async def test_audit_records_key_and_business_changes_with_the_actor_never_the_key(api: Api) -> None:
    reg = await api.register("shop")
    key = bearer(reg["api_key"])
    await api.client.put("/businesses/shop", json={"rate_limit_per_minute": 10}, headers=OPERATOR)
    rotated = await api.client.put("/businesses/shop/credentials", json={}, headers=key)
    entries = (await api.client.get("/audit", headers=OPERATOR)).json()["entries"]
    assert [e["action"] for e in entries] == [
        "key.rotate",
        "business.update",
        "key.create",
        "business.create",
    ]
    assert entries[0]["actor"] == f"key:{reg['key_id']}" and entries[1]["actor"] == "operator:env"
    assert entries[1]["details"] == {"rate_limit_per_minute": 10} and entries[0]["business_code"] == "shop"
    text = str(entries)
    assert reg["api_key"] not in text and rotated.json()["api_key"] not in text


# -- CLI -------------------------------------------------------------------------------------------------


class Cli:
    """The admin sub-commands mounted as the lead's ``taskcenter`` app mounts them, on one database."""

    def __init__(self, db_url: str) -> None:
        self.app = typer.Typer()
        for sub, name in ((business_app, "business"), (operator_app, "operator"), (audit_app, "audit")):
            self.app.add_typer(sub, name=name)
        self.env = {"TASKCENTER_DATABASE_URL": db_url, "TASKCENTER_OPERATOR_KEY": ""}
        self.runner = CliRunner()

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(self.app, list(args), env=self.env)

    def ok(self, *args: str) -> str:
        result = self(*args)
        assert result.exit_code == 0, result.output
        return result.stdout


def test_cli_creates_lists_shows_rotates_and_disables_a_business(db_url: str) -> None:
    cli = Cli(db_url)
    created = cli.ok("business", "create", "payments", "--name", "Payments", "--max-active-tasks", "500")
    assert "tc_" in created and "whsec_" in created and "not shown again" in created
    assert "payments" in cli.ok("business", "list")
    assert "500" in cli.ok("business", "show", "payments")
    rotated = cli.ok("business", "rotate-key", "payments", "--grace-hours", "2")
    assert "tc_" in rotated and "stop working at" in rotated
    cli.ok("business", "disable", "payments")
    assert '"status": "disabled"' in cli.ok("business", "show", "payments", "--json")


@pytest.mark.parametrize("name", ["n" * 201, "ops\x1b[2J"])
def test_cli_operator_key_name_too_long_or_with_controls_is_refused(db_url: str, name: str) -> None:
    # PostgreSQL's varchar(200) refused a long one as "database error: value too long"; SQLite stored it.
    result = Cli(db_url)("operator", "create-key", "--name", name)
    assert result.exit_code == 1, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: name must be") and "database" not in line, line


def test_cli_business_create_retry_nested_too_deep_is_one_line(db_url: str) -> None:
    result = Cli(db_url)("business", "create", "payments", "--retry", "[" * 100_000)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == ["error: --retry is not JSON"]


def test_cli_operator_key_is_accepted_by_the_api(db_url: str) -> None:
    out = Cli(db_url).ok("operator", "create-key", "--name", "ops")
    key = out.split()[-1]

    async def check() -> int:
        async with serving(db_url) as api:
            return (await api.client.get("/businesses", headers=bearer(key))).status_code

    assert key.startswith("tc_") and asyncio.run(check()) == 200


def test_cli_actions_are_audited_as_the_cli_user(db_url: str) -> None:
    cli = Cli(db_url)
    cli.ok("business", "create", "payments")
    cli.ok("business", "disable", "payments")
    listed = cli.ok("audit", "list", "--business", "payments", "--json")
    assert '"action": "business.disable"' in listed and '"actor": "cli:' in listed
    only_creates = cli.ok("audit", "list", "--action", "business.create", "--json")
    assert '"action": "business.create"' in only_creates and "business.disable" not in only_creates
    assert "business.create" in cli.ok("audit", "list")


@pytest.mark.parametrize("since", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
def test_cli_audit_since_without_a_utc_form_is_a_usage_error(db_url: str, since: str) -> None:
    # Such a time has no UTC form: it reached the query and came back as "database error: ... out of range".
    result = Cli(db_url)("audit", "list", "--since", since)
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "--since" in line and "database" not in line, line


def test_cli_errors_are_one_line_with_exit_code_1(db_url: str) -> None:
    result = Cli(db_url)("business", "show", "nobody")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["error: no business system 'nobody'"]
