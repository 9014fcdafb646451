"""API keys and authentication: who presents a bearer token (business key, business JWT, operator key).

API keys are ``tc_`` + 32 random bytes, stored only as a SHA-256 hash, found by their first 12 characters and
compared in constant time. Successful authentications are cached in memory for :data:`AUTH_CACHE_TTL_S`
seconds, so a rotation's end of grace, a disabled business or a revoked key takes effect in *other* processes
within that time (this process forgets at once).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

import jwt
import sqlalchemy as sa

from taskcenter.clock import utcnow
from taskcenter.crypto import SETTING, BusinessSecretError, SecretBox, SecretKeyError
from taskcenter.errors import Forbidden, StorageError, Unauthenticated
from taskcenter.service import Business
from taskcenter.storage.database import Database
from taskcenter.storage.schema import api_keys, businesses

log = logging.getLogger("taskcenter.credentials")

KEY_PREFIX = "tc_"
PREFIX_LENGTH = 12
AUTH_CACHE_TTL_S = 5.0
AUTH_CACHE_SIZE = 10_000
LAST_USED_EVERY_S = 60.0
_CODE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a business system (through one of its keys or a JWT) or an operator."""

    kind: Literal["business", "operator"]
    actor: str
    """How the audit log names the caller, e.g. ``key:12`` (never the key itself)."""
    business: Business | None = None
    key_id: int | None = None


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A freshly made API key: ``key`` is shown this once and never stored."""

    key: str
    key_id: int
    prefix: str


def new_key() -> tuple[str, str, str]:
    """A new API key: ``(key, prefix, sha256 hex)``."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, key[:PREFIX_LENGTH], digest(key)


def digest(token: str) -> str:
    """The SHA-256 hex digest a key is stored as."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def as_mapping(row: Any) -> Mapping[str, Any]:
    """A SQLAlchemy ``RowMapping`` typed as the plain mapping it is used as."""
    return cast(Mapping[str, Any], row)


@dataclass
class Authenticator:
    """Resolves bearer tokens to principals, with a short in-memory cache of successes."""

    db: Database
    box: SecretBox
    operator_key: str | None = None
    clock: Callable[[], datetime] = utcnow
    _cache: dict[str, tuple[float, Principal]] = field(default_factory=dict, init=False)
    _touched: dict[int, float] = field(default_factory=dict, init=False)

    def forget(self) -> None:
        """Drop every cached authentication (after a rotation, a change or a disable)."""
        self._cache.clear()

    async def authenticate(self, token: str | None) -> Principal:
        """Who presents ``token``.

        Raises:
            Unauthenticated: no token, or one that matches nothing valid.
            Forbidden: the credentials belong to a disabled business.
            BusinessSecretError: a JWT names a business whose JWT secret cannot be decrypted.
        """
        if not token:
            raise Unauthenticated("send Authorization: Bearer <API key or JWT>")
        if len(token) > 4096 or not token.isascii() or not token.isprintable() or " " in token:
            raise Unauthenticated("invalid credentials")  # and never let such text reach a query
        hashed = digest(token)
        now = time.monotonic()
        cached = self._cache.get(hashed)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            principal, ttl = await self._resolve(token, hashed)
            if len(self._cache) >= AUTH_CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[hashed] = (now + ttl, principal)
        key_id = principal.key_id
        if key_id is not None and now - self._touched.get(key_id, -LAST_USED_EVERY_S) >= LAST_USED_EVERY_S:
            await self._touch(key_id, now)
        return principal

    async def _resolve(self, token: str, hashed: str) -> tuple[Principal, float]:
        if self.operator_key and hmac.compare_digest(hashed, digest(self.operator_key)):
            return Principal("operator", "operator:env"), AUTH_CACHE_TTL_S
        if token.startswith(KEY_PREFIX):
            return await self._api_key(token, hashed), AUTH_CACHE_TTL_S
        if token.count(".") == 2:
            return await self._jwt(token)
        raise Unauthenticated("invalid credentials")

    async def _api_key(self, token: str, hashed: str) -> Principal:
        now = self.clock()
        async with self.db.read() as conn:
            stmt = sa.select(api_keys).where(api_keys.c.prefix == token[:PREFIX_LENGTH])
            rows = (await conn.execute(stmt)).mappings().all()
            match = next((r for r in rows if hmac.compare_digest(r["key_hash"], hashed)), None)
            expired = match is not None and match["expires_at"] is not None and match["expires_at"] <= now
            if match is None or match["revoked_at"] is not None or expired:
                raise Unauthenticated("invalid, expired or revoked API key")
            actor = f"key:{match['id']}"
            if match["role"] == "operator":
                return Principal("operator", actor, key_id=match["id"])
            stmt = sa.select(businesses).where(businesses.c.id == match["business_pk"])
            business = Business.from_row(as_mapping((await conn.execute(stmt)).mappings().one()))
        if business.status != "active":
            raise Forbidden(f"business system {business.code!r} is disabled")
        return Principal("business", actor, business=business, key_id=match["id"])

    async def _jwt(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
            subject = jwt.decode(token, options={"verify_signature": False}).get("sub")
        except jwt.PyJWTError as exc:
            raise Unauthenticated("invalid credentials: not an API key or a valid JWT") from exc
        if header.get("alg") != "HS256" or not isinstance(subject, str) or not _CODE.match(subject):
            raise Unauthenticated("a JWT must be HS256-signed and name the business code in sub")
        async with self.db.read() as conn:
            stmt = sa.select(businesses).where(businesses.c.code == subject)
            row = (await conn.execute(stmt)).mappings().first()
        if row is None or not row["jwt_secret"]:
            raise Unauthenticated("invalid JWT")
        try:
            secret = self.box.open(row["jwt_secret"])
        except SecretKeyError as exc:
            raise BusinessSecretError(
                f"the JWT secret of business system {row['code']!r} cannot be decrypted with this server's "
                f"{SETTING}; authenticate with an API key, or have the operator restore the key or rotate the "
                "JWT secret",
                setting=SETTING,
            ) from exc
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid JWT: {exc}") from exc
        if claims["sub"] != row["code"]:
            raise Unauthenticated("invalid JWT: sub does not name this business")
        business = Business.from_row(as_mapping(row))
        if business.status != "active":
            raise Forbidden(f"business system {business.code!r} is disabled")
        ttl = min(AUTH_CACHE_TTL_S, float(claims["exp"]) - time.time())
        return Principal("business", f"jwt:{business.code}", business=business), max(ttl, 0.0)

    async def _touch(self, key_id: int, now: float) -> None:
        # last_used_at is written at most once a minute per key: the create path must not write per request.
        self._touched[key_id] = now
        try:
            async with self.db.write() as conn:
                stmt = sa.update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=self.clock())
                await conn.execute(stmt)
        except StorageError as exc:
            log.warning("recording the use of API key %s failed: %s", key_id, exc)
