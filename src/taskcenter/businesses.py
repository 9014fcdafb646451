"""Business systems (tenants): register (first key and secrets), read, change, disable, rotate credentials.

Every change is written to the audit log in the same transaction. Authentication lives in
:mod:`taskcenter.credentials`; :meth:`BusinessService.authenticate` hands over to it.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from taskcenter.audit import AuditLog
from taskcenter.clock import utcnow
from taskcenter.credentials import Authenticator, IssuedKey, Principal, as_mapping, new_key
from taskcenter.crypto import SecretBox, SecretKeyError
from taskcenter.domain.retry import RetryPolicy
from taskcenter.domain.task import rfc3339
from taskcenter.errors import (
    BusinessNotFound,
    Conflict,
    ValidationError,
)
from taskcenter.service import Business, TaskService
from taskcenter.signing import generate_secret
from taskcenter.storage.database import Database
from taskcenter.storage.schema import api_keys, businesses

_CODE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_LIMITS = {
    "rate_limit_per_minute": (1, 1_000_000),
    "max_in_flight": (1, 100_000),
    "max_active_tasks": (1, 10_000_000),
}
SETTINGS_FIELDS = frozenset({"name", *_LIMITS, "retry", "allow_networks", "allow_hosts", "deny_hosts"})


@dataclass(frozen=True, slots=True)
class Registration:
    """What registering a business hands back, once: its settings and first secrets."""

    business: dict[str, Any]
    api_key: IssuedKey
    signing_secret: str
    jwt_secret: str


@dataclass(frozen=True, slots=True)
class Rotation:
    """The outcome of a credentials rotation; the new secrets are shown this once."""

    api_key: IssuedKey
    old_keys_expire_at: datetime
    signing_secret: str | None = None
    jwt_secret: str | None = None


def _check_name(name: Any) -> None:
    """A display name (a business's, an operator key's): 1-200 characters, none of them a control character."""
    if not isinstance(name, str) or not 1 <= len(name) <= 200 or any(ord(c) < 32 for c in name):
        raise ValidationError("name must be 1-200 printable characters", field="name")


def validate_settings(data: Mapping[str, Any], *, creating: bool) -> dict[str, Any]:
    """Check a business's settings; returns the column values. Raises :class:`ValidationError` naming the field."""
    allowed = SETTINGS_FIELDS | ({"code"} if creating else {"status"})
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValidationError(f"{unknown[0]} is not a known field", field=unknown[0])
    out: dict[str, Any] = {}
    if creating:
        code = data.get("code")
        if not isinstance(code, str) or not _CODE.match(code):
            raise ValidationError(
                "code must be 1-64 of a-z, 0-9, _ and -, starting with a letter or digit", field="code"
            )
        out["code"] = code
    if "name" in data or creating:
        name = data.get("name", out.get("code"))
        _check_name(name)
        out["name"] = name
    for key, (lo, hi) in _LIMITS.items():
        if key in data:
            value = data[key]
            if value is None and key == "max_in_flight":
                out[key] = None
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValidationError(f"{key} must be an integer from {lo} to {hi}", field=key)
            out[key] = value
    if "retry" in data:
        out["retry"] = None if data["retry"] is None else RetryPolicy.from_dict(data["retry"]).to_dict()
    if "allow_networks" in data:
        out["allow_networks"] = _networks(data["allow_networks"])
    for key in ("allow_hosts", "deny_hosts"):
        if key in data:
            out[key] = _hosts(data[key], key)
    if "status" in data:
        if data["status"] not in ("active", "disabled"):
            raise ValidationError("status must be active or disabled", field="status")
        out["status"] = data["status"]
    return out


