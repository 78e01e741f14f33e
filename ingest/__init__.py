"""Ingest: MQTT consumer, columnar decode, vectorised detection, TimescaleDB (issue 4)."""
