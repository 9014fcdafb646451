"""The outbound request: URL and header validation, body encoding, the target host and the added headers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskcenter.domain.request import (
    MAX_TIMEOUT_S,
    MAX_URL_LENGTH,
    RESERVED_HEADERS,
    build_request,
    delivery_headers,
    encode_body,
    target_host,
    validate_headers,
    validate_timeout,
    validate_url,
)
from taskcenter.errors import ValidationError

# -- URL --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com/hook",
        "http://api.example.com",
        "HTTPS://API.EXAMPLE.COM/Path?q=1#frag",
        "https://api.example.com:8443/x",
        "http://10.0.0.1/x",  # the SSRF guard judges addresses at send time, not here
        "http://[2001:db8::1]:8080/x",
        "https://bücher.example/x",
    ],
)
def test_valid_urls_are_returned_unchanged(url: str) -> None:
    assert validate_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/file",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "gopher://example.com/",
        "//example.com/no-scheme",
        "example.com/no-scheme",
    ],
)
def test_only_http_and_https_schemes_are_accepted(url: str) -> None:
    with pytest.raises(ValidationError, match="http or https") as caught:
        validate_url(url)
    assert caught.value.field == "url"


@pytest.mark.parametrize("url", ["http://", "https:///path", "http://:8080/x", "https://?q=1"])
def test_a_url_without_host_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="no host") as caught:
        validate_url(url)
    assert caught.value.field == "url"


@pytest.mark.parametrize(
    "url",
    ["https://user:secret@example.com/", "https://user@example.com/", "https://:secret@example.com/"],
)
def test_credentials_in_the_url_are_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="credentials"):
        validate_url(url)


@pytest.mark.parametrize("char", ["\r", "\n", "\t", "\x00", " ", "\x01", "\x08", "\x1b", "\x1f", "\x7f"])
def test_control_characters_and_spaces_in_the_url_are_refused(char: str) -> None:
    with pytest.raises(ValidationError, match="control characters") as caught:
        validate_url(f"https://example.com/a{char}b")
    assert caught.value.field == "url"


@pytest.mark.parametrize("url", ["https://example.com:0/", "https://example.com:65536/", "http://[::1/"])
def test_bad_ports_and_broken_brackets_are_refused(url: str) -> None:
    with pytest.raises(ValidationError):
        validate_url(url)


def test_a_huge_url_is_refused() -> None:
    url = "https://example.com/" + "a" * MAX_URL_LENGTH
    with pytest.raises(ValidationError, match="longer than"):
        validate_url(url)


def test_a_url_of_the_maximum_length_is_accepted() -> None:
    url = "https://example.com/"
    url += "a" * (MAX_URL_LENGTH - len(url))
    assert validate_url(url) == url


@pytest.mark.parametrize("value", [None, "", 42, b"https://example.com/", ["https://example.com/"]])
def test_a_url_must_be_a_non_empty_string(value: Any) -> None:
    with pytest.raises(ValidationError, match="non-empty string"):
        validate_url(value)


def test_url_errors_name_the_callers_field() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_url("ftp://x", field="notify.url")
    assert caught.value.field == "notify.url"


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://API.Example.com/hook", "api.example.com:443"),
        ("http://api.example.com/hook", "api.example.com:80"),
        ("https://api.example.com:8443/hook", "api.example.com:8443"),
        ("http://127.0.0.1:9000/", "127.0.0.1:9000"),
        ("http://[2001:DB8::1]/", "[2001:db8::1]:80"),
        ("https://[::1]:8443/", "[::1]:8443"),
    ],
)
def test_target_host_is_host_and_port_with_the_scheme_default(url: str, host: str) -> None:
    assert target_host(url) == host


# -- headers ----------------------------------------------------------------------------------------------


def test_headers_are_kept_as_given() -> None:
    headers = {"Authorization": "Bearer x", "X-Custom": "1", "User-Agent": "mine/1.0", "traceparent": "t"}
    assert validate_headers(headers) == headers


def test_no_headers_is_an_empty_mapping() -> None:
    assert validate_headers(None) == {}


@pytest.mark.parametrize("name", sorted(RESERVED_HEADERS))
def test_reserved_headers_cannot_be_given(name: str) -> None:
    for spelled in (name, name.upper(), name.title()):
        with pytest.raises(ValidationError, match="set by taskcenter") as caught:
            validate_headers({spelled: "forged"})
        assert caught.value.field == f"headers.{spelled}"


def test_the_idempotency_and_signature_headers_are_reserved() -> None:
    assert {"idempotency-key", "x-task-id", "x-task-attempt", "webhook-signature"} <= RESERVED_HEADERS


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b"])
def test_line_breaks_in_header_values_are_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="line break") as caught:
        validate_headers({"X-Custom": value})
    assert caught.value.field == "headers.X-Custom"


@pytest.mark.parametrize("char", ["\x01", "\x0b", "\x1b", "\x1f", "\x7f"])
def test_control_characters_in_header_values_and_content_type_are_refused(char: str) -> None:
    # The HTTP client refuses to send them: each attempt failed as a network error until the budget ran out.
    with pytest.raises(ValidationError, match="control character") as caught:
        validate_headers({"X-Custom": f"a{char}b"})
    assert caught.value.field == "headers.X-Custom"
    with pytest.raises(ValidationError) as caught:
        encode_body(body="x", content_type=f"text/plain{char}")
    assert caught.value.field == "content_type"


def test_a_tab_in_a_header_value_is_kept() -> None:
    assert validate_headers({"X-Custom": "a\tb"}) == {"X-Custom": "a\tb"}


@pytest.mark.parametrize("name", ["", "X Custom", "X:Custom", "X-Custom\r\n", "X-Ünicode", "X\tY"])
def test_invalid_header_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match="invalid header name"):
        validate_headers({name: "v"})


@pytest.mark.parametrize("value", [1, None, ["a"], b"bytes"])
def test_header_values_must_be_strings(value: Any) -> None:
    with pytest.raises(ValidationError, match="must be a string") as caught:
        validate_headers({"X-Custom": value})
    assert caught.value.field == "headers.X-Custom"


def test_headers_must_be_an_object() -> None:
    with pytest.raises(ValidationError) as caught:
        validate_headers([("X-Custom", "1")])
    assert caught.value.field == "headers"


# -- body -------------------------------------------------------------------------------------------------


def test_json_is_encoded_compactly_as_application_json() -> None:
    assert encode_body(json_body={"order": 123, "name": "é"}) == (
        '{"order":123,"name":"é"}',
        "application/json",
    )


def test_an_explicit_json_null_is_a_body() -> None:
    assert encode_body(json_body=None, has_json=True) == ("null", "application/json")


def test_json_keeps_a_given_content_type() -> None:
    assert encode_body(json_body=[1], content_type="application/vnd.api+json") == (
        "[1]",
        "application/vnd.api+json",
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1, 2}, object()])
def test_json_that_cannot_be_encoded_is_refused(value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        encode_body(json_body={"v": value})
    assert caught.value.field == "json"


def test_form_is_url_encoded() -> None:
    text, ctype = encode_body(form={"a": "x y", "n": 1, "ok": True, "no": False, "f": 1.5})
    assert text == "a=x+y&n=1&ok=true&no=false&f=1.5"
    assert ctype == "application/x-www-form-urlencoded"


@pytest.mark.parametrize("form", [{"a": {"nested": 1}}, {"a": [1, 2]}, {"a": None}, ["a", "b"], "a=b"])
def test_form_must_be_an_object_of_scalars(form: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        encode_body(form=form)
    assert caught.value.field == "form"


def test_raw_body_is_sent_with_its_content_type() -> None:
    xml = "<order id='1'/>"
    assert encode_body(body=xml, content_type="application/xml") == (xml, "application/xml")


def test_raw_body_defaults_to_plain_text() -> None:
    assert encode_body(body="hi") == ("hi", "text/plain; charset=utf-8")


def test_raw_body_must_be_text() -> None:
    with pytest.raises(ValidationError) as caught:
        encode_body(body={"a": 1})
    assert caught.value.field == "body"


def test_no_body_is_none() -> None:
    assert encode_body() == (None, None)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"json_body": {"a": 1}, "form": {"a": "1"}}, "form"),
        ({"json_body": {"a": 1}, "body": "x"}, "body"),
        ({"form": {"a": "1"}, "body": "x"}, "body"),
        ({"json_body": None, "has_json": True, "body": "x"}, "body"),
        ({"json_body": {"a": 1}, "body": ""}, "body"),
        ({"json_body": {"a": 1}, "form": {}}, "form"),
        ({"form": {}, "body": ""}, "body"),
    ],
)
def test_json_form_and_body_are_mutually_exclusive(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match="only one of") as caught:
        encode_body(**kwargs)
    assert caught.value.field == field


@pytest.mark.parametrize("ctype", ["text/plain\r\nX-Injected: 1", 5])
def test_content_type_must_be_a_single_line_string(ctype: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        encode_body(body="x", content_type=ctype)
    assert caught.value.field == "content_type"


# -- whole request ----------------------------------------------------------------------------------------


def test_build_request_normalises_the_method_and_computes_the_host() -> None:
    spec = build_request("post", "https://api.example.com/hook", {"X-A": "1"}, json_body={"id": 1})
    assert (spec.method, spec.host, spec.body, spec.content_type) == (
        "POST",
        "api.example.com:443",
        '{"id":1}',
        "application/json",
    )
    assert spec.headers == {"X-A": "1"}


@pytest.mark.parametrize("method", ["GET", "get", "HEAD"])
@pytest.mark.parametrize(
    "body", [{"json_body": {"a": 1}}, {"form": {"a": "1"}}, {"body": "x"}, {"body": ""}, {"has_json": True}]
)
def test_get_and_head_cannot_carry_a_body(method: str, body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="cannot carry a body") as caught:
        build_request(method, "https://example.com/", **body)
    assert caught.value.field == "method"


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
def test_methods_without_a_body_are_fine(method: str) -> None:
    spec = build_request(method, "https://example.com/")
    assert spec.body is None


@pytest.mark.parametrize("method", ["CONNECT", "TRACE", "OPTIONS ", "", None, 1])
def test_unknown_methods_are_refused(method: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        build_request(method, "https://example.com/")
    assert caught.value.field == "method"


def test_build_request_checks_the_url() -> None:
    with pytest.raises(ValidationError) as caught:
        build_request("POST", "https://user:pw@example.com/")
    assert caught.value.field == "url"


def test_build_request_checks_the_headers() -> None:
    with pytest.raises(ValidationError) as caught:
        build_request("POST", "https://example.com/", {"Idempotency-Key": "mine"})
    assert caught.value.field == "headers.Idempotency-Key"


# -- delivery headers -------------------------------------------------------------------------------------


def deliver(stored: dict[str, str], **kwargs: Any) -> dict[str, str]:
    args: dict[str, Any] = {
        "task_uuid": "6f1c-uuid",
        "attempt": 2,
        "business_id": "order-1",
        "content_type": "application/json",
        "user_agent": "taskcenter/0.1.0",
    }
    args.update(kwargs)
    return delivery_headers(stored, **args)


def test_delivery_adds_idempotency_key_task_id_attempt_and_business_id() -> None:
    headers = deliver({"X-Custom": "1"})
    assert headers["Idempotency-Key"] == headers["X-Task-Id"] == "6f1c-uuid"
    assert headers["X-Task-Attempt"] == "2"
    assert headers["X-Business-Id"] == "order-1"
    assert headers["X-Custom"] == "1"
    assert headers["User-Agent"] == "taskcenter/0.1.0"
    assert headers["Content-Type"] == "application/json"


def test_the_tasks_own_user_agent_and_content_type_win_whatever_their_case() -> None:
    headers = deliver({"user-agent": "mine/2", "content-type": "text/xml"})
    assert headers["user-agent"] == "mine/2"
    assert headers["content-type"] == "text/xml"
    assert "User-Agent" not in headers
    assert "Content-Type" not in headers


def test_traceparent_is_added_only_when_known() -> None:
    assert "traceparent" not in deliver({})
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert deliver({}, traceparent=tp)["traceparent"] == tp


def test_no_content_type_without_a_body() -> None:
    assert "Content-Type" not in deliver({}, content_type=None)


# -- timeout ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.1, 1, 10, MAX_TIMEOUT_S])
def test_timeouts_up_to_thirty_seconds_are_accepted(value: float) -> None:
    assert validate_timeout(value) == float(value)


@pytest.mark.parametrize(
    "value", [0, -1, MAX_TIMEOUT_S + 0.001, float("nan"), float("inf"), True, "10", None]
)
def test_other_timeouts_are_refused(value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_timeout(value)
    assert caught.value.field == "timeout"


def test_timeout_cap_can_be_lowered() -> None:
    with pytest.raises(ValidationError, match="at most 5"):
        validate_timeout(6, cap=5)


@given(st.text(max_size=40))
def test_the_url_character_check_is_the_rule_it_states(text: str) -> None:
    # Whitespace (the space), any C0 control or DEL — and nothing else, non-ASCII included.
    from taskcenter.domain.request import _BAD_URL_CHARACTER

    expected = any(c == " " or c == "\x7f" or c < " " for c in text)
    assert (_BAD_URL_CHARACTER.search(text) is not None) == expected