def _networks(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > 100:
        raise ValidationError("allow_networks must be a list of at most 100 CIDRs", field="allow_networks")
    out = []
    for n, item in enumerate(value):
        try:
            if not isinstance(item, str):
                raise ValueError(item)
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as exc:
            raise ValidationError(f"allow_networks[{n}] is not a CIDR", field=f"allow_networks[{n}]") from exc
    return out


def _hosts(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or len(value) > 100:
        raise ValidationError(f"{key} must be a list of at most 100 host names", field=key)
    for n, item in enumerate(value):
        if not isinstance(item, str) or not _HOST.match(item.lower()):
            raise ValidationError(f"{key}[{n}] is not a host name", field=f"{key}[{n}]")
    return [item.lower() for item in value]


def business_dict(row: Mapping[str, Any], keys: list[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The public representation of a business (no secret, only how many signing secrets it has)."""
    out = {
        "code": row["code"],
        "name": row["name"],
        "status": row["status"],
        "rate_limit_per_minute": row["rate_limit_per_minute"],
        "max_in_flight": row["max_in_flight"],
        "max_active_tasks": row["max_active_tasks"],
        "retry": row["retry"],
        "allow_networks": list(row["allow_networks"] or ()),
        "allow_hosts": list(row["allow_hosts"] or ()),
        "deny_hosts": list(row["deny_hosts"] or ()),
        "signing_secrets": len(row["signing_secrets"] or ()),
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
    }
    if keys is not None:
        out["keys"] = [key_dict(k) for k in keys]
    return out


def key_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    """An API key as it may be shown: its id and prefix, never the key or its hash."""
    return {
        "id": row["id"],
        "prefix": row["prefix"],
        "name": row["name"],
        "role": row["role"],
        "created_at": rfc3339(row["created_at"]),
        "expires_at": rfc3339(row["expires_at"]),
        "revoked_at": rfc3339(row["revoked_at"]),
        "last_used_at": rfc3339(row["last_used_at"]),
    }


@dataclass
class BusinessService:
    """Registers and manages business systems and authenticates their callers."""

    db: Database
    box: SecretBox
    tasks: TaskService
    audit: AuditLog
    operator_key: str | None = None
    key_grace_hours: float = 24.0
    clock: Callable[[], datetime] = utcnow
    _auth: Authenticator = field(init=False)

    def __post_init__(self) -> None:
        self._auth = Authenticator(self.db, self.box, self.operator_key, self.clock)

    async def authenticate(self, token: str | None) -> Principal:
        """Who presents ``token``; see :meth:`taskcenter.credentials.Authenticator.authenticate`."""
        return await self._auth.authenticate(token)

    # -- registration and changes ----------------------------------------------------------------

    async def register(self, data: Mapping[str, Any], *, actor: str) -> Registration:
        """Register a business; its first API key, signing secret and JWT secret are returned this once."""
        values = validate_settings(data, creating=True)
        key, prefix, digest = new_key()
        signing, jwt_secret, now = generate_secret(), secrets.token_urlsafe(32), self.clock()
        async with self.db.write() as conn:
            taken = await conn.execute(sa.select(businesses.c.id).where(businesses.c.code == values["code"]))
            if taken.scalar() is not None:
                raise Conflict(f"business system {values['code']!r} exists already", field="code")
            values.update(
                signing_secrets=[self.box.seal(signing)],
                jwt_secret=self.box.seal(jwt_secret),
                created_at=now,
                updated_at=now,
            )
            pk = (
                await conn.execute(sa.insert(businesses).values(**values).returning(businesses.c.id))
            ).scalar_one()
            key_id = await self._insert_key(conn, pk, "business", prefix, digest, "initial", now)
            shown = {k: v for k, v in values.items() if k not in ("signing_secrets", "jwt_secret")}
            await self.audit.record(actor, "business.create", "business", values["code"], business_pk=pk,
                                    details={k: v for k, v in shown.items() if not isinstance(v, datetime)},
                                    conn=conn)  # fmt: skip
            await self.audit.record(actor, "key.create", "api_key", str(key_id), business_pk=pk,
                                    details={"prefix": prefix}, conn=conn)  # fmt: skip
            row = await self._business_row(conn, values["code"])
            stmt = sa.select(api_keys).where(api_keys.c.id == key_id)
            first = as_mapping((await conn.execute(stmt)).mappings().one())
        return Registration(business_dict(row, [first]), IssuedKey(key, key_id, prefix), signing, jwt_secret)

    async def list_businesses(self) -> list[dict[str, Any]]:
        """Every business, by code."""
        async with self.db.read() as conn:
            rows = (await conn.execute(sa.select(businesses).order_by(businesses.c.code))).mappings().all()
        return [business_dict(as_mapping(r)) for r in rows]

    async def show(self, code: str) -> dict[str, Any]:
        """A business's settings, limits and keys (ids and prefixes only)."""
        async with self.db.read() as conn:
            row = await self._business_row(conn, code)
            stmt = sa.select(api_keys).where(api_keys.c.business_pk == row["id"]).order_by(api_keys.c.id)
            keys = [as_mapping(k) for k in (await conn.execute(stmt)).mappings().all()]
        return business_dict(row, keys)

    async def update(self, code: str, data: Mapping[str, Any], *, actor: str) -> dict[str, Any]:
        """Change a business's name, limits, lists, default retry policy or status."""
        values = validate_settings(data, creating=False)
        if not values:
            raise ValidationError("nothing to change", field="body")
        action = (
            "business.disable"
            if values.get("status") == "disabled" and len(values) == 1
            else "business.update"
        )
        async with self.db.write() as conn:
            row = await self._business_row(conn, code)
            await conn.execute(
                sa.update(businesses)
                .where(businesses.c.id == row["id"])
                .values(**values, updated_at=self.clock())
            )
            await self.audit.record(
                actor, action, "business", code, business_pk=row["id"], details=values, conn=conn
            )
            row = await self._business_row(conn, code)
        self._forget(code)
        return business_dict(row)

    async def disable(self, code: str, *, actor: str) -> dict[str, Any]:
        """Disable a business: its keys and JWTs stop working (within the auth cache's TTL elsewhere)."""
        return await self.update(code, {"status": "disabled"}, actor=actor)

    async def rotate(
        self,
        code: str,
        *,
        actor: str,
        grace_hours: float | None = None,
        signing_secret: bool = False,
        jwt_secret: bool = False,
    ) -> Rotation:
        """Issue a new API key; the business's older keys stay valid for ``grace_hours`` (default from settings).

        With ``signing_secret`` a new signing secret signs first and the previous one keeps signing alongside
        it (Standard Webhooks sends both signatures) until the next rotation — unless the previous one cannot
        be decrypted with TASKCENTER_SECRET_KEY: then the new one signs alone (this is how such a business's
        held tasks are let go). With ``jwt_secret`` the JWT secret is replaced at once.
        """
        grace = self.key_grace_hours if grace_hours is None else grace_hours
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= 24 * 90:
            raise ValidationError("grace_hours must be between 0 and 2160", field="grace_hours")
        now = self.clock()
        until = now + timedelta(hours=grace)
        key, prefix, digest = new_key()
        new_signing = generate_secret() if signing_secret else None
        new_jwt = secrets.token_urlsafe(32) if jwt_secret else None
        async with self.db.write() as conn:
            row = await self._business_row(conn, code)
            await conn.execute(
                sa.update(api_keys)
                .where(
                    api_keys.c.business_pk == row["id"],
                    api_keys.c.revoked_at.is_(None),
                    sa.or_(api_keys.c.expires_at.is_(None), api_keys.c.expires_at > until),
                )
                .values(expires_at=until)
            )
            key_id = await self._insert_key(
                conn, row["id"], "business", prefix, digest, f"rotated {rfc3339(now)}", now
            )
            changes: dict[str, Any] = {}
            if new_signing:
                changes["signing_secrets"] = [self.box.seal(new_signing), *self._still_open(row)]
            if new_jwt:
                changes["jwt_secret"] = self.box.seal(new_jwt)
            if changes:
                await conn.execute(
                    sa.update(businesses)
                    .where(businesses.c.id == row["id"])
                    .values(**changes, updated_at=now)
                )
            details = {"new_key_id": key_id, "prefix": prefix, "old_keys_expire_at": rfc3339(until),
                       "signing_secret": bool(new_signing), "jwt_secret": bool(new_jwt)}  # fmt: skip
            await self.audit.record(actor, "key.rotate", "business", code, business_pk=row["id"], details=details,
                                    conn=conn)  # fmt: skip
        self._forget(code)
        return Rotation(IssuedKey(key, key_id, prefix), until, new_signing, new_jwt)

    def _still_open(self, row: Mapping[str, Any]) -> list[str]:
        """The business's current signing secret, as stored, if it can be decrypted: kept through a rotation."""
        sealed = (row["signing_secrets"] or ())[:1]
        try:
            for value in sealed:
                self.box.open(value)
        except SecretKeyError:
            return []
        return list(sealed)

    async def create_operator_key(self, *, actor: str, name: str | None = None) -> IssuedKey:
        """A new operator API key (shown this once)."""
        if name is not None:
            _check_name(
                name
            )  # as a business's: the column holds 200 (PostgreSQL refused more as a database error)
        key, prefix, digest = new_key()
        async with self.db.write() as conn:
            key_id = await self._insert_key(conn, None, "operator", prefix, digest, name, self.clock())
            await self.audit.record(actor, "key.create", "operator_key", str(key_id), details={"prefix": prefix},
                                    conn=conn)  # fmt: skip
        return IssuedKey(key, key_id, prefix)

    async def business(self, code: str) -> Business:
        """A business by code, read fresh."""
        async with self.db.read() as conn:
            return Business.from_row(await self._business_row(conn, code))

    async def _business_row(self, conn: AsyncConnection, code: str) -> Mapping[str, Any]:
        row = (await conn.execute(sa.select(businesses).where(businesses.c.code == code))).mappings().first()
        if row is None:
            raise BusinessNotFound(f"no business system {code!r}", code=code)
        return as_mapping(row)

    async def _insert_key(
        self, conn: AsyncConnection, business_pk: int | None, role: str, prefix: str, digest: str,
        name: str | None, now: datetime,
    ) -> int:  # fmt: skip
        stmt = sa.insert(api_keys).values(
            business_pk=business_pk, role=role, prefix=prefix, key_hash=digest, name=name, created_at=now
        )
        return int((await conn.execute(stmt.returning(api_keys.c.id))).scalar_one())

    def _forget(self, code: str) -> None:
        # Local caches drop at once; other processes catch up within AUTH_CACHE_TTL_S.
        self._auth.forget()
        self.tasks.forget_business(code)
