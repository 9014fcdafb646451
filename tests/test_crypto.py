"""Sensitive headers: detection, masking, and encryption at rest with key rotation (taskcenter.crypto)."""

from __future__ import annotations

import pytest
from cryptography.fernet import Fernet
from hypothesis import given
from hypothesis import strategies as st

from taskcenter.crypto import SecretBox, SecretKeyError, is_sensitive_header, mask_headers
from taskcenter.errors import ConfigError

OLD_KEY = SecretBox.generate_key()
NEW_KEY = SecretBox.generate_key()
TOKEN = "Bearer sk_live_51Habc"

header_names = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"), min_size=1
)
header_maps = st.dictionaries(
    header_names | st.sampled_from(["Authorization", "X-Api-Key", "Cookie"]), st.text()
)


# --- is_sensitive_header


@pytest.mark.parametrize(
    ("name", "sensitive"),
    [
        ("Authorization", True),
        ("authorization", True),
        ("Proxy-Authorization", True),
        ("Cookie", True),
        ("Set-Cookie", True),
        ("X-API-Key", True),
        ("x-api-key", True),
        ("Api-Key", True),
        ("X-Auth-Token", True),
        ("X-Access-Token", True),
        ("X-Client-Secret", True),
        ("X-Password", True),
        ("X-Passwd", True),
        ("X-Hub-Signature-256", True),
        ("webhook-signature", True),
        ("X-Custom-Auth", True),
        ("Idempotency-Key", False),
        ("idempotency-key", False),
        ("IDEMPOTENCY-KEY", False),
        ("webhook-id", False),
        ("Webhook-Id", False),
        ("Keep-Alive", False),
        ("WWW-Authenticate", False),
        ("Proxy-Authenticate", False),
        ("webhook-timestamp", False),
        ("Content-Type", False),
        ("User-Agent", False),
        ("X-Task-Id", False),
        ("X-Business-Id", False),
        ("traceparent", False),
    ],
)
def test_header_sensitivity(name: str, sensitive: bool) -> None:
    assert is_sensitive_header(name) is sensitive


# --- mask_headers


@pytest.mark.parametrize(
    ("name", "value", "masked"),
    [
        ("Authorization", "Bearer abc.def.ghi", "Bearer ***"),
        ("Authorization", "Basic dXNlcjpwYXNz", "Basic ***"),
        ("Proxy-Authorization", "Digest username=x, response=y", "Digest ***"),
        ("Authorization", "rawtokenwithoutscheme", "***"),
        ("Authorization", "", "***"),
        ("X-API-Key", "Bearer looks-like-a-scheme", "***"),
        ("Cookie", "session=abc", "***"),
        ("X-Auth-Token", "t0k3n", "***"),
        ("Idempotency-Key", "0b8f2a8e-2f5c-4c55-9a1b-7d3c2f0e9a11", "0b8f2a8e-2f5c-4c55-9a1b-7d3c2f0e9a11"),
        ("Content-Type", "application/json", "application/json"),
    ],
)
def test_mask_headers(name: str, value: str, masked: str) -> None:
    assert mask_headers({name: value}) == {name: masked}


def test_mask_headers_keeps_order_and_leaves_the_input_alone() -> None:
    headers = {"Content-Type": "application/json", "Authorization": TOKEN, "X-Task-Id": "t-1"}
    assert list(mask_headers(headers).items()) == [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer ***"),
        ("X-Task-Id", "t-1"),
    ]
    assert headers["Authorization"] == TOKEN


@given(header_maps)
def test_masked_headers_never_show_a_sensitive_value(headers: dict[str, str]) -> None:
    masked = mask_headers(headers)
    assert masked.keys() == headers.keys()
    for name, value in masked.items():
        if is_sensitive_header(name):
            assert value == "***" or value.endswith(" ***")
        else:
            assert value == headers[name]


# --- SecretBox: sealing


def test_sealed_value_is_fernet_prefixed_and_hides_the_clear_value() -> None:
    sealed = SecretBox([NEW_KEY]).seal(TOKEN)
    assert sealed.startswith("fernet:")
    assert "sk_live" not in sealed


@given(st.text())
def test_seal_then_open_round_trips(value: str) -> None:
    box = SecretBox([NEW_KEY])
    assert box.open(box.seal(value)) == value


def test_disabled_box_stores_with_a_plain_prefix() -> None:
    box = SecretBox.disabled()
    assert not box.enabled
    assert box.seal(TOKEN) == "plain:" + TOKEN
    assert box.open("plain:" + TOKEN) == TOKEN


def test_open_returns_a_raw_legacy_value_as_it_is() -> None:
    assert SecretBox([NEW_KEY]).open(TOKEN) == TOKEN
    assert SecretBox.disabled().open(TOKEN) == TOKEN


def test_enabled_box_opens_values_stored_while_disabled() -> None:
    assert SecretBox([NEW_KEY]).open(SecretBox.disabled().seal(TOKEN)) == TOKEN


def test_seal_headers_encrypts_only_sensitive_values() -> None:
    headers = {"Authorization": TOKEN, "Idempotency-Key": "uuid-1", "Content-Type": "application/json"}
    sealed = SecretBox([NEW_KEY]).seal_headers(headers)
    assert sealed["Authorization"].startswith("fernet:")
    assert sealed["Idempotency-Key"] == "uuid-1"
    assert sealed["Content-Type"] == "application/json"


@given(header_maps)
def test_open_headers_inverts_seal_headers(headers: dict[str, str]) -> None:
    box = SecretBox([NEW_KEY])
    assert box.open_headers(box.seal_headers(headers)) == headers


