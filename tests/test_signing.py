"""Standard Webhooks signing (taskcenter.signing) and the receiver helper (taskcenter.verify).

Signatures are checked with the reference `standardwebhooks` package exactly as a receiver would.
"""

from __future__ import annotations

import ast
import base64
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from taskcenter.errors import ConfigError, TaskCenterError, ValidationError
from taskcenter.signing import Signer, generate_secret, signature_headers
from taskcenter.verify import InvalidSignature, verify

SRC = Path(__file__).resolve().parents[1] / "src" / "taskcenter"

# The example from the Standard Webhooks / Svix documentation.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TIMESTAMP = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

OLD = generate_secret()
NEW = generate_secret()
BODY = json.dumps({"order": 123, "status": "paid"}).encode()
MSG_ID = "0b8f2a8e-2f5c-4c55-9a1b-7d3c2f0e9a11"


def headers_now(signer: Signer, body: bytes = BODY) -> dict[str, str]:
    return signature_headers(signer, MSG_ID, int(time.time()), body)


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


# --- generate_secret


def test_generated_secret_is_whsec_prefixed_base64_of_32_bytes() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32


def test_generated_secrets_differ() -> None:
    assert generate_secret() != generate_secret()


def test_generated_secret_is_accepted_by_the_reference_library() -> None:
    secret = generate_secret()
    Webhook(secret).verify(BODY, headers_now(Signer((secret,))))


# --- Signer


def test_signature_matches_the_spec_example() -> None:
    assert Signer((SPEC_SECRET,)).sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY) == SPEC_SIGNATURE


def test_reference_library_verifies_a_signed_request() -> None:
    assert Webhook(NEW).verify(BODY, headers_now(Signer((NEW,)))) == {"order": 123, "status": "paid"}


def test_reference_library_rejects_a_tampered_body() -> None:
    headers = headers_now(Signer((NEW,)))
    with pytest.raises(WebhookVerificationError):
        Webhook(NEW).verify(BODY.replace(b"paid", b"void"), headers)


def test_rotation_sends_one_signature_per_secret() -> None:
    value = Signer.from_secrets(NEW, OLD).sign(MSG_ID, 1_700_000_000, BODY)
    parts = value.split(" ")
    assert len(parts) == 2
    assert all(part.startswith("v1,") for part in parts)
    assert parts[0] == Signer((NEW,)).sign(MSG_ID, 1_700_000_000, BODY)
    assert parts[1] == Signer((OLD,)).sign(MSG_ID, 1_700_000_000, BODY)


@pytest.mark.parametrize("receiver_secret", [OLD, NEW], ids=["old", "new"])
def test_during_rotation_each_secret_verifies_on_its_own(receiver_secret: str) -> None:
    headers = headers_now(Signer.from_secrets(NEW, OLD))
    Webhook(receiver_secret).verify(BODY, headers)


def test_during_rotation_an_unrelated_secret_does_not_verify() -> None:
    headers = headers_now(Signer.from_secrets(NEW, OLD))
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY, headers)


def test_signature_headers_are_the_three_standard_webhooks_headers() -> None:
    signer = Signer((NEW,))
    headers = signature_headers(signer, MSG_ID, 1_700_000_000, BODY)
    assert headers == {
        "webhook-id": MSG_ID,
        "webhook-timestamp": "1700000000",
        "webhook-signature": signer.sign(MSG_ID, 1_700_000_000, BODY),
    }


def test_a_bare_string_is_one_secret_not_a_sequence_of_characters() -> None:
    signer = Signer(NEW)  # type: ignore[arg-type]
    assert signer.secrets == (NEW,)


