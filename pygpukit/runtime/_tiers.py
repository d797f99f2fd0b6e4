"""QoS tiers: what a context is promised, and the stream priority that follows from it."""

from __future__ import annotations

import enum

__all__ = ("QoSPolicy",)


class QoSPolicy(enum.Enum):
    """The three tiers (DESIGN §6).

    - ``GUARANTEED``: ``max_vram`` reserved at creation; greatest stream priority.
    - ``BURSTABLE``: ``base_vram`` reserved; bursts to ``max_vram`` from unreserved memory;
      middle priority.
    - ``BEST_EFFORT``: nothing reserved, spare capacity only; least priority.
    """

    GUARANTEED = "guaranteed"
    BURSTABLE = "burstable"
    BEST_EFFORT = "best_effort"

    #: Dispatch and eviction order: 0 Guaranteed, 1 Burstable, 2 BestEffort. A lower rank
    #: launches first and may take memory from higher ranks, never the other way round.
    rank: int

    def __init__(self, value: str) -> None:
        self.rank = ("guaranteed", "burstable", "best_effort").index(value)

    # Members are singletons compared by identity, so the identity hash is consistent with
    # equality; Enum's own hashes the name in Python, which the dispatcher's per-tier
    # counters paid several times per task.
    __hash__ = object.__hash__

    def stream_priority(self, priority_range: tuple[int, int]) -> int:
        """This tier's stream priority inside the device's ``(least, greatest)`` range."""
        least, greatest = priority_range
        if self is QoSPolicy.GUARANTEED:
            return greatest
        if self is QoSPolicy.BEST_EFFORT:
            return least
        return least + (greatest - least) // 2

    def reservation(self, max_vram: int, base_vram: int) -> int:
        """Bytes a context of this tier reserves on the device: all of ``max_vram``
        (Guaranteed), its ``base_vram`` (Burstable), nothing (BestEffort)."""
        if self is QoSPolicy.GUARANTEED:
            return max_vram
        return base_vram if self is QoSPolicy.BURSTABLE else 0

    @classmethod
    def coerce(cls, value: object) -> QoSPolicy:
        """Accept a member or its name/value (``"guaranteed"``, ``"BEST_EFFORT"``).

        :raises InvalidArgument: an unknown name
        :raises InvalidArgumentType: neither a member nor a str
        """
        from .._exceptions import InvalidArgument, InvalidArgumentType

        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise InvalidArgumentType(
                f"qos must be a QoSPolicy or its name, not {value!r}; use QoSPolicy.GUARANTEED, "
                "QoSPolicy.BURSTABLE or QoSPolicy.BEST_EFFORT"
            )
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            for member in cls:
                if key in (member.value, member.name.lower()):
                    return member
        raise InvalidArgument(
            f"unknown QoS tier {value!r}; use QoSPolicy.GUARANTEED, QoSPolicy.BURSTABLE "
            "or QoSPolicy.BEST_EFFORT"
        )
