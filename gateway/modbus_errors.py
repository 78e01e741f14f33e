"""The errors of a Modbus link: one root, and one subclass per thing the caller can act on.

The poller and the command handler catch :class:`LinkError`; the subclasses say why, for the
log and the command result. ``gateway.links`` re-exports them.
"""

from __future__ import annotations


class LinkError(Exception):
    """A request got no usable answer."""


class NoAnswerError(LinkError):
    """Timeout, connection refused or dropped: the device (or its link) is not answering."""


class DeviceRefusedError(LinkError):
    """The device answered with a Modbus exception code."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{what}: Modbus exception {code}")
        self.code = code


class BadAnswerError(LinkError):
    """An answer that is not a valid answer to the request: garbled or short, another
    transaction id, unit or function code, or data that does not match what was asked."""


__all__ = ["BadAnswerError", "DeviceRefusedError", "LinkError", "NoAnswerError"]