def test_repr_does_not_show_the_keys() -> None:
    assert NEW_KEY not in repr(SecretBox([NEW_KEY]))


# --- SecretBox: keys and rotation


def test_generated_key_is_a_usable_fernet_key() -> None:
    key = SecretBox.generate_key()
    Fernet(key)
    assert key != SecretBox.generate_key()


def test_every_key_decrypts() -> None:
    sealed_with_old = SecretBox([OLD_KEY]).seal(TOKEN)
    assert SecretBox([NEW_KEY, OLD_KEY]).open(sealed_with_old) == TOKEN


def test_the_first_key_encrypts() -> None:
    sealed = SecretBox([NEW_KEY, OLD_KEY]).seal(TOKEN)
    assert SecretBox([NEW_KEY]).open(sealed) == TOKEN
    with pytest.raises(SecretKeyError):
        SecretBox([OLD_KEY]).open(sealed)


def test_rotate_re_encrypts_with_the_newest_key() -> None:
    sealed_with_old = SecretBox([OLD_KEY]).seal(TOKEN)
    rotated = SecretBox([NEW_KEY, OLD_KEY]).rotate(sealed_with_old)
    assert rotated.startswith("fernet:")
    assert SecretBox([NEW_KEY]).open(rotated) == TOKEN
    with pytest.raises(SecretKeyError):
        SecretBox([OLD_KEY]).open(rotated)


@pytest.mark.parametrize("stored", ["plain:" + TOKEN, TOKEN], ids=["plain", "legacy"])
def test_rotate_encrypts_a_clear_value(stored: str) -> None:
    rotated = SecretBox([NEW_KEY]).rotate(stored)
    assert rotated.startswith("fernet:")
    assert SecretBox([NEW_KEY]).open(rotated) == TOKEN


def test_rotate_headers_rotates_only_sensitive_values() -> None:
    stored = SecretBox([OLD_KEY]).seal_headers({"Authorization": TOKEN, "Content-Type": "text/plain"})
    rotated = SecretBox([NEW_KEY, OLD_KEY]).rotate_headers(stored)
    assert rotated["Content-Type"] == "text/plain"
    assert SecretBox([NEW_KEY]).open_headers(rotated) == {
        "Authorization": TOKEN,
        "Content-Type": "text/plain",
    }


def test_rotate_with_the_wrong_key_is_a_secret_key_error() -> None:
    with pytest.raises(SecretKeyError):
        SecretBox([NEW_KEY]).rotate(SecretBox([OLD_KEY]).seal(TOKEN))


def test_wrong_key_is_a_config_error_naming_the_setting() -> None:
    sealed = SecretBox([OLD_KEY]).seal(TOKEN)
    with pytest.raises(SecretKeyError, match="TASKCENTER_SECRET_KEY cannot decrypt") as caught:
        SecretBox([NEW_KEY]).open(sealed)
    assert isinstance(caught.value, ConfigError)


def test_corrupt_ciphertext_is_a_secret_key_error() -> None:
    with pytest.raises(SecretKeyError):
        SecretBox([NEW_KEY]).open("fernet:not-a-token-é")


def test_disabled_box_cannot_open_an_encrypted_value() -> None:
    sealed = SecretBox([NEW_KEY]).seal(TOKEN)
    with pytest.raises(SecretKeyError, match="TASKCENTER_SECRET_KEY is not set"):
        SecretBox.disabled().open(sealed)


def test_open_headers_with_the_wrong_key_is_a_secret_key_error() -> None:
    stored = SecretBox([OLD_KEY]).seal_headers({"Authorization": TOKEN})
    with pytest.raises(SecretKeyError):
        SecretBox([NEW_KEY]).open_headers(stored)


def test_a_box_needs_at_least_one_key() -> None:
    with pytest.raises(ConfigError):
        SecretBox([])


# --- SecretBox.from_setting


@pytest.mark.parametrize("setting", [None, "", "  ", " , "])
def test_no_setting_gives_a_disabled_box(setting: str | None) -> None:
    box = SecretBox.from_setting(setting)
    assert not box.enabled
    assert box.seal(TOKEN) == "plain:" + TOKEN


def test_setting_lists_keys_newest_first() -> None:
    box = SecretBox.from_setting(f" {NEW_KEY} , {OLD_KEY} ")
    assert box.enabled
    assert box.open(SecretBox([OLD_KEY]).seal(TOKEN)) == TOKEN
    assert SecretBox([NEW_KEY]).open(box.seal(TOKEN)) == TOKEN


def test_a_malformed_key_in_the_setting_is_a_config_error_that_hides_it() -> None:
    with pytest.raises(ConfigError, match="TASKCENTER_SECRET_KEY entry 2") as caught:
        SecretBox.from_setting(f"{NEW_KEY},not-a-fernet-key")
    assert "not-a-fernet-key" not in str(caught.value)


def test_unopened_names_the_sensitive_values_no_key_opens_in_their_order() -> None:
    """What a held task's ``last_error`` names: the headers whose values do not open, never their values."""
    old, new = SecretBox([Fernet.generate_key()]), SecretBox([Fernet.generate_key()])
    stored = {
        "X-API-Key": old.seal("k"),
        "Authorization": old.seal("Bearer t"),
        "Cookie": new.seal("c=1"),
        "X-Trace": "not-sealed",
        "X-Token": "plain:clear",
    }
    assert new.unopened(stored) == ["X-API-Key", "Authorization"]
    assert SecretBox.disabled().unopened(stored) == ["X-API-Key", "Authorization", "Cookie"]
    assert old.unopened(old.seal_headers({"Authorization": "Bearer t"})) == []
