"""The simulator's exceptions: one root, a few meaningful subclasses."""


class SimError(Exception):
    """Something a technician has to fix (the message says what)."""


class ScenarioError(SimError):
    """A scenario file or an injected event is invalid."""


class UnknownDeviceError(SimError, KeyError):
    """No device, household or district of that name in the running simulation."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown device"


class PortInUseError(SimError):
    """A port the simulator wants to listen on is taken."""
