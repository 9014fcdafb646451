"""Property-based API testing: schemathesis generates requests (valid and invalid) for every operation of the
live OpenAPI document and checks that none gets a server error or a response that breaks the document.

SQLite only (the point is the API's handling of input, not the backend); well over 1,000 cases in all.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from taskcenter.api import create_app
from taskcenter.runtime import Runtime
from tests.conftest import make_settings
from tests.test_api_support import OPERATOR, OPERATOR_KEY, serving

EXAMPLES_PER_OPERATION = 60
MIN_CASES = 1000
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]
#: (method, path) pairs that need an operator key; every other operation gets the business key.
OPERATOR_OPERATIONS = {
    ("POST", "/api/v1/businesses"),
    ("GET", "/api/v1/businesses"),
    ("PUT", "/api/v1/businesses/{code}"),
    ("DELETE", "/api/v1/businesses/{code}"),
    ("GET", "/api/v1/stats"),
    ("GET", "/api/v1/audit"),
    ("GET", "/api/v1/hosts"),
    ("GET", "/api/v1/hosts/{host}"),
    ("PUT", "/api/v1/hosts/{host}"),
    ("POST", "/api/v1/hosts/{host}/pause"),
    ("POST", "/api/v1/hosts/{host}/resume"),
}


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32's lazy loader reads and renames Node._nodeid, which pytest 9.2 no longer has.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.fixture(scope="module")
def fuzz_db(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A SQLite database with one business, a few tasks in several states, and the keys to reach them."""
    path = tmp_path_factory.mktemp("fuzz") / "taskcenter.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite:///{path}"

    async def seed() -> dict[str, Any]:
        async with serving(url) as api:
            key = await api.business_key("fuzz")
            for n in range(3):
                task = await api.create(key, f"seed-{n}")
                if n:
                    await api.client.delete(f"/tasks/{task['id']}", headers=key)
            return {"url": url, "business": key, "cases": 0, "successes": 0}

    yield asyncio.run(seed())


@pytest.fixture
def api_schema(fuzz_db: dict[str, Any]) -> Any:
    """The live OpenAPI document of an app that owns its runtime (schemathesis runs it on its own loop)."""
    runtime = Runtime(make_settings(fuzz_db["url"], operator_key=OPERATOR_KEY))
    app = create_app(runtime, manage_runtime=True)
    return schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.timeout(240)  # one test runs every operation's cases (about 40 s when the machine is idle)
@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_error_and_no_response_off_the_schema(
    case: schemathesis.Case, fuzz_db: dict[str, Any]
) -> None:
    operator = (case.method.upper(), case.path) in OPERATOR_OPERATIONS
    # Valid credentials always: missing and wrong ones are covered by test_api_errors, and they would stop
    # every generated case at the 401 before it reached the code under test.
    response = case.call_and_validate(headers=OPERATOR if operator else fuzz_db["business"], checks=CHECKS)
    fuzz_db["cases"] += 1
    if 200 <= response.status_code < 300:
        fuzz_db["successes"] += 1


def test_at_least_1000_cases_ran_and_many_got_past_validation(fuzz_db: dict[str, Any]) -> None:
    """Runs after the generated tests (file order): the suite above really exercised the API."""
    assert fuzz_db["cases"] >= MIN_CASES, fuzz_db["cases"]
    assert fuzz_db["successes"] >= fuzz_db["cases"] // 10, fuzz_db


async def test_the_document_examples_are_accepted(db_url: str) -> None:
    """The create and batch examples in the OpenAPI document are themselves valid requests."""
    async with serving(db_url) as api:
        spec = (await api.client.get("/openapi.json")).json()
        create = spec["components"]["schemas"]["TaskCreate"]["examples"][0]
        path = spec["paths"]["/api/v1/tasks/batch"]["post"]
        batch = path["requestBody"]["content"]["application/json"]["example"]
        key = await api.business_key("shop")
        assert (await api.client.post("/tasks", json=create, headers=key)).status_code == 201
        assert (await api.client.post("/tasks/batch", json=batch, headers=key)).json()["created"] == 1
