"""Standard Webhooks signing (https://www.standardwebhooks.com) for outbound requests.

Pure: no I/O. Secrets are decoded once when a `Signer` is built, because signing runs on every delivery.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass, field
from secrets import token_bytes

from taskcenter.errors import ValidationError

SECRET_PREFIX = "whsec_"  # noqa: S105 - a public prefix, not a secret
"""Prefix of a Standard Webhooks signing secret."""

# The spec recommends secrets of 24 to 64 bytes; shorter ones are too weak for HMAC-SHA256 to be worth it.
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
_GENERATED_SECRET_BYTES = 32


def generate_secret() -> str:
    """Make a new signing secret.

    Returns:
        ``"whsec_"`` followed by the standard base64 of 32 random bytes from the `secrets` module.
    """
    return SECRET_PREFIX + base64.b64encode(token_bytes(_GENERATED_SECRET_BYTES)).decode("ascii")


def decode_secret(secret: str) -> bytes:
    """Decode a ``whsec_…`` secret into its HMAC key.

    Unpadded base64 is accepted, as the reference libraries accept it.

    Args:
        secret: ``"whsec_"`` followed by the base64 of 24 to 64 bytes.

    Returns:
        The raw key bytes.

    Raises:
        ValidationError: (field ``signing_secret``) the prefix is missing, the rest is not base64 or the key
            has the wrong length. The message never repeats the secret.
    """
    if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
        raise ValidationError(f"a signing secret must start with {SECRET_PREFIX!r}", field="signing_secret")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(
            f"a signing secret must be {SECRET_PREFIX!r} followed by standard base64", field="signing_secret"
        ) from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValidationError(
            f"a signing secret must encode {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, not {len(key)}",
            field="signing_secret",
        )
    return key


@dataclass(frozen=True)
class Signer:
    """Signs outbound requests with one or more secrets.

    With several secrets (during a rotation) the ``webhook-signature`` header carries one signature per
    secret, space-separated, so a receiver holding either the old or the new secret accepts the message.

    Each signature is ``v1,`` + base64(HMAC-SHA256(key, f"{msg_id}.{timestamp}.".encode() + body)).

    Build one with ``Signer(("whsec_…",))`` or ``Signer.from_secrets("whsec_new…", "whsec_old…")``.

    Raises:
        ValidationError: (field ``signing_secret``) no secret was given, or one is malformed.
    """

    secrets: tuple[str, ...] = field(repr=False)
    """The ``whsec_…`` secrets; the repr hides them so they never reach a log."""
    _keys: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.secrets, str):
            # A bare string is iterable too; signing with each of its characters would be a silent disaster.
            object.__setattr__(self, "secrets", (self.secrets,))
        else:
            object.__setattr__(self, "secrets", tuple(self.secrets))
        if not self.secrets:
            raise ValidationError("at least one signing secret is needed", field="signing_secret")
        object.__setattr__(self, "_keys", tuple(decode_secret(s) for s in self.secrets))

    @classmethod
    def from_secrets(cls, *secrets: str) -> Signer:
        """Build a signer from secrets given as arguments, newest first by convention.

        Args:
            *secrets: ``whsec_…`` secrets.

        Returns:
            The signer.
        """
        return cls(secrets)

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        """Compute the ``webhook-signature`` header value.

        Args:
            msg_id: The ``webhook-id`` (the same for every retry of one message).
            timestamp: The ``webhook-timestamp``, whole seconds since the Unix epoch.
            body: The exact request body bytes.

        Returns:
            ``"v1,<base64>"`` per secret, joined by single spaces, in the order the secrets were given.
        """
        signed = f"{msg_id}.{timestamp}.".encode() + body
        return " ".join(
            "v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode("ascii") for key in self._keys
        )


def signature_headers(signer: Signer, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers for one request.

    Args:
        signer: The business's signer.
        msg_id: The message id (taskcenter uses the task UUID).
        timestamp: Whole seconds since the Unix epoch, the moment of sending.
        body: The exact request body bytes.

    Returns:
        ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``.
    """
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signer.sign(msg_id, timestamp, body),
    }
