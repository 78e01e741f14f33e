"""Edge gateway: polls detectors and meters over Modbus, forwards batches over MQTT (issue 3)."""
