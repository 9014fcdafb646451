"""Settings, loaded once at the edge from ``taskcenter.toml`` and ``TASKCENTER_*`` variables (env wins)."""

from __future__ import annotations

import re
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from taskcenter.domain.retry import RetryPolicy
from taskcenter.domain.traffic import Limits
from taskcenter.errors import ValidationError

#: One plain address, ``local@domain``: the local part of RFC 5322's dot-atom characters, an ASCII domain. No
#: display name, list, quoting, spaces or angle brackets: tenants give ``notify.email``, and anything that could
#: add a recipient or a header is refused rather than quoted.
_EMAIL = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9-]{1,63})*"
)


def is_email_address(value: object) -> bool:
    """Whether ``value`` is one plain e-mail address (``local@domain``, ASCII domain, at most 254 characters)."""
    return isinstance(value, str) and len(value) <= 254 and _EMAIL.fullmatch(value) is not None


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


class Settings(BaseSettings):
    """Every setting taskcenter reads. Limits and host policies live in the database instead."""

    model_config = SettingsConfigDict(
        env_prefix="TASKCENTER_", toml_file="taskcenter.toml", extra="ignore", frozen=True
    )

    database_url: str = "sqlite:///taskcenter.db"
    """SQLAlchemy URL: ``sqlite:///file.db`` (embedded) or ``postgresql://user@host/db`` (cluster)."""
    operator_key: SecretStr | None = None
    """Bootstrap operator key for the operator endpoints and CLI."""
    secret_key: SecretStr | None = None
    """Comma-separated Fernet keys (newest first) that encrypt sensitive headers at rest."""
    host: str = "127.0.0.1"
    """Address ``serve`` listens on."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port ``serve`` listens on."""
    worker_metrics_host: str = "127.0.0.1"
    """Address ``worker`` serves ``/metrics`` and ``/health`` on, when ``worker_metrics_port`` is set."""
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port ``worker`` serves ``/metrics`` and ``/health`` on (0 = none: the worker serves no HTTP)."""
    concurrency: int = Field(default=100, ge=1, le=10_000)
    """Requests in flight per dispatcher process."""
    claim_batch: int = Field(default=400, ge=1, le=5000)
    """Most tasks claimed in one statement, and claimed ahead of free slots (at most 4 x concurrency)."""
    poll_interval_s: float = Field(default=5.0, gt=0, le=300)
    """Longest sleep between looks at the queue when no wake-up arrives."""
    lease_s: float = Field(default=20.0, ge=1, le=3600)
    """A claim's lease; a running dispatcher renews it every quarter of that while the attempt is in flight.
    A dispatcher that dies leaves its tasks to be rescued this long after its last renewal."""
    rescue_interval_s: float = Field(default=2.0, gt=0, le=300)
    """How often expired leases are looked for."""
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=600)
    """On SIGTERM/SIGINT, how long in-flight requests may finish before the rest is released."""
    max_response_bytes: int = Field(default=65536, ge=0, le=1 << 20)
    """Response body kept per attempt; the rest is dropped and the attempt flagged truncated."""
    max_request_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    """Largest API request body accepted."""
    ssrf_guard: bool = True
    """Refuse loopback, private, link-local and other internal destinations."""
    allow_networks: str = ""
    """Comma-separated CIDRs the SSRF guard lets through, e.g. ``127.0.0.0/8`` for local testing."""
    allow_hosts: str = ""
    """Comma-separated host names the SSRF guard lets through whatever they resolve to."""
    deny_hosts: str = ""
    """Comma-separated host names (``*.example.com`` allowed) that are always refused."""
    host_rate_per_second: float = Field(default=0.0, ge=0, le=1_000_000)
    """Default request rate for hosts without a policy (0 = unlimited)."""
    host_burst: int = Field(default=0, ge=0)
    """Default burst for hosts without a policy (0 = one second's worth of the rate)."""
    host_max_in_flight: int = Field(default=0, ge=0)
    """Default cap on requests in flight per host across the cluster (0 = unlimited)."""
    host_slow_window: int = Field(default=10, ge=0, le=100_000)
    """Requests a dispatcher starts at once to a host that is slow to answer while other hosts wait for slots
    (0 = off): widened by one per answer, halved per failure, so a host that times out holds only a few slots."""
    host_slow_after_s: float = Field(default=0.1, gt=0, le=3600)
    """A host is slow to answer when its oldest request in flight has waited this long."""
    breaker_failures: int = Field(default=5, ge=1)
    """A host's circuit opens after this many consecutive failures (5xx, timeouts, network errors)."""
    breaker_ratio: float = Field(default=0.0, ge=0, le=1)
    """...or when this share of the last ``breaker_window`` attempts failed (0 = off)."""
    breaker_window: int = Field(default=20, ge=1, le=100)
    """Attempts the failure ratio looks at."""
    breaker_cooldown_s: float = Field(default=30.0, gt=0, le=86_400)
    """How long an open circuit defers its host's tasks before a probe is let through."""
    retention_days: int = Field(default=90, ge=1, le=36_500)
    """Finished tasks and their attempts older than this are purged."""
    key_grace_hours: float = Field(default=24.0, ge=0, le=2160)
    """After a key rotation the old API key stays valid this long."""
    default_retry: dict[str, Any] = Field(
        default_factory=lambda: {"strategy": "exponential", "initial_delay": 1, "max_attempts": 5}
    )
    """Retry policy for tasks whose business and request give none."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Logging level."""
    log_format: Literal["json", "console", "auto"] = "auto"
    """``json``, ``console`` or ``auto`` (JSON when not on a terminal)."""
    smtp_host: str = ""
    """SMTP server that sends ``notify.email`` notifications (empty: e-mail notifications are refused)."""
    smtp_port: int = Field(default=0, ge=0, le=65535)
    """Its port; 0 picks the usual one for ``smtp_tls``: 25 (none), 587 (starttls), 465 (tls)."""
    smtp_tls: Literal["none", "starttls", "tls"] = "starttls"
    """``starttls`` (upgrade a plain connection, required), ``tls`` (TLS from the first byte) or ``none``."""
    smtp_from: str = Field(default="", validate_default=True)
    """The notifications' From address; required with ``smtp_host``."""
    smtp_username: str = ""
    """Login name for SMTP AUTH (empty: no login)."""
    smtp_password: SecretStr | None = Field(default=None, validate_default=True)
    """Password for SMTP AUTH (given with ``smtp_username``)."""
    smtp_timeout_s: float = Field(default=10.0, gt=0, le=30)
    """Longest wait for the SMTP server to connect or answer one command."""

    @field_validator("log_level", "log_format", "smtp_tls", mode="before")
    @classmethod
    def _any_case(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @field_validator("smtp_host", "smtp_from", "smtp_username")
    @classmethod
    def _one_line(cls, value: str, info: Any) -> str:
        value = value.strip()
        if any(c in value for c in "\r\n\x00"):
            raise ValueError(f"{info.field_name} must be one line")
        return value

    @field_validator("smtp_from")
    @classmethod
    def _sender_is_an_address(cls, value: str, info: Any) -> str:
        if (value or info.data.get("smtp_host")) and not is_email_address(value):
            raise ValueError("must be an e-mail address (the notifications' sender) when smtp_host is set")
        return value

    @field_validator("smtp_password")
    @classmethod
    def _login_is_whole(cls, value: SecretStr | None, info: Any) -> SecretStr | None:
        if bool(info.data.get("smtp_username")) != bool(value and value.get_secret_value()):
            raise ValueError("smtp_username and smtp_password go together")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @field_validator("default_retry")
    @classmethod
    def _retry_is_valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        RetryPolicy.from_dict(value, field_="default_retry")
        return value

    @field_validator("database_url")
    @classmethod
    def _url_is_known(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql", "postgres")):
            raise ValueError("must be a sqlite:// or postgresql:// URL")
        try:
            make_url(value)
        except (ValueError, ArgumentError) as exc:  # e.g. an unclosed IPv6 bracket, a port that is no number
            raise ValueError(f"is not a valid URL: {exc}") from None
        return value

    def dispatch(self) -> DispatchConfig:
        """The dispatcher's part of the settings."""
        return DispatchConfig(
            concurrency=self.concurrency,
            claim_batch=self.claim_batch,
            poll_interval_s=self.poll_interval_s,
            lease_s=self.lease_s,
            rescue_interval_s=self.rescue_interval_s,
            shutdown_grace_s=self.shutdown_grace_s,
            max_response_bytes=self.max_response_bytes,
        )

    def guard(self) -> GuardConfig:
        """The SSRF guard's global lists."""
        return GuardConfig(
            enabled=self.ssrf_guard,
            allow_networks=_split(self.allow_networks),
            allow_hosts=_split(self.allow_hosts),
            deny_hosts=_split(self.deny_hosts),
        )

    def host_defaults(self) -> Limits:
        """Traffic limits for hosts without a policy of their own."""
        return Limits(
            rate_per_second=self.host_rate_per_second or None,
            burst=self.host_burst or None,
            max_in_flight=self.host_max_in_flight or None,
            breaker_failures=self.breaker_failures,
            breaker_ratio=self.breaker_ratio or None,
            breaker_window=self.breaker_window,
            breaker_cooldown_s=self.breaker_cooldown_s,
        )

    def smtp(self) -> SmtpConfig | None:
        """The SMTP server e-mail notifications go through, or None when none is configured."""
        if not self.smtp_host:
            return None
        return SmtpConfig(
            host=self.smtp_host,
            port=self.smtp_port or _SMTP_PORTS[self.smtp_tls],
            tls=self.smtp_tls,
            sender=self.smtp_from,
            username=self.smtp_username or None,
            password=self.smtp_password.get_secret_value() if self.smtp_password else None,
            timeout_s=self.smtp_timeout_s,
        )

    def retry_policy(self) -> RetryPolicy:
        """The global default retry policy."""
        return RetryPolicy.from_dict(self.default_retry, field_="default_retry")

    def masked(self) -> dict[str, Any]:
        """All settings with secrets masked, for ``taskcenter config show``."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "***" if value.get_secret_value() else ""
            elif name == "database_url":
                value = mask_url(value)
            out[name] = value
        return out


def mask_url(url: str) -> str:
    """A database URL with its password hidden."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return f"{scheme}://{creds}@{host}"


@dataclass(frozen=True, slots=True)
class DispatchConfig:
    """What a dispatcher needs to know."""

    concurrency: int = 100
    """Requests in flight at once."""
    claim_batch: int = 400
    """Most tasks claimed in one statement, and claimed ahead of free slots (at most 4 x concurrency)."""
    poll_interval_s: float = 5.0
    """Longest sleep without a wake-up."""
    lease_s: float = 20.0
    """Lease of a claim, renewed by heartbeats."""
    rescue_interval_s: float = 2.0
    """How often expired leases are rescued."""
    shutdown_grace_s: float = 10.0
    """Time in-flight requests get on shutdown."""
    max_response_bytes: int = 65536
    """Response body kept per attempt."""
    write_batch: int = 500
    """Most results written in one transaction."""


_SMTP_PORTS = {"none": 25, "starttls": 587, "tls": 465}


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    """The SMTP server e-mail notifications go through (operator configuration: no SSRF guard applies)."""

    host: str
    port: int
    tls: Literal["none", "starttls", "tls"]
    """``starttls``: upgrade the plain connection and refuse a server that cannot; ``tls``: implicit TLS."""
    sender: str
    """The From address."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    """Never logged: left out of the repr."""
    timeout_s: float = 10.0
    """Longest wait to connect or for one command's answer."""
    tls_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    """Certificates to trust (default: the system's); tests hand in one trusting their own CA."""


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Global SSRF guard lists (per-business lists add to them)."""

    enabled: bool = True
    allow_networks: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    deny_hosts: tuple[str, ...] = ()


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load settings once, at the edge. Raises :class:`ValidationError` naming the bad setting."""
    from pydantic import ValidationError as PydanticValidationError

    if config_file is not None and not Path(config_file).is_file():
        # pydantic-settings reads a TOML file that is not there as an empty one: every setting its default.
        raise ValidationError(f"config file {config_file} does not exist", field="config")
    try:
        _refuse_unknown_keys(config_file)
        if config_file is not None:

            class _FileSettings(Settings):
                model_config = SettingsConfigDict(toml_file=str(config_file))

            return _FileSettings(**overrides)
        return Settings(**overrides)
    except tomllib.TOMLDecodeError as exc:
        name = config_file or "taskcenter.toml"
        raise ValidationError(f"config file {name} is not valid TOML: {exc}", field="config") from exc
    except (OSError, UnicodeDecodeError) as exc:  # unreadable, or not text
        name = config_file or "taskcenter.toml"
        raise ValidationError(f"config file {name} cannot be read: {exc}", field="config") from exc
    except SettingsError as exc:  # e.g. TASKCENTER_DEFAULT_RETRY that is not JSON
        cause = exc.__cause__
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "settings"
        raise ValidationError(f"setting {field}: {cause or exc}", field=field) from exc
    except PydanticValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "settings"
        # Our validators' own words, without the "Value error, " pydantic puts before them.
        message = str(err["msg"]).removeprefix("Value error, ")
        raise ValidationError(f"setting {name}: {message}", field=name) from exc


def _refuse_unknown_keys(config_file: Path | None) -> None:
    """A key of the config file that names no setting (a typo, a ``[table]``) is refused, not ignored: the
    environment may carry other ``TASKCENTER_*`` variables, but every key of the file is meant for us."""
    path = config_file or Path("taskcenter.toml")
    if not path.is_file():
        return
    with path.open("rb") as f:
        keys = tomllib.load(f).keys()
    for key in keys:
        if key not in Settings.model_fields:
            raise ValidationError(
                f"config file {path}: {key!r} is not a setting (the names are those of the TASKCENTER_* "
                "variables in lower case without the prefix, e.g. database_url)",
                field=key,
            )
