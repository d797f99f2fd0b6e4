"""Byte units and size parsing."""

from __future__ import annotations

import re

from ._exceptions import InvalidArgument

__all__ = ("GB", "KB", "MB", "parse_size")

KB = 1024
MB = 1024 * KB
GB = 1024 * MB

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": KB, "m": MB, "g": GB, "t": 1024 * GB}


def parse_size(text: str, *, what: str) -> int:
    """Parse ``"16GiB"``, ``"512M"`` or ``"1073741824"`` into bytes (binary units).

    :param what: where the text came from, for the error message
    :raises InvalidArgument: the text is not a size
    """
    m = _SIZE.match(text)
    if m is None:
        raise InvalidArgument(
            f"{what}={text!r} is not a size; write bytes or a number with a unit, "
            "e.g. 17179869184, 16GiB or 512M"
        )
    return int(float(m.group(1)) * _SCALE[m.group(2).lower()])
