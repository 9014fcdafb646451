"""Receiver-side check of taskcenter's Standard Webhooks signatures, for the users' own receivers.

Standard library only (besides taskcenter's exception root), so a receiver needs nothing else installed.

Flask::

    from flask import Flask, request, abort
    from taskcenter.verify import InvalidSignature, verify

    app = Flask(__name__)
    SECRET = "whsec_…"  # the business's signing secret

    @app.post("/hook")
    def hook():
        try:
            verify(SECRET, request.headers, request.get_data())
        except InvalidSignature:
            abort(401)
        return "", 204

FastAPI (read the raw body: a re-serialised JSON body would not match the signature)::

    from fastapi import FastAPI, HTTPException, Request
    from taskcenter.verify import InvalidSignature, verify

    app = FastAPI()

    @app.post("/hook", status_code=204)
    async def hook(request: Request) -> None:
        try:
            verify(SECRET, request.headers, await request.body())
        except InvalidSignature:
            raise HTTPException(401) from None

During a secret rotation pass both secrets: ``verify([NEW, OLD], ...)``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Iterable, Mapping

from taskcenter.errors import ConfigError, TaskCenterError

__all__ = ["InvalidSignature", "verify"]

_PREFIX = "whsec_"


class InvalidSignature(TaskCenterError):
    """The webhook signature is missing, out of date or does not match."""


def _key(secret: str | bytes) -> bytes:
    if isinstance(secret, bytes):
        key = secret
    else:
        encoded = secret.removeprefix(_PREFIX)
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError("the webhook secret is not 'whsec_' followed by base64") from None
    if not key:
        raise ConfigError("the webhook secret is empty")
    return key


def _keys(secret_or_secrets: str | bytes | Iterable[str | bytes]) -> list[bytes]:
    if isinstance(secret_or_secrets, str | bytes):
        return [_key(secret_or_secrets)]
    keys = [_key(s) for s in secret_or_secrets]
    if not keys:
        raise ConfigError("no webhook secret given")
    return keys


def _header(lowered: Mapping[str, str], name: str) -> str:
    value = lowered.get(name)
    if not value:
        raise InvalidSignature(f"missing header {name}")
    return value


def verify(
    secret_or_secrets: str | bytes | Iterable[str | bytes],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> None:
    """Check that a request was signed by taskcenter with one of the given secrets, recently.

    Args:
        secret_or_secrets: The ``whsec_…`` secret (the prefix is optional; raw key bytes are accepted too),
            or several of them during a rotation: any one may match.
        headers: The request headers; names are matched case-insensitively.
        body: The raw request body, exactly as received.
        tolerance_s: How far ``webhook-timestamp`` may be from ``now``, either way, in seconds. Rejecting old
            messages stops replays of captured requests.
        now: The current Unix time in seconds; defaults to the system clock.

    Raises:
        InvalidSignature: a ``webhook-*`` header is missing, the timestamp is malformed or out of tolerance,
            or no ``v1`` signature in ``webhook-signature`` matches any secret.
        ConfigError: a secret is not valid base64 or is empty (the receiver's misconfiguration, not a bad
            request).
    """
    keys = _keys(secret_or_secrets)
    lowered = {name.lower(): value for name, value in headers.items()}
    msg_id = _header(lowered, "webhook-id")
    timestamp = _header(lowered, "webhook-timestamp").strip()
    signatures = _header(lowered, "webhook-signature")

    if not timestamp.isascii() or not timestamp.isdigit():
        raise InvalidSignature("webhook-timestamp is not whole seconds since the epoch")
    current = time.time() if now is None else now
    age = current - int(timestamp)
    if age > tolerance_s:
        raise InvalidSignature("webhook-timestamp is too old")
    if age < -tolerance_s:
        raise InvalidSignature("webhook-timestamp is too far in the future")

    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = [hmac.digest(key, signed, "sha256") for key in keys]
    for entry in signatures.split():
        version, _, encoded = entry.partition(",")
        if version != "v1":
            continue
        try:
            candidate = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            continue
        # Compare against every key without stopping early, so timing does not reveal which secret matched.
        if any([hmac.compare_digest(candidate, digest) for digest in expected]):
            return
    raise InvalidSignature("no matching v1 signature")
