"""Argument checks shared by the runtime and every layer above it, each rule written once.

A wrong type raises :class:`~pygpukit.InvalidArgumentType` (a ``TypeError``); a wrong value
raises :class:`~pygpukit.InvalidArgument` (a ``ValueError``). Messages state the rule and
the fix. Each check returns the value in its canonical type (``int`` for byte counts,
``float`` for numbers), so callers store what they checked.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import TypeVar

from .._exceptions import InvalidArgument, InvalidArgumentType

__all__ = (
    "check_bytes",
    "check_deadline",
    "check_instance",
    "check_name",
    "check_number",
    "check_priority",
)

T = TypeVar("T")


def check_bytes(value: object, what: str, *, allow_zero: bool = False) -> int:
    """A byte count: any integer type (``int``, ``numpy.int64``, anything with
    ``__index__``), but not ``bool``; positive, or ``>= 0`` with ``allow_zero``.

    :param what: the argument's name, as the caller wrote it (``"max_vram"``)
    :returns: the count as an ``int``
    :raises InvalidArgumentType: not an integer
    :raises InvalidArgument: negative, or zero without ``allow_zero``
    """
    if type(value) is int:  # the common case, without the protocol call
        n: int | None = value
    elif isinstance(value, bool):  # True is an int to Python, never a byte count to a user
        n = None
    else:
        try:
            n = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            n = None
    if n is None:
        raise InvalidArgumentType(
            f"{what} must be an integer number of bytes (e.g. 4 * GB), not {value!r}"
        )
    if n < 0 or (n == 0 and not allow_zero):
        rule = "must not be negative" if allow_zero else "must be positive"
        raise InvalidArgument(f"{what} {rule}, got {n}; e.g. {what}=2 * GB")
    return n


def check_name(value: object, what: str) -> str:
    """A non-empty, non-blank ``str`` (a context name, a task or partition id).

    :raises InvalidArgumentType: not a ``str``
    :raises InvalidArgument: empty or only whitespace
    """
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{what} must be a non-empty str, not {value!r}; pass a name")
    if not value.strip():
        raise InvalidArgument(f"{what} must be a non-empty str, not {value!r}; pass a name")
    return value


def check_instance(value: object, cls: type[T], what: str, fix: str = "") -> T:
    """``value`` itself, if it is a ``cls``.

    :param fix: how to get a right one, appended to the message (``"build one with ..."``)
    :raises InvalidArgumentType: it is not
    """
    if not isinstance(value, cls):
        tail = f"; {fix}" if fix else ""
        raise InvalidArgumentType(f"{what} must be a {cls.__name__}, not {value!r}{tail}")
    return value


def check_number(
    value: object,
    what: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """A real number (``int``, ``float``, NumPy scalars; not ``bool``), finite, inside the
    interval the bounds give.

    :param low: smallest allowed value (exclusive with ``low_open``); ``None``: unbounded
    :param high: largest allowed value (exclusive with ``high_open``); ``None``: unbounded
    :param hint: what the number means or an example, appended to the message
    :returns: the value as a ``float``
    :raises InvalidArgumentType: not a real number
    :raises InvalidArgument: NaN, infinite, or outside the interval
    """
    tail = f"; {hint}" if hint else ""
    if type(value) is not float and type(value) is not int:  # those two: no ABC check
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidArgumentType(f"{what} must be a number, not {value!r}{tail}")
    x = float(value)
    ok = math.isfinite(x)
    if low is not None:
        ok = ok and (x > low if low_open else x >= low)
    if high is not None:
        ok = ok and (x < high if high_open else x <= high)
    if not ok:
        raise InvalidArgument(
            f"{what} must be {_interval(low, high, low_open, high_open)}, got {value!r}{tail}"
        )
    return x


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"


def check_priority(value: object) -> int:
    """A task or request priority: an ``int`` (not ``bool``); lower runs first.

    :raises InvalidArgumentType: anything else
    """
    if type(value) is not int:  # the common case, without the isinstance calls
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgumentType(f"priority must be an int (lower runs first), not {value!r}")
    return value


def check_deadline(value: object) -> float | None:
    """A deadline: ``None`` or a time on the scheduling policy's clock
    (``time.monotonic()`` by default). Infinities are times too (``inf`` is never reached,
    ``-inf`` has always passed), as trio's deadlines take them; NaN is no time at all.

    :returns: the deadline as a ``float``, or ``None``
    :raises InvalidArgumentType: not a real number (``bool`` included) and not ``None``
    :raises InvalidArgument: NaN
    """
    if value is None:
        return None
    if type(value) is not float and type(value) is not int:  # those two: no ABC check
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidArgumentType(
                "deadline must be a time on the runtime's clock (time.monotonic() by "
                f"default) or None, not {value!r}"
            )
    x = float(value)
    if math.isnan(x):
        raise InvalidArgument(
            "deadline must be a time on the runtime's clock (time.monotonic() by default) "
            "or None, not NaN; e.g. deadline=time.monotonic() + 0.5"
        )
    return x
