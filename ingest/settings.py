"""Ingest settings (``GASGUARD_INGEST_*`` and the common ``GASGUARD_*``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from gasguard.settings import CommonSettings


class IngestSettings(CommonSettings):
    ingest_client_id: str = "gasguard-ingest"
    # Sharding: consumer `shard` of `shards` takes the gateways whose id hashes to it, so every
    # device's readings reach one consumer in order (see README "Scaling ingest").
    ingest_shards: int = Field(1, ge=1, le=1024)
    ingest_shard: int = Field(0, ge=0)
    ingest_max_messages: int = Field(250, ge=1, le=100_000)  # bounds the wait of an alarm
    ingest_max_wait_ms: int = Field(50, ge=0, le=60_000)
    # micro-batches in flight, one database connection each (1: strictly one at a time)
    ingest_pipeline: int = Field(3, ge=1, le=8)
    ingest_receive_maximum: int = Field(2000, ge=1, le=65535)
    ingest_metrics_port: int = Field(9109, ge=0, le=65535)
    ingest_metrics_host: str = "127.0.0.1"  # 0.0.0.0 in a container
    ingest_health_every_s: float = Field(5.0, gt=0)
    ingest_state_every_s: float = Field(10.0, gt=0)
    ingest_silence_every_s: float = Field(10.0, gt=0)
    ingest_rollup_every_s: float = Field(60.0, gt=0)
    ingest_fold_every_s: float = Field(2.0, gt=0)  # staged rollups into the hourly ones
    ingest_registry_every_s: float = Field(30.0, gt=0)
    ingest_retention_days: int = Field(400, ge=1)
    # a reading stamped further ahead of ingest's clock is judged at its arrival (and raises
    # CLOCK_SKEW)
    ingest_clock_tolerance_ms: int = Field(30_000, ge=0, le=300_000)
    # a batch stamped further ahead is dead-lettered (a clock a day off is a broken device)
    ingest_max_future_ms: int = Field(86_400_000, ge=300_000)
    ingest_utc_offset_hours: float = Field(8.0, ge=-12, le=14)
    ingest_thresholds_file: str | None = None  # TOML: see ingest/detection.py Thresholds

    @model_validator(mode="after")
    def _shard_in_range(self) -> IngestSettings:
        if self.ingest_shard >= self.ingest_shards:
            raise ValueError(
                f"GASGUARD_INGEST_SHARD={self.ingest_shard} but there are only "
                f"{self.ingest_shards} shards (0..{self.ingest_shards - 1})"
            )
        return self

    @property
    def shard_name(self) -> str:
        return f"{self.ingest_shard}/{self.ingest_shards}"
