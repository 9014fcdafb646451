"""Intake: a create (or PATCH) request becomes a validated task row, or a ValidationError naming the field."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from taskcenter.crypto import SecretBox
from taskcenter.domain.retry import RetryPolicy
from taskcenter.errors import ValidationError
from taskcenter.intake import (
    MAX_DELAY_S,
    MAX_METADATA_BYTES,
    MAX_PAYLOAD_BYTES,
    PRIORITY_RANGE,
    Defaults,
    RequestMemo,
    changed_values,
    new_task_row,
    new_uuids,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
DEFAULTS = Defaults(retry=RetryPolicy.fixed(interval=10, max_attempts=3))
URL = "https://api.example.com/hook"


def make(data: Mapping[str, Any], *, box: SecretBox | None = None, **kwargs: Any) -> dict[str, Any]:
    return new_task_row(
        {"business_id": "order-1", "url": URL, **data},
        business_pk=7,
        defaults=DEFAULTS,
        box=box or SecretBox.disabled(),
        now=NOW,
        **kwargs,
    )


def refused(data: Mapping[str, Any], **kwargs: Any) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        make(data, **kwargs)
    return caught.value


# -- the row ----------------------------------------------------------------------------------------------


def test_a_minimal_create_is_a_pending_post_due_now() -> None:
    row = make({})
    assert row["status"] == "pending"
    assert (row["method"], row["url"], row["host"]) == ("POST", URL, "api.example.com:443")
    assert row["business_pk"] == 7
    assert row["business_id"] == "order-1"
    assert row["type"] == "http"
    assert row["attempts"] == 0
    assert row["next_attempt_at"] == NOW
    assert row["scheduled_at"] is None
    assert row["created_at"] == row["updated_at"] == NOW
    assert row["body"] is None


def test_each_row_gets_its_own_uuid() -> None:
    assert make({})["uuid"] != make({})["uuid"]


def test_uuids_drawn_at_once_are_distinct_canonical_version_4_uuids() -> None:
    drawn = new_uuids(2000)
    assert len(set(drawn)) == 2000
    for text in drawn:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert make({}, task_uuid=drawn[0])["uuid"] == drawn[0]


def test_the_retry_policy_defaults_to_the_given_defaults() -> None:
    row = make({})
    assert row["retry"] == DEFAULTS.retry.to_dict()
    assert row["max_attempts"] == 3


def test_a_retry_policy_object_or_json_is_stored_in_json_form() -> None:
    policy = RetryPolicy.from_intervals([60, 300])
    assert make({"retry": policy})["retry"] == policy.to_dict()
    row = make({"retry": {"strategy": "intervals", "intervals": [60, 300]}})
    assert row["retry"] == policy.to_dict()
    assert row["max_attempts"] == 3


def test_an_invalid_retry_policy_names_its_field() -> None:
    assert refused({"retry": {"max_attempts": 12}}).field == "retry.max_attempts"
    assert refused({"retry": "often"}).field == "retry"


def test_json_body_is_encoded() -> None:
    row = make({"json": {"order": 123}})
    assert (row["body"], row["content_type"]) == ('{"order":123}', "application/json")


def test_form_and_body_are_encoded() -> None:
    assert make({"form": {"a": "1"}})["body"] == "a=1"
    assert make({"body": "<x/>", "content_type": "application/xml"})["content_type"] == "application/xml"


def test_json_with_form_is_refused() -> None:
    assert refused({"json": {"a": 1}, "form": {"a": "1"}}).field == "form"


def test_get_with_a_body_is_refused() -> None:
    assert refused({"method": "GET", "json": {"a": 1}}).field == "method"


def test_sensitive_header_values_are_sealed_with_the_box() -> None:
    box = SecretBox([SecretBox.generate_key()])
    row = make({"headers": {"Authorization": "Bearer secret", "X-Plain": "1"}}, box=box)
    assert row["headers"]["X-Plain"] == "1"
    assert "secret" not in row["headers"]["Authorization"]
    assert box.open_headers(row["headers"])["Authorization"] == "Bearer secret"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"url": "ftp://example.com/"}, "url"),
        ({"url": "https://u:p@example.com/"}, "url"),
        ({"url": "https://example.com/\x01"}, "url"),
        ({"url": None}, "url"),
        ({"headers": {"Host": "evil"}}, "headers.Host"),
        ({"headers": {"X-A": "a\r\nb"}}, "headers.X-A"),
        ({"method": "BREW"}, "method"),
        ({"timeout": 31}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"follow_redirects": "yes"}, "follow_redirects"),
        ({"success_codes": []}, "success_codes"),
        ({"success_codes": [99]}, "success_codes"),
        ({"success_codes": [True]}, "success_codes"),
        ({"retry_on": [200]}, "retry_on"),
        ({"retry_on": "409"}, "retry_on"),
        ({"type": ["http"]}, "type"),
        ({"shape": "round"}, "shape"),
        ({"payload": {"a": 1}}, "payload"),
    ],
)
def test_invalid_input_names_the_field(data: dict[str, Any], field: str) -> None:
    assert refused(data).field == field


def test_a_timeout_cap_lower_than_the_global_one_applies() -> None:
    with pytest.raises(ValidationError) as caught:
        new_task_row(
            {"business_id": "b", "url": URL, "timeout": 10},
            business_pk=1,
            defaults=Defaults(retry=RetryPolicy(), max_timeout_s=5),
            box=SecretBox.disabled(),
            now=NOW,
        )
    assert caught.value.field == "timeout"


def test_status_code_lists_are_sorted_and_deduplicated() -> None:
    row = make({"success_codes": [202, 200, 202], "retry_on": [409, 404]})
    assert (row["success_codes"], row["retry_on"]) == ([200, 202], [404, 409])


# -- business_id ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", 5, "x" * 256, "a\nb", "a\x00b", "a\x7fb"])
def test_business_id_must_be_a_printable_string_of_1_to_255_characters(value: Any) -> None:
    assert refused({"business_id": value}).field == "business_id"


def test_business_id_of_255_characters_is_accepted() -> None:
    assert make({"business_id": "x" * 255})["business_id"] == "x" * 255


# -- delay and scheduled_at -------------------------------------------------------------------------------


@pytest.mark.parametrize("delay", [600, 600.0, timedelta(minutes=10)])
def test_delay_schedules_the_first_attempt_later(delay: Any) -> None:
    row = make({"delay": delay})
    assert row["next_attempt_at"] == NOW + timedelta(minutes=10)
    assert row["scheduled_at"] == NOW + timedelta(minutes=10)


def test_zero_delay_is_due_now_and_unscheduled() -> None:
    row = make({"delay": 0})
    assert (row["next_attempt_at"], row["scheduled_at"]) == (NOW, None)


@pytest.mark.parametrize(
    "delay", [-1, MAX_DELAY_S + 1, float("nan"), float("inf"), True, "600", timedelta(seconds=-1)]
)
def test_bad_delays_are_refused(delay: Any) -> None:
    assert refused({"delay": delay}).field == "delay"


@pytest.mark.parametrize(
    "value",
    ["2030-01-02T12:00:00Z", "2030-01-02T13:00:00+01:00", datetime(2030, 1, 2, 12, 0, tzinfo=UTC)],
)
def test_scheduled_at_sets_the_due_time_in_utc(value: Any) -> None:
    row = make({"scheduled_at": value})
    assert row["next_attempt_at"] == datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
    assert row["scheduled_at"] == datetime(2030, 1, 2, 12, 0, tzinfo=UTC)
    assert row["scheduled_at"].utcoffset() == timedelta(0)


def test_scheduled_at_in_the_past_is_due_now() -> None:
    row = make({"scheduled_at": "2020-01-01T00:00:00Z"})
    assert row["next_attempt_at"] == NOW
    assert row["scheduled_at"] == datetime(2020, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "value",
    [
        "2030-01-02T12:00:00",  # no time zone
        datetime(2030, 1, 2, 12, 0),
        "tomorrow",
        1893456000,
        1893456000.5,
        "1893456000",  # a Unix time as text
        "20300102T120000Z",  # ISO 8601 basic format: not RFC 3339, and the API refused it already
        "2030-W01-1T12:00:00Z",  # an ISO week date
        "2030-01-02",  # a date alone
        "2030-13-02T12:00:00Z",
        "2032-01-01T00:00:00Z",  # more than a year ahead
        "0001-01-01T00:00:00+01:00",  # has no UTC form
    ],
)
def test_bad_scheduled_at_is_refused(value: Any) -> None:
    assert refused({"scheduled_at": value}).field == "scheduled_at"


def test_delay_and_scheduled_at_together_are_refused() -> None:
    assert refused({"delay": 60, "scheduled_at": "2030-01-02T00:00:00Z"}).field == "delay"


# -- priority ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("priority", [PRIORITY_RANGE[0], -1, 0, 1, PRIORITY_RANGE[1]])
def test_priorities_within_bounds_are_kept(priority: int) -> None:
    assert make({"priority": priority})["priority"] == priority


@pytest.mark.parametrize(
    "priority", [PRIORITY_RANGE[0] - 1, PRIORITY_RANGE[1] + 1, 2**80, 1.5, True, "1", None]
)
def test_priorities_out_of_bounds_or_not_integers_are_refused(priority: Any) -> None:
    assert refused({"priority": priority}).field == "priority"


# -- the URL's host ---------------------------------------------------------------------------------------

BAD_HOSTS = [
    "https://./",
    "http://..",
    "http://-/",
    "http://a..b/",
    "http://.example.com/",
    "http://bad-.example.com/",
    "http://exa!mple.com/",
    "http://%41.example/",
    "http://*.example.com/",
    "http://" + "a" * 64 + ".example/",  # a label longer than 63
    "http://999.1.1.1/",  # looks like an IPv4 address but is none
    "http://1.2.3.4.5/",
    "http://b\u00fccher..example/",
]
GOOD_HOSTS = [
    "http://localhost/",
    "http://localhost:8080/x",
    "https://API.Example.COM:8443/hook",
    "http://example.com./",  # a fully qualified name
    "http://my_service:8080/",  # Docker-style names carry underscores
    "http://[::1]:8080/",
    "http://[2001:db8::1]/",
    "http://[fe80::1%25eth0]/",
    "http://[::ffff:192.0.2.1]/",
    "http://192.0.2.1:81/",
    "http://127.1/",  # inet_aton's short form: the guard reads it as 127.0.0.1
    "https://b\u00fccher.example/",  # IDNA, as text
    "https://xn--bcher-kva.example/",  # IDNA, encoded
    "https://\u4f8b\u3048.\u30c6\u30b9\u30c8/",
    "https://a-b.c-d.example/",
]


@pytest.mark.parametrize("url", BAD_HOSTS)
def test_a_url_whose_host_is_no_host_name_is_refused(url: str) -> None:
    """Such URLs were stored, and then every attempt failed."""
    assert refused({"url": url}).field == "url"
    assert refused({"notify": {"url": url}}).field == "notify.url"
    with pytest.raises(ValidationError) as caught:
        change({"url": url})
    assert caught.value.field == "url"


@pytest.mark.parametrize("url", GOOD_HOSTS)
def test_ip_literals_idna_names_ports_and_localhost_are_accepted(url: str) -> None:
    assert make({"url": url, "notify": {"url": url}})["url"] == url
    assert change({"url": url})["url"] == url


# -- notify -----------------------------------------------------------------------------------------------


def test_notify_defaults_to_succeeded_and_failed() -> None:
    row = make({"notify": {"url": "https://hooks.example.com/done"}})
    assert row["notify"] == {"url": "https://hooks.example.com/done", "on": ["failed", "succeeded"]}


def test_notify_by_email() -> None:
    row = make({"notify": {"email": "ops@example.com", "on": ["failed", "failed"]}}, email=True)
    assert row["notify"] == {"email": "ops@example.com", "on": ["failed"]}


def test_notify_by_email_is_refused_without_an_smtp_server() -> None:
    """Accepted and never sent, as before there was an SMTP setting, would lose the notification silently."""
    error = refused({"notify": {"email": "ops@example.com"}})
    assert error.field == "notify.email" and "SMTP" in error.message
    current = make({})
    with pytest.raises(ValidationError) as caught:
        changed_values(
            {"notify": {"email": "ops@example.com"}},
            current,
            defaults=DEFAULTS,
            box=SecretBox.disabled(),
            now=NOW,
        )
    assert caught.value.field == "notify.email"


@pytest.mark.parametrize(
    "address",
    ["a@b.example, c@d.example", "a@b.example;c@d.example", "Ops <ops@example.com>", "ops@example.com\n",
     "ops@example.com\r\nBcc: x@y.example", "ops @example.com", "x", "@example.com", "ops@", "ops@-x.example",
     "a" * 65 + "@example.com", "ops@" + "x" * 250 + ".example"],
)  # fmt: skip
def test_notify_email_is_one_plain_address(address: str) -> None:
    assert refused({"notify": {"email": address}}, email=True).field == "notify.email"


def test_a_taskcenter_task_type_cannot_be_created_or_changed() -> None:
    error = refused({"type": "taskcenter.email", "url": None, "payload": {"to": "a@b.example"}},
                    processors=frozenset({"resize"}))  # fmt: skip
    assert error.field == "type" and "taskcenter's own" in error.message
    current = {**make({}), "type": "taskcenter.email"}
    with pytest.raises(ValidationError) as caught:
        changed_values({"priority": 5}, current, defaults=DEFAULTS, box=SecretBox.disabled(), now=NOW)
    assert caught.value.field == "type"


@pytest.mark.parametrize(
    ("notify", "field"),
    [
        ("https://hooks.example.com/", "notify"),
        ({}, "notify"),
        ({"on": ["failed"]}, "notify"),
        ({"url": "https://h.example/", "channel": "x"}, "notify"),
        ({"url": "ftp://h.example/"}, "notify.url"),
        ({"url": "https://u:p@h.example/"}, "notify.url"),
        ({"email": "nobody"}, "notify.email"),
        ({"email": "nobody@example.com"}, "notify.email"),  # no SMTP server configured
        ({"email": 5}, "notify.email"),
        ({"url": "https://h.example/", "on": []}, "notify.on"),
        ({"url": "https://h.example/", "on": "failed"}, "notify.on"),
        ({"url": "https://h.example/", "on": ["exploded"]}, "notify.on"),
        ({"url": "https://h.example/", "on": [{"event": "failed"}]}, "notify.on"),
        ({"url": "https://h.example/", "on": [["failed"]]}, "notify.on"),
    ],
)
def test_invalid_notify_names_the_field(notify: Any, field: str) -> None:
    assert refused({"notify": notify}).field == field


# -- metadata ---------------------------------------------------------------------------------------------


def test_metadata_is_kept() -> None:
    assert make({"metadata": {"order": "123", "n": [1, 2]}})["metadata"] == {"order": "123", "n": [1, 2]}


def test_metadata_over_the_size_limit_is_refused() -> None:
    error = refused({"metadata": {"blob": "x" * MAX_METADATA_BYTES}})
    assert error.field == "metadata"
    assert "larger than" in error.message


def test_metadata_just_under_the_size_limit_is_accepted() -> None:
    blob = "x" * (MAX_METADATA_BYTES - len('{"blob":""}'))
    assert make({"metadata": {"blob": blob}})["metadata"] == {"blob": blob}


@pytest.mark.parametrize("metadata", [["a"], "text", 5, {1: "non-string key"}, {"big": 2**70}, {"s": {1, 2}}])
def test_metadata_must_be_a_json_object(metadata: Any) -> None:
    assert refused({"metadata": metadata}).field == "metadata"


# -- traceparent ------------------------------------------------------------------------------------------


def test_a_valid_traceparent_is_kept_and_a_malformed_one_dropped() -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert make({}, traceparent=tp)["traceparent"] == tp
    assert make({}, traceparent="garbage")["traceparent"] is None


# -- processor tasks --------------------------------------------------------------------------------------

PROCESSORS = frozenset({"create_server"})


def make_processor_task(data: Mapping[str, Any]) -> dict[str, Any]:
    return new_task_row(
        {"business_id": "srv-1", "type": "create_server", **data},
        business_pk=7,
        defaults=DEFAULTS,
        box=SecretBox.disabled(),
        now=NOW,
        processors=PROCESSORS,
    )


def test_a_processor_task_stores_its_payload_and_no_request() -> None:
    row = make_processor_task({"payload": {"size": "large"}})
    assert row["type"] == "create_server"
    assert row["payload"] == {"size": "large"}
    assert row["host"] == "processor:create_server"
    assert (row["url"], row["method"], row["body"], row["headers"]) == (None, None, None, None)


def test_an_unregistered_processor_type_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        make_processor_task({"type": "delete_server", "payload": {}})
    assert caught.value.field == "type"


@pytest.mark.parametrize("name", ["url", "json", "form", "body", "headers"])
def test_a_processor_task_takes_no_request_fields(name: str) -> None:
    value = {"url": URL, "json": {"a": 1}, "form": {"a": "1"}, "body": "x", "headers": {"X-A": "1"}}[name]
    with pytest.raises(ValidationError) as caught:
        make_processor_task({"payload": {}, name: value})
    assert caught.value.field == name


def test_a_processor_payload_over_one_mebibyte_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        make_processor_task({"payload": "x" * MAX_PAYLOAD_BYTES})
    assert caught.value.field == "payload"


# -- changes (PATCH) --------------------------------------------------------------------------------------


def change(data: Mapping[str, Any], current: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return changed_values(
        data, current or make({"json": {"a": 1}}), defaults=DEFAULTS, box=SecretBox.disabled(), now=NOW
    )


def test_a_change_touches_only_what_it_names() -> None:
    assert change({"priority": 5}) == {"priority": 5, "updated_at": NOW}


def test_changing_the_url_keeps_the_body_and_recomputes_the_host() -> None:
    values = change({"url": "https://other.example:8443/x"})
    assert values["host"] == "other.example:8443"
    assert (values["body"], values["content_type"]) == ('{"a":1}', "application/json")


def test_changing_the_body_replaces_it() -> None:
    values = change({"form": {"b": "2"}})
    assert (values["body"], values["content_type"]) == ("b=2", "application/x-www-form-urlencoded")


def test_changing_to_get_while_a_body_remains_is_refused() -> None:
    with pytest.raises(ValidationError) as caught:
        change({"method": "GET"})
    assert caught.value.field == "method"


def test_a_delay_change_reschedules() -> None:
    values = change({"delay": 60})
    assert values["next_attempt_at"] == NOW + timedelta(seconds=60)


def test_an_empty_change_is_refused() -> None:
    with pytest.raises(ValidationError, match="nothing to change"):
        change({})


@pytest.mark.parametrize("name", ["business_id", "type", "status", "attempts"])
def test_fields_that_cannot_change_are_refused(name: str) -> None:
    with pytest.raises(ValidationError) as caught:
        change({name: "x"})
    assert caught.value.field == name


def test_a_retry_budget_already_spent_is_refused() -> None:
    current = {**make({}), "attempts": 2}
    with pytest.raises(ValidationError) as caught:
        change({"retry": {"strategy": "fixed", "interval": 1, "max_attempts": 2}}, current)
    assert caught.value.field == "retry.max_attempts"
    assert (
        change({"retry": {"strategy": "fixed", "interval": 1, "max_attempts": 3}}, current)["max_attempts"]
        == 3
    )


def test_a_processor_task_has_no_request_to_change() -> None:
    current = make_processor_task({"payload": {}})
    with pytest.raises(ValidationError) as caught:
        change({"url": URL}, current)
    assert caught.value.field == "url"
    assert change({"payload": {"size": "small"}}, current)["payload"] == {"size": "small"}


def test_an_http_task_has_no_payload_to_change() -> None:
    with pytest.raises(ValidationError) as caught:
        change({"payload": {}})
    assert caught.value.field == "payload"


def test_a_change_validates_like_a_create() -> None:
    for data, field in [
        ({"priority": 5000}, "priority"),
        ({"notify": {"url": "https://h.example/", "on": [{}]}}, "notify.on"),
        ({"metadata": ["x"]}, "metadata"),
        ({"headers": {"X-Task-Id": "forged"}}, "headers.X-Task-Id"),
    ]:
        with pytest.raises(ValidationError) as caught:
            change(data)
        assert caught.value.field == field


# -- the request memo of a batch ----------------------------------------------------------------------------


MEMO_ITEMS: list[dict[str, Any]] = [
    {"json": {"n": 1}},
    {"json": {"n": 2}},
    {"form": {"a": 1}},
    {"body": "<x/>", "content_type": "application/xml"},
    {"body": "<y/>", "content_type": "application/xml"},
    {"method": "put", "json": [1]},
    {"headers": {"X-A": "1"}, "json": None},
    {"headers": {"X-A": "1"}, "json": {"n": 3}},
    {"headers": {"X-A": "2"}},
    {"url": "http://other.example.com:8080/x", "json": {"n": 4}},
    {"url": "http://other.example.com:8080/x"},
]


def test_rows_built_with_a_request_memo_equal_rows_built_without() -> None:
    memo: RequestMemo = {}
    for data in MEMO_ITEMS:
        with_memo = make(data, task_uuid="u", requests=memo)
        assert with_memo == make(data, task_uuid="u"), data
    assert len(memo) == 6  # one per distinct method, url, headers and content type


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_memoised_get_or_head_target_still_refuses_a_body(method: str) -> None:
    memo: RequestMemo = {}
    make({"method": method}, requests=memo)
    error = refused({"method": method, "json": {"n": 1}}, requests=memo)
    assert error.field == "method" and error.message == refused({"method": method, "json": {"n": 1}}).message


def test_a_memoised_target_still_checks_each_body() -> None:
    memo: RequestMemo = {}
    make({"json": {"n": 1}}, requests=memo)
    assert refused({"json": {"n": 1}, "body": "x"}, requests=memo).field == "body"
    assert refused({"form": {"a": [1]}}, requests=memo).field == "form"


def test_headers_the_memo_cannot_key_are_validated_as_usual() -> None:
    memo: RequestMemo = {}
    assert refused({"headers": ["X-A"]}, requests=memo).field == "headers"
    assert refused({"headers": {"X-A": ["1"]}}, requests=memo).field == "headers.X-A"
    assert memo == {}
