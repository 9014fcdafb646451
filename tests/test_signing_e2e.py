"""Standard Webhooks signing end to end: deliveries to a loopback receiver verify with the reference
``standardwebhooks`` package exactly as a receiver would, and with ``taskcenter.verify``; during a secret
rotation both signatures are sent."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from taskcenter.runtime import Runtime
from taskcenter.service import Business
from taskcenter.signing import generate_secret
from taskcenter.storage.schema import businesses
from taskcenter.verify import InvalidSignature, verify
from tests.conftest import make_settings
from tests.receiver import Receiver, RecordedRequest, Reply
from tests.test_delivery import running, wait_status

FAST = 600_000


@contextlib.asynccontextmanager
async def keyed_runtime(db_url: str) -> AsyncIterator[Runtime]:
    """A runtime with TASKCENTER_SECRET_KEY set, so signing secrets are stored encrypted."""
    rt = Runtime(make_settings(db_url, secret_key=Fernet.generate_key().decode()))
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()


async def set_signing(rt: Runtime, biz: Business, *secrets: str) -> None:
    """Give the business its signing secrets (newest first), sealed as the business service stores them."""
    async with rt.db.write() as conn:
        await conn.execute(
            sa.update(businesses)
            .where(businesses.c.id == biz.pk)
            .values(signing_secrets=[rt.box.seal(s) for s in secrets])
        )
    await rt.policies.load()


async def deliver(rt: Runtime, receiver: Receiver, biz: Business, item: dict[str, Any]) -> RecordedRequest:
    """Create one task to the receiver and return the request as it arrived."""
    task = await rt.service.create_task(biz, {"business_id": "k", "url": receiver.url("/hook"), **item})
    async with running(rt):
        [request] = await receiver.wait_for(1, "/hook", timeout=10)
        await wait_status(rt, biz, task.id, "succeeded")
    return request


def headers_of(request: RecordedRequest) -> dict[str, str]:
    return dict(request.headers.items())


@pytest.mark.parametrize(
    "item",
    [
        {"json": {"order": 123, "note": "grüße"}},
        {"form": {"a": "1", "b": "x y"}},
        {"body": "<order id='1'/>", "content_type": "application/xml"},
    ],
    ids=["json", "form", "raw"],
)
async def test_delivery_verifies_with_the_reference_library(
    db_url: str, receiver: Receiver, item: dict[str, Any]
) -> None:
    secret = generate_secret()
    async with keyed_runtime(db_url) as rt:
        biz = await rt.service.ensure_business("shop", rate_limit_per_minute=FAST)
        await set_signing(rt, biz, secret)
        async with rt.db.read() as conn:
            stored = (await conn.execute(sa.select(businesses.c.signing_secrets))).scalar_one()
        assert stored[0].startswith("fernet:") and secret not in stored[0]
        request = await deliver(rt, receiver, biz, item)
    headers = headers_of(request)
    Webhook(secret).verify(request.body, headers, json_parse=False)
    verify(secret, headers, request.body)
    assert headers["webhook-signature"].startswith("v1,") and " " not in headers["webhook-signature"]
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(request.body, headers, json_parse=False)


async def test_reference_library_hands_the_receiver_the_json_it_was_sent(
    runtime: Runtime, receiver: Receiver
) -> None:
    secret = generate_secret()
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=FAST)
    await set_signing(runtime, biz, secret)
    request = await deliver(runtime, receiver, biz, {"json": {"order": 7}})
    assert Webhook(secret).verify(request.body, headers_of(request)) == {"order": 7}


async def test_during_rotation_both_signatures_are_sent_and_each_secret_verifies_alone(
    runtime: Runtime, receiver: Receiver
) -> None:
    new, old = generate_secret(), generate_secret()
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=FAST)
    await set_signing(runtime, biz, new, old)
    request = await deliver(runtime, receiver, biz, {"json": {"order": 1}})
    headers = headers_of(request)
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    for secret in (new, old):
        Webhook(secret).verify(request.body, headers)
        verify(secret, headers, request.body)
    verify([old, new], headers, request.body)
    with pytest.raises(InvalidSignature):
        verify(generate_secret(), headers, request.body)


async def test_a_tampered_body_fails_verification(runtime: Runtime, receiver: Receiver) -> None:
    secret = generate_secret()
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=FAST)
    await set_signing(runtime, biz, secret)
    request = await deliver(runtime, receiver, biz, {"json": {"amount": 10}})
    tampered = request.body.replace(b"10", b"99")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(tampered, headers_of(request))
    with pytest.raises(InvalidSignature):
        verify(secret, headers_of(request), tampered)


async def test_the_signature_is_masked_in_the_attempt_record(runtime: Runtime, receiver: Receiver) -> None:
    secret = generate_secret()
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=FAST)
    await set_signing(runtime, biz, secret)
    request = await deliver(runtime, receiver, biz, {"json": {"order": 1}})
    task = await runtime.service.get_by_business_id(biz, "k")
    [attempt] = await runtime.service.attempts(biz, task.id)
    assert attempt.request is not None
    recorded = attempt.request["headers"]
    assert recorded["webhook-signature"] == "***"
    assert recorded["webhook-id"] == request.headers["webhook-id"]


async def test_business_without_a_secret_sends_no_signature(runtime: Runtime, receiver: Receiver) -> None:
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=FAST)
    request = await deliver(runtime, receiver, biz, {"json": {"order": 1}})
    assert not {"webhook-id", "webhook-timestamp", "webhook-signature"} & {k.lower() for k in request.headers}


async def test_webhook_id_stays_the_same_across_retries(runtime: Runtime, receiver: Receiver) -> None:
    secret = generate_secret()
    biz = await runtime.service.ensure_business("shop", rate_limit_per_minute=FAST)
    await set_signing(runtime, biz, secret)
    receiver.script("/hook", Reply(status=503))
    task = await runtime.service.create_task(
        biz,
        {
            "business_id": "r",
            "url": receiver.url("/hook"),
            "retry": {"strategy": "intervals", "intervals": [0.1]},
        },
    )
    async with running(runtime):
        first, second = await receiver.wait_for(2, "/hook", timeout=10)
        await wait_status(runtime, biz, task.id, "succeeded")
    for request in (first, second):
        Webhook(secret).verify(request.body, headers_of(request), json_parse=False)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
