"""A clock the test moves by hand, for code that reads time only through a clock it is given
(the dispatcher's deadlines, the partitions' compute shares)."""

from __future__ import annotations


class FakeClock:
    """Returns :attr:`now` when called; only the test moves it.

    Reading a float attribute is atomic, so threads (launcher threads finishing tasks,
    the completion watchdog) may call it while the test moves it.
    """

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        """Move the clock on by ``seconds``; returns the new time."""
        self.now += seconds
        return self.now
