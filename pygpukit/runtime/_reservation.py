"""The admission rule for reservations, written once for the ledger and for qos.

A tier's reservation (a Guaranteed context's ``max_vram``, a Burstable context's
``base_vram``, a Guaranteed or Burstable task's memory) is granted only if it fits the
memory that nothing has reserved yet; otherwise the sum of reservations could pass the
device. :func:`check_reservation` is that rule over plain totals, and its refusal is the
one wording of it: :class:`~pygpukit.runtime._ledger.Ledger` raises it for contexts,
:class:`~pygpukit.qos.QosPolicyEvaluator` reports it for tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._exceptions import _fmt_bytes
from ._tiers import QoSPolicy

__all__ = ("ReservationVerdict", "check_reservation")


@dataclass(frozen=True)
class ReservationVerdict:
    """Whether a reservation is granted, and a sentence saying why.

    :ivar fits: ``True`` if the reservation fits the unreserved memory
    :ivar reason: what it reserves (granted), or the rule it breaks and the fix (refused)
    """

    fits: bool
    reason: str


def check_reservation(
    request: int, unreserved: int, capacity: int, *, tier: QoSPolicy, knob: str
) -> ReservationVerdict:
    """Apply the rule "a reservation must fit the unreserved memory". Pure: it reads the
    totals it is given and reserves nothing.

    :param request: bytes the tier reserves (0 for BestEffort, which always fits)
    :param unreserved: bytes nothing has reserved yet
    :param capacity: all the bytes that can be reserved
    :param tier: the tier asking, named in the reason
    :param knob: the argument that sets ``request`` (``"max_vram"``, ``"base_vram"``,
        ``"memory"``), named in the fix
    """
    if request <= unreserved:
        return ReservationVerdict(
            True,
            f"reserves {_fmt_bytes(request)} ({tier.name}) of the "
            f"{_fmt_bytes(unreserved)} unreserved",
        )
    return ReservationVerdict(
        False,
        f"it must reserve {_fmt_bytes(request)} ({tier.name}) but only "
        f"{_fmt_bytes(max(unreserved, 0))} of {_fmt_bytes(capacity)} is unreserved; lower its "
        f"{knob}, use a lower tier, or release reservations held by others",
    )
