"""The one backoff helper for every reconnect and retry: a delay that doubles from ``base`` up
to ``cap``, with jitter so that a fleet of gateways does not reconnect in step, and a reset
on confirmed success (a CONNACK, a Modbus answer, a committed transaction)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2  # +- share of the delay
    rng: random.Random = field(default_factory=random.Random, repr=False)
    attempts: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.base <= self.cap and self.factor >= 1 and 0 <= self.jitter < 1):
            raise ValueError(
                f"backoff needs 0 < base <= cap, factor >= 1 and 0 <= jitter < 1, got {self}"
            )

    def next(self) -> float:
        """The delay before the next attempt (and count the attempt)."""
        delay = min(self.cap, self.base * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        if self.jitter:
            delay *= 1 + self.rng.uniform(-self.jitter, self.jitter)
        return min(delay, self.cap)

    def reset(self) -> None:
        self.attempts = 0
