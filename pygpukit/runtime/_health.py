"""Whether a runtime can still run work: what :meth:`~pygpukit.runtime.Runtime.health`
answers, for health probes (a server's ``/health``) that must not touch the device."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ("HealthState", "RuntimeHealth")


class HealthState(enum.Enum):
    """``OK``: it runs work. ``FAULTED``: its device faulted — a CUDA context never recovers
    from that, so the process must be restarted. ``CLOSED``: :meth:`Runtime.close` ran."""

    OK = "ok"
    FAULTED = "faulted"
    CLOSED = "closed"


@dataclass(frozen=True)
class RuntimeHealth:
    """A snapshot of a runtime's health.

    :ivar state: a :class:`HealthState`
    :ivar error: ``FAULTED``: the device's error — a copy, without traceback, of the error
        its pending awaits failed with; otherwise ``None``
    """

    state: HealthState
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        """Whether the runtime runs work (``state`` is ``OK``)."""
        return self.state is HealthState.OK