def test_signer_accepts_unpadded_base64() -> None:
    unpadded = "whsec_" + base64.b64encode(bytes(range(32))).decode().rstrip("=")
    padded = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    assert Signer((unpadded,)).sign(MSG_ID, 1, BODY) == Signer((padded,)).sign(MSG_ID, 1, BODY)


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param(base64.b64encode(bytes(32)).decode(), id="no-prefix"),
        pytest.param("whsec_", id="empty"),
        pytest.param("whsec_not*base64!at#all", id="not-base64"),
        pytest.param("whsec_" + base64.b64encode(bytes(16)).decode(), id="too-short"),
        pytest.param("whsec_" + base64.b64encode(bytes(65)).decode(), id="too-long"),
    ],
)
def test_signer_rejects_a_malformed_secret_naming_the_field(secret: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Signer((secret,))
    assert caught.value.field == "signing_secret"


def test_signer_rejects_no_secrets() -> None:
    with pytest.raises(ValidationError) as caught:
        Signer(())
    assert caught.value.field == "signing_secret"


def test_signer_repr_hides_the_secrets() -> None:
    assert NEW.removeprefix("whsec_") not in repr(Signer((NEW,)))


@given(
    msg_id=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
    body=st.text(max_size=200),
    timestamp=st.integers(min_value=0, max_value=2**33),
)
def test_reference_library_computes_the_same_signature(msg_id: str, body: str, timestamp: int) -> None:
    expected = Webhook(NEW).sign(msg_id, datetime.fromtimestamp(timestamp, tz=UTC), body)
    assert Signer((NEW,)).sign(msg_id, timestamp, body.encode()) == expected


def test_signing_does_not_import_the_reference_library() -> None:
    assert not any(name.startswith("standardwebhooks") for name in imported_modules(SRC / "signing.py"))


# --- verify


def test_verify_accepts_a_signed_request() -> None:
    verify(NEW, headers_now(Signer((NEW,))), BODY)


@given(body=st.binary(max_size=500), timestamp=st.integers(min_value=0, max_value=2**33))
def test_verify_round_trips_any_body(body: bytes, timestamp: int) -> None:
    headers = signature_headers(Signer((NEW,)), MSG_ID, timestamp, body)
    verify(NEW, headers, body, now=timestamp)


def test_verify_accepts_a_reference_library_signature() -> None:
    now = datetime.now(tz=UTC)
    headers = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(NEW).sign(MSG_ID, now, BODY.decode()),
    }
    verify(NEW, headers, BODY)


def test_verify_accepts_the_spec_example() -> None:
    headers = {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TIMESTAMP),
        "webhook-signature": SPEC_SIGNATURE,
    }
    verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TIMESTAMP)


def test_verify_rejects_a_tampered_body() -> None:
    headers = headers_now(Signer((NEW,)))
    with pytest.raises(InvalidSignature, match="no matching"):
        verify(NEW, headers, BODY + b" ")


def test_verify_rejects_a_changed_message_id() -> None:
    headers = headers_now(Signer((NEW,))) | {"webhook-id": "another-id"}
    with pytest.raises(InvalidSignature):
        verify(NEW, headers, BODY)


def test_verify_rejects_the_wrong_secret() -> None:
    with pytest.raises(InvalidSignature):
        verify(OLD, headers_now(Signer((NEW,))), BODY)


def test_verify_rejects_a_timestamp_older_than_the_tolerance() -> None:
    headers = signature_headers(Signer((NEW,)), MSG_ID, 1_700_000_000, BODY)
    with pytest.raises(InvalidSignature, match="too old"):
        verify(NEW, headers, BODY, now=1_700_000_000 + 301)


def test_verify_rejects_a_timestamp_too_far_in_the_future() -> None:
    headers = signature_headers(Signer((NEW,)), MSG_ID, 1_700_000_000, BODY)
    with pytest.raises(InvalidSignature, match="future"):
        verify(NEW, headers, BODY, now=1_700_000_000 - 301)


@pytest.mark.parametrize("offset", [-300, 300])
def test_verify_accepts_a_timestamp_at_the_edge_of_the_tolerance(offset: int) -> None:
    headers = signature_headers(Signer((NEW,)), MSG_ID, 1_700_000_000, BODY)
    verify(NEW, headers, BODY, now=1_700_000_000 + offset)


