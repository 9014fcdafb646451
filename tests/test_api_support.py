"""Shared helpers for the REST API tests (no tests here): the real app over a real database, in process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from taskcenter.api import create_app
from taskcenter.runtime import Runtime
from tests.conftest import make_settings

OPERATOR_KEY = "operator-test-key-0123456789"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
PROBLEM = "application/problem+json"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def task_body(business_id: str, **extra: Any) -> dict[str, Any]:
    """A valid create request (the URL is never contacted unless a dispatcher runs)."""
    return {
        "business_id": business_id,
        "url": "https://api.example.com/hook",
        "json": {"id": business_id},
        **extra,
    }


@dataclass
class Api:
    """An in-process client of the real application, with helpers to register businesses."""

    client: httpx.AsyncClient
    runtime: Runtime
    app: FastAPI

    async def register(self, code: str, **settings: Any) -> dict[str, Any]:
        """Register ``code`` as the operator; returns the 201 body (api_key, signing_secret, jwt_secret…)."""
        response = await self.client.post("/businesses", json={"code": code, **settings}, headers=OPERATOR)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def business_key(self, code: str, **settings: Any) -> dict[str, str]:
        """Register ``code`` and return the Authorization header of its first key."""
        return bearer((await self.register(code, **settings))["api_key"])

    async def create(self, headers: dict[str, str], business_id: str, **extra: Any) -> dict[str, Any]:
        response = await self.client.post("/tasks", json=task_body(business_id, **extra), headers=headers)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body


async def open_api(db_url: str, **overrides: Any) -> tuple[Api, Runtime]:
    """A started runtime and a client of the app over it; the caller closes both (see :func:`serving`)."""
    runtime = Runtime(make_settings(db_url, operator_key=OPERATOR_KEY, **overrides))
    await runtime.start()
    app = create_app(runtime)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver/api/v1")
    return Api(client, runtime, app), runtime


@contextlib.asynccontextmanager
async def serving(db_url: str, **overrides: Any) -> AsyncIterator[Api]:
    """The application over ``db_url`` with an operator key configured; each test module's ``api`` fixture."""
    api, runtime = await open_api(db_url, **overrides)
    try:
        yield api
    finally:
        await api.client.aclose()
        await runtime.close()
