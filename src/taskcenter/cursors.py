"""The opaque keyset cursors of the listings (tasks, hosts, audit log): a kind and the last value of the page,
as URL-safe base64, so a cursor of one listing is refused by another."""

from __future__ import annotations

import base64
import binascii

from taskcenter.domain.task import parse_row_id
from taskcenter.errors import ValidationError


def encode(kind: str, value: str | int) -> str:
    """The cursor of ``kind`` (e.g. ``t1``) after ``value``."""
    return base64.urlsafe_b64encode(f"{kind}:{value}".encode()).decode().rstrip("=")


def decode(kind: str, cursor: str) -> str:
    """The value behind a cursor of ``kind``.

    Raises:
        ValidationError: naming ``cursor`` when it is not one of ``kind`` this API handed out.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise refused() from exc
    prefix, _, value = raw.partition(":")
    if prefix != kind:
        raise refused()
    return value


def decode_row_id(kind: str, cursor: str) -> int:
    """The row id behind a cursor of ``kind``; :class:`ValidationError` on anything else."""
    row_id = parse_row_id(decode(kind, cursor))
    if row_id is None:
        raise refused()
    return row_id


def refused() -> ValidationError:
    """The error for a cursor this API did not hand out."""
    return ValidationError("cursor is not one this API returned", field="cursor")