def test_verify_honours_a_custom_tolerance() -> None:
    headers = signature_headers(Signer((NEW,)), MSG_ID, 1_700_000_000, BODY)
    with pytest.raises(InvalidSignature, match="too old"):
        verify(NEW, headers, BODY, now=1_700_000_000 + 11, tolerance_s=10)


def test_verify_uses_the_system_clock_by_default() -> None:
    headers = signature_headers(Signer((NEW,)), MSG_ID, int(time.time()) - 3600, BODY)
    with pytest.raises(InvalidSignature, match="too old"):
        verify(NEW, headers, BODY)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_verify_rejects_a_missing_header_naming_it(missing: str) -> None:
    headers = headers_now(Signer((NEW,)))
    del headers[missing]
    with pytest.raises(InvalidSignature, match=missing):
        verify(NEW, headers, BODY)


@pytest.mark.parametrize("timestamp", ["", "abc", "1700000000.5", "-1700000000", "\uff11\uff17\uff10\uff10"])
def test_verify_rejects_a_malformed_timestamp(timestamp: str) -> None:
    headers = headers_now(Signer((NEW,))) | {"webhook-timestamp": timestamp}
    with pytest.raises(InvalidSignature):
        verify(NEW, headers, BODY)


def test_verify_matches_header_names_case_insensitively() -> None:
    headers = {name.title(): value for name, value in headers_now(Signer((NEW,))).items()}
    assert set(headers) == {"Webhook-Id", "Webhook-Timestamp", "Webhook-Signature"}
    verify(NEW, headers, BODY)
    verify(NEW, {name.upper(): value for name, value in headers.items()}, BODY)


@pytest.mark.parametrize("receiver_secret", [OLD, NEW], ids=["old", "new"])
def test_verify_accepts_any_one_of_several_signatures(receiver_secret: str) -> None:
    verify(receiver_secret, headers_now(Signer.from_secrets(NEW, OLD)), BODY)


def test_verify_accepts_any_one_of_several_secrets() -> None:
    verify([generate_secret(), OLD], headers_now(Signer((OLD,))), BODY)


def test_verify_ignores_signatures_of_other_versions() -> None:
    headers = headers_now(Signer((NEW,)))
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v1a,")
    with pytest.raises(InvalidSignature, match="no matching"):
        verify(NEW, headers, BODY)


@pytest.mark.parametrize("junk", ["garbage", "v1,", "v1,!!notbase64!!", ",,,", "v1"])
def test_verify_skips_malformed_signature_entries(junk: str) -> None:
    headers = headers_now(Signer((NEW,)))
    headers["webhook-signature"] = f"{junk} {headers['webhook-signature']}"
    verify(NEW, headers, BODY)
    headers["webhook-signature"] = junk
    with pytest.raises(InvalidSignature):
        verify(NEW, headers, BODY)


def test_verify_accepts_a_secret_without_prefix_or_as_raw_bytes() -> None:
    headers = headers_now(Signer((NEW,)))
    verify(NEW.removeprefix("whsec_"), headers, BODY)
    verify(base64.b64decode(NEW.removeprefix("whsec_")), headers, BODY)


@pytest.mark.parametrize("secret", ["whsec_", "whsec_*not base64*", []], ids=["empty", "not-base64", "none"])
def test_verify_reports_a_bad_receiver_secret_as_configuration(secret: str | list[str]) -> None:
    with pytest.raises(ConfigError):
        verify(secret, headers_now(Signer((NEW,))), BODY)


def test_invalid_signature_is_a_taskcenter_error() -> None:
    assert issubclass(InvalidSignature, TaskCenterError)


def test_verify_imports_only_the_standard_library_and_taskcenter_errors() -> None:
    outside = {
        name
        for name in imported_modules(SRC / "verify.py")
        if name.split(".")[0] not in sys.stdlib_module_names and name != "taskcenter.errors"
    }
    assert outside == set()
