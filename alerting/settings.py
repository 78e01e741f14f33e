"""Hotline settings (``GASGUARD_HOTLINE_*`` and the common ``GASGUARD_*``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from alerting.cooldown import Cooldown
from gasguard.settings import _PLACEHOLDERS, CommonSettings

# alarm rules whose critical alarms close the household's valve under the default policy
DEFAULT_VALVE_RULES = ("gas_high", "burst")


class HotlineSettings(CommonSettings):
    hotline_host: str = "127.0.0.1"
    hotline_port: int = Field(8080, ge=0, le=65535)
    hotline_instance: str = "hotline-1"
    hotline_utc_offset_hours: float = Field(8.0, ge=-12, le=14)  # the hotline's local day
    # tokens handed out at login live this long
    hotline_token_hours: float = Field(12.0, gt=0, le=24 * 30)
    # the outbox is taken when ingest announces a row (LISTEN) and at least this often
    hotline_outbox_poll_s: float = Field(1.0, gt=0)
    # small batches: a ticket is visible when its batch commits (bench/alarm_latency.py:
    # batches of 10 kept a critical alarm's p99 under 250 ms with 200 outbox rows/s behind it)
    hotline_outbox_batch: int = Field(10, ge=1, le=10_000)
    # storms: this many alarm tickets of one cause in one district within the window open a
    # district incident, which holds the matching household tickets (critical ones excepted)
    hotline_storm_tickets: int = Field(5, ge=2)
    hotline_storm_window_s: float = Field(300.0, gt=0)
    # escalation: a critical ticket not acknowledged within this many minutes is re-notified
    # and escalated (again every as many minutes); breached promises escalate too
    hotline_ack_minutes: float = Field(5.0, gt=0)
    hotline_escalate_every_s: float = Field(10.0, gt=0)
    # cool-down: an alarm of the leak a ticket was resolved for within this many minutes, no
    # worse than its alarms and at most the margin (a fraction) above their highest value, is
    # recorded on that ticket instead of opening one (alerting.cooldown); 0 turns it off. 30:
    # a ventilated home (air changed every 3-10 min) falls from 100 to 5 %LEL in 3 such times
    hotline_cooldown_minutes: float = Field(30.0, ge=0, le=24 * 60)
    hotline_cooldown_margin: float = Field(0.1, ge=0, le=10)
    # valve policy: critical alarms of these rules send a close-valve command to the gateway
    hotline_valve_rules: Annotated[tuple[str, ...], NoDecode] = DEFAULT_VALVE_RULES
    hotline_valve_enabled: bool = True
    hotline_valve_timeout_s: float = Field(30.0, gt=0)
    hotline_valve_expiry_s: int = Field(120, ge=1)  # a command older than this is not executed
    # outbound webhook to a utility's call-centre software (off when no URL)
    hotline_webhook_url: str | None = None
    hotline_webhook_secret: SecretStr | None = None
    hotline_webhook_timeout_s: float = Field(5.0, gt=0)

    @property
    def hotline_cooldown(self) -> Cooldown:
        return Cooldown(self.hotline_cooldown_minutes, self.hotline_cooldown_margin)

    @field_validator("hotline_valve_rules", mode="before")
    @classmethod
    def _split_rules(cls, value: object) -> object:
        if isinstance(value, str):  # GASGUARD_HOTLINE_VALVE_RULES=gas_high,burst
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @model_validator(mode="after")
    def _webhook_needs_secret(self) -> HotlineSettings:
        if self.hotline_webhook_url:
            secret = (
                self.hotline_webhook_secret.get_secret_value()
                if self.hotline_webhook_secret
                else ""
            )
            if self.environment == "production" and secret.lower() in _PLACEHOLDERS:
                raise ValueError(
                    "GASGUARD_HOTLINE_WEBHOOK_SECRET is empty or a placeholder; set a real secret"
                )
            if not secret:
                raise ValueError(
                    "GASGUARD_HOTLINE_WEBHOOK_URL is set but GASGUARD_HOTLINE_WEBHOOK_SECRET is "
                    "not: webhook requests are signed"
                )
        return self
