"""Row ids as the API, the CLI and the cursors read them (``domain.task.parse_row_id``)."""

from __future__ import annotations

import base64

import pytest

from taskcenter.audit import decode_cursor as decode_audit_cursor
from taskcenter.audit import encode_cursor as encode_audit_cursor
from taskcenter.domain.task import parse_row_id
from taskcenter.errors import ValidationError
from taskcenter.service import decode_cursor, encode_cursor


@pytest.mark.parametrize(("text", "expected"), [("1", 1), ("007", 7), ("9" * 18, int("9" * 18))])
def test_ascii_digits_up_to_eighteen_are_a_row_id(text: str, expected: int) -> None:
    assert parse_row_id(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "1.0", " 1", "١", "²", "1" * 19, "9" * 5000, "0x1"])
def test_anything_else_is_no_row_id(text: str) -> None:
    assert parse_row_id(text) is None


def _cursor(prefix: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{prefix}:{value}".encode()).decode().rstrip("=")


def test_task_and_audit_cursors_round_trip_and_refuse_what_is_no_row_id() -> None:
    assert decode_cursor(encode_cursor(42)) == 42
    assert decode_audit_cursor(encode_audit_cursor(42)) == 42
    for value in ("١", "9" * 19):
        with pytest.raises(ValidationError):
            decode_cursor(_cursor("t1", value))
        with pytest.raises(ValidationError):
            decode_audit_cursor(_cursor("a1", value))
