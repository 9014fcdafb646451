"""Secrets in task headers: which are sensitive, masking them for display, and encrypting them at rest.

Pure: no I/O. Encryption is Fernet (cryptography's MultiFernet) keyed by ``TASKCENTER_SECRET_KEY``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from taskcenter.errors import ConfigError

__all__ = [
    "MASK",
    "BusinessSecretError",
    "SecretBox",
    "SecretKeyError",
    "is_sensitive_header",
    "mask_headers",
]

MASK = "***"
"""What a masked value (or the credentials after an authorization scheme) is replaced with."""

SETTING = "TASKCENTER_SECRET_KEY"

_FERNET_PREFIX = "fernet:"
_PLAIN_PREFIX = "plain:"

_SENSITIVE_NAMES = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})
_SENSITIVE_PARTS = ("token", "secret", "password", "passwd", "key", "signature", "auth")
# Public values whose names happen to contain a sensitive word: the task UUID (Idempotency-Key), the message
# id, connection keep-alive, and the authentication challenges a receiver answers with (useful for debugging a
# 401, and carrying no credentials).
_PUBLIC_NAMES = frozenset(
    {"idempotency-key", "webhook-id", "keep-alive", "www-authenticate", "proxy-authenticate"}
)
_AUTH_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)\s+\S")


class SecretKeyError(ConfigError):
    """TASKCENTER_SECRET_KEY cannot decrypt a stored value."""


class BusinessSecretError(SecretKeyError):
    """A business system's secret (signing or JWT) cannot be used: TASKCENTER_SECRET_KEY cannot decrypt it (or,
    for signing, the dispatcher has not loaded it yet)."""


@lru_cache(maxsize=4096)
def is_sensitive_header(name: str) -> bool:
    """Whether a header's value is a secret, to be masked when shown and encrypted when stored.

    Sensitive: ``Authorization``, ``Proxy-Authorization``, ``Cookie``, ``Set-Cookie``, ``X-API-Key``, and any
    name containing ``token``, ``secret``, ``password``, ``passwd``, ``key``, ``signature`` or ``auth``.
    Not sensitive although they match: ``Idempotency-Key``, ``webhook-id``, ``Keep-Alive``,
    ``WWW-Authenticate``, ``Proxy-Authenticate``. Names are compared case-insensitively.

    Args:
        name: A header name.

    Returns:
        True when the value must not be shown or stored in clear.
    """
    lowered = name.strip().lower()
    if lowered in _PUBLIC_NAMES:
        return False
    return lowered in _SENSITIVE_NAMES or any(part in lowered for part in _SENSITIVE_PARTS)


def _mask_value(name: str, value: str) -> str:
    # Keep the scheme of an authorization header ("Bearer ***"): it tells the reader what kind of credential
    # was sent without revealing it.
    if name.strip().lower().endswith("authorization"):
        match = _AUTH_SCHEME.match(value.strip())
        if match:
            return f"{match.group(1)} {MASK}"
    return MASK


def mask_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Copy headers with every sensitive value masked, for the API, the admin console and logs.

    Args:
        headers: Header names to values.

    Returns:
        A new dict in the same order; sensitive values become ``"***"``, except that authorization headers
        keep their scheme (``"Bearer ***"``).
    """
    return {
        name: _mask_value(name, value) if is_sensitive_header(name) else value
        for name, value in headers.items()
    }


def _fernet(key: str | bytes, position: int) -> Fernet:
    try:
        return Fernet(key)
    except (ValueError, TypeError):
        # The message must not repeat the key: it may end up in a log.
        raise ConfigError(
            f"{SETTING} entry {position} is not a Fernet key (32 url-safe base64-encoded bytes); "
            "make one with `SecretBox.generate_key()`",
            setting=SETTING,
        ) from None


