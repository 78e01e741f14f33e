"""The valve policy through the whole hotline service: a critical gas alarm closes the
household's meter valve through the real broker, gateway and simulated meter, and the result
is on the ticket; reopening needs a technician on site."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.alerting.harness import running_hotline
from tests.alerting.helpers import query, raise_alarm
from tests.conftest import Broker
from tests.gateway.conftest import GatewayThread, SimServer, gateway_config, sim_server
from tests.ingest.conftest import register, registry_csv
from tests.ingest.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
__all__ = ["sim_server"]


def test_a_critical_leak_closes_the_valve_and_a_technician_on_site_reopens_it(
    sim_server: Callable[..., SimServer], mosquitto: Broker, database: str, tmp_path: Path
) -> None:
    server = sim_server(2, 2)
    register(database, registry_csv(tmp_path / "r.csv", "GW-T", 2, 2))
    server.inject({"device": "M-0001", "type": "continuous_flow", "flow_m3h": 0.8})
    gateway = GatewayThread(gateway_config(tmp_path, mosquitto, server))
    try:
        with running_hotline(database, hotline_valve_enabled=True, mqtt_host=mosquitto.host,
                             mqtt_port=mosquitto.port, hotline_valve_timeout_s=10) as hotline:  # fmt: skip
            raise_alarm(database, "D-0001", "gas_high", "critical")
            wait_for(
                lambda: query(database, "SELECT valve_state FROM tickets") == [("closed",)],
                20,
                "valve closed",
            )
            assert server.values("M-0001")["valve_closed"] is True
            wait_for(
                lambda: server.values("M-0001")["flow_m3h"] == 0.0,
                10,
                "no flow behind a closed valve",
            )
            assert server.values("M-0002")["valve_closed"] is False, "only the leaking household"
            tid = query(database, "SELECT id FROM tickets")[0][0]
            detail = hotline.client("dispatcher").get(f"/api/tickets/{tid}").json()
            assert [(c["device_id"], c["action"], c["status"], c["requested_by"]) for c in detail["valve_commands"]] == [
                ("M-0001", "close_valve", "done", "policy:valve")]  # fmt: skip
            assert {"valve_requested", "valve_sent", "valve_done"} <= {
                e["kind"] for e in detail["events"]
            }
            # reopening: not by a dispatcher, and not before a technician is on site
            dispatcher, technician = hotline.client("dispatcher"), hotline.client("technician")
            assert (
                dispatcher.post(
                    f"/api/tickets/{tid}/valve", json={"action": "open_valve"}
                ).status_code
                == 403
            )
            early = technician.post(f"/api/tickets/{tid}/valve", json={"action": "open_valve"})
            assert early.status_code == 409 and "on site" in early.json()["detail"]
            dispatcher.post(f"/api/tickets/{tid}/dispatch", json={"department": "emergency repair"})
            technician.post(f"/api/tickets/{tid}/on-site")
            reopened = technician.post(f"/api/tickets/{tid}/valve", json={"action": "open_valve"})
            assert reopened.status_code == 202, reopened.text
            wait_for(
                lambda: query(database, "SELECT valve_state FROM tickets") == [("open",)],
                20,
                "valve reopened",
            )
            assert server.values("M-0001")["valve_closed"] is False
            # a dispatcher may close a valve by hand, on another household's ticket
            refused = dispatcher.post(
                f"/api/tickets/{tid}/valve", json={"action": "close_valve", "device_id": "M-0002"}
            )
            assert refused.status_code == 422 and "M-0002" in refused.text
    finally:
        gateway.stop()
