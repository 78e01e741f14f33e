"""Settings shared by every GasGuard service: environment variables with the prefix
``GASGUARD_`` (or a ``.env`` file), defaults that run on a developer's machine.

Each service adds its own class on top of :class:`CommonSettings`; secrets refuse
placeholders outside development.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from gasguard.mqtt_link import MqttOptions

_PLACEHOLDERS = {"", "changeme", "change-me", "secret", "password"}


class CommonSettings(BaseSettings):
    """What every service needs: where the broker and the database are."""

    model_config = SettingsConfigDict(
        env_prefix="GASGUARD_", env_file=".env", extra="ignore", validate_default=True
    )

    environment: Literal["development", "test", "production"] = "development"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = Field(1883, ge=1, le=65535)
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_tls: bool = False
    mqtt_protocol: Literal["5", "3.1.1"] = "5"  # 3.1.1 only for a broker without MQTT 5
    database_url: str = "postgresql://postgres@127.0.0.1:5432/test"

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> CommonSettings:
        if self.environment == "production" and self.mqtt_username is not None:
            secret = self.mqtt_password.get_secret_value() if self.mqtt_password else ""
            if secret.lower() in _PLACEHOLDERS:
                raise ValueError(
                    "GASGUARD_MQTT_PASSWORD is empty or a placeholder; set a real secret"
                )
        return self

    def mqtt_options(self, **extra: Any) -> MqttOptions:
        """The broker's address and credentials from these settings, plus ``extra``."""
        from gasguard.mqtt_link import MqttOptions

        return MqttOptions(
            host=self.mqtt_host,
            port=self.mqtt_port,
            username=self.mqtt_username,
            password=self.mqtt_password.get_secret_value() if self.mqtt_password else None,
            tls=self.mqtt_tls,
            protocol=self.mqtt_protocol,
            **extra,
        )


class SimSettings(CommonSettings):
    """The device simulator (``gasguard sim``)."""

    sim_modbus_host: str = "127.0.0.1"
    sim_modbus_port: int = Field(5020, ge=1, le=65535)
    sim_control_host: str = "127.0.0.1"
    sim_control_port: int = Field(5019, ge=1, le=65535)
    sim_utc_offset_hours: float = Field(8.0, ge=-12, le=14)
