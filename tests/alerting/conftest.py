"""The alerting tests use the ingest tests' fresh, migrated database."""

from tests.ingest.conftest import database, empty_database

__all__ = ["database", "empty_database"]