class SecretBox:
    """Encrypts sensitive header values at rest, with key rotation.

    Stored forms: ``"fernet:<token>"`` when encrypted, ``"plain:<value>"`` when the box is disabled (no key
    configured). Raw values without either prefix are read as legacy plaintext.

    Rotation: build the box with the new key first and the old ones after it
    (``TASKCENTER_SECRET_KEY=new,old``). The first key encrypts, every key decrypts; `rotate` re-encrypts a
    stored value with the first key. Once every stored value is rotated the old key can be dropped.

    Production must set ``TASKCENTER_SECRET_KEY``: without it (`disabled`) values are stored in clear, with no
    warning from this class.
    """

    __slots__ = ("_fernet",)

    _fernet: MultiFernet | None

    def __init__(self, keys: Iterable[str | bytes]) -> None:
        """Build a box from Fernet keys, newest first.

        Args:
            keys: One or more Fernet keys (url-safe base64 of 32 bytes). The first encrypts; all decrypt.

        Raises:
            ConfigError: no key was given, or one is not a Fernet key.
        """
        fernets = [_fernet(key, position) for position, key in enumerate(keys, start=1)]
        if not fernets:
            raise ConfigError(f"no {SETTING} key given; use SecretBox.disabled() to store values in clear")
        self._fernet = MultiFernet(fernets)

    @classmethod
    def disabled(cls) -> SecretBox:
        """A box that stores values in clear, prefixed ``plain:``, for when no key is configured."""
        box = cls.__new__(cls)
        box._fernet = None
        return box

    @classmethod
    def from_setting(cls, value: str | None) -> SecretBox:
        """Build the box from the ``TASKCENTER_SECRET_KEY`` setting.

        Args:
            value: Comma-separated Fernet keys, newest first; None or blank means no key (a disabled box).

        Returns:
            An encrypting box, or a disabled one.

        Raises:
            ConfigError: an entry is not a Fernet key.
        """
        keys = [part.strip() for part in (value or "").split(",") if part.strip()]
        return cls(keys) if keys else cls.disabled()

    @staticmethod
    def generate_key() -> str:
        """Make a new Fernet key, suitable for ``TASKCENTER_SECRET_KEY``."""
        return Fernet.generate_key().decode("ascii")

    @property
    def enabled(self) -> bool:
        """Whether values are encrypted (a key is configured)."""
        return self._fernet is not None

    def __repr__(self) -> str:
        return f"SecretBox(enabled={self.enabled})"

    def seal(self, value: str) -> str:
        """Prepare one value for storage.

        Args:
            value: The clear value.

        Returns:
            ``"fernet:<token>"`` with the newest key, or ``"plain:<value>"`` when disabled.
        """
        if self._fernet is None:
            return _PLAIN_PREFIX + value
        return _FERNET_PREFIX + self._fernet.encrypt(value.encode()).decode("ascii")

    def open(self, value: str) -> str:
        """Read one stored value back.

        Args:
            value: ``"fernet:<token>"``, ``"plain:<value>"`` or a raw legacy value (returned as it is).

        Returns:
            The clear value.

        Raises:
            SecretKeyError: the value is encrypted and no configured key decrypts it, or no key is set.
        """
        if value.startswith(_FERNET_PREFIX):
            return self._decrypt(value[len(_FERNET_PREFIX) :]).decode()
        if value.startswith(_PLAIN_PREFIX):
            return value[len(_PLAIN_PREFIX) :]
        return value

    def rotate(self, value: str) -> str:
        """Re-encrypt a stored value with the newest key.

        Encrypted values keep their original timestamp (MultiFernet.rotate); clear ones (``plain:`` or
        legacy) are encrypted, so turning encryption on and rotating migrates old rows. A disabled box returns
        values in the ``plain:`` form.

        Args:
            value: A stored value in any form `open` accepts.

        Returns:
            The value sealed with the newest key.

        Raises:
            SecretKeyError: as for `open`.
        """
        if self._fernet is not None and value.startswith(_FERNET_PREFIX):
            token = value[len(_FERNET_PREFIX) :]
            try:
                return _FERNET_PREFIX + self._fernet.rotate(token.encode("ascii")).decode("ascii")
            except (InvalidToken, UnicodeEncodeError) as exc:
                raise self._cannot_decrypt() from exc
        return self.seal(self.open(value))

    def seal_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Seal the sensitive values of a header mapping (see `is_sensitive_header`); others stay as is."""
        return {
            name: self.seal(value) if is_sensitive_header(name) else value for name, value in headers.items()
        }

    def open_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Inverse of `seal_headers`: open the sensitive values.

        Raises:
            SecretKeyError: as for `open`.
        """
        return {
            name: self.open(value) if is_sensitive_header(name) else value for name, value in headers.items()
        }

    def unopened(self, headers: Mapping[str, str]) -> list[str]:
        """The names of the sensitive values of stored headers that `open` cannot read back (in their order):
        what a task whose headers raised :class:`SecretKeyError` says about why (names only, never values)."""
        names = []
        for name, value in headers.items():
            if is_sensitive_header(name):
                try:
                    self.open(value)
                except SecretKeyError:
                    names.append(name)
        return names

    def rotate_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Apply `rotate` to the sensitive values of stored headers.

        Raises:
            SecretKeyError: as for `open`.
        """
        return {
            name: self.rotate(value) if is_sensitive_header(name) else value
            for name, value in headers.items()
        }

    def _decrypt(self, token: str) -> bytes:
        if self._fernet is None:
            raise SecretKeyError(
                f"a stored value is encrypted but {SETTING} is not set; set it to the key that encrypted it",
                setting=SETTING,
            )
        try:
            return self._fernet.decrypt(token.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError) as exc:
            raise self._cannot_decrypt() from exc

    @staticmethod
    def _cannot_decrypt() -> SecretKeyError:
        return SecretKeyError(
            f"{SETTING} cannot decrypt a stored value: none of its keys encrypted it (or the value is "
            "corrupt); add the key that encrypted it after the newest one",
            setting=SETTING,
        )
