"""``Array[dtype, shape]``: array fields whose dtype and shape a pipeline can check.

``mel: Array["float32", (None, 80)]`` in a pydantic model is an array of ``float32`` with
two dimensions, the second of length 80 (``None`` is any length). Graph validation compares
these specs across edges; pydantic validation checks values at run time. Values are
duck-typed — anything with ``.dtype`` and ``.shape`` (NumPy, CuPy, the host backend's
arrays) — so no array library is imported for the annotation itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

from .._exceptions import InvalidArgument, InvalidArgumentType

__all__ = ("Array", "ArraySpec")

Shape = tuple[int | None, ...]


def _dtype_name(dtype: object) -> str:
    """A dtype's canonical name (``"float32"``); torch's ``torch.float32`` reads the same."""
    try:
        return numpy.dtype(dtype).name  # type: ignore[call-overload,no-any-return]
    except TypeError:
        return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ArraySpec:
    """The dtype and shape an ``Array[...]`` field promises; ``None`` means "any".

    :ivar dtype: canonical dtype name, or ``None`` for any dtype
    :ivar shape: one entry per dimension (``None`` = any length), or ``None`` for any shape
    """

    dtype: str | None
    shape: Shape | None

    def __repr__(self) -> str:
        dtype = "None" if self.dtype is None else repr(self.dtype)
        if self.shape is None:
            return f"Array[{dtype}]"
        return f"Array[{dtype}, {self.shape!r}]"

    def mismatch(self, source: ArraySpec) -> str | None:
        """Why arrays promised by ``source`` may not fit this spec, or ``None`` if they fit."""
        if self.dtype is not None and source.dtype != self.dtype:
            return "dtypes differ"
        if self.shape is None:
            return None
        if source.shape is None or len(source.shape) != len(self.shape):
            return "shapes differ"
        for want, got in zip(self.shape, source.shape, strict=True):
            if want is not None and got != want:
                return "shapes differ"
        return None

    def check(self, value: Any) -> Any:
        """Return ``value`` if it is an array of this dtype and shape.

        :raises ValueError: it is not (pydantic reports it as a validation error)
        """
        if not (hasattr(value, "dtype") and hasattr(value, "shape")):
            raise ValueError(
                f"expected an array (an object with .dtype and .shape, such as a NumPy or "
                f"CuPy array) for {self!r}, got {type(value).__name__}"
            )
        dtype = _dtype_name(value.dtype)
        if self.dtype is not None and dtype != self.dtype:
            raise ValueError(f"expected dtype {self.dtype} for {self!r}, got {dtype}")
        shape = tuple(value.shape)
        if self.shape is not None and (
            len(shape) != len(self.shape)
            or any(w is not None and w != g for w, g in zip(self.shape, shape, strict=True))
        ):
            raise ValueError(f"expected shape {self.shape!r} for {self!r}, got {shape!r}")
        return value

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self.check,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda v: v.tolist(), when_used="json"
            ),
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        return {"type": "array", "description": f"{self!r}"}


def _shape(shape: object) -> Shape | None:
    if shape is None:
        return None
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    rule = (
        f"Array shape must be a tuple of non-negative ints or None (any length), "
        f"such as (None, 80), not {shape!r}"
    )
    if not isinstance(shape, tuple) or not all(
        d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in shape
    ):
        raise InvalidArgumentType(rule)
    if any(d is not None and d < 0 for d in shape):
        raise InvalidArgument(rule)
    return shape


class Array:
    """Annotation helper: ``Array[dtype]`` or ``Array[dtype, shape]``.

    ``dtype`` is anything NumPy understands (``"float32"``, ``numpy.int8``) or ``None``;
    ``shape`` is a tuple whose entries are lengths or ``None`` (any length), or ``None``
    for any shape. The result is ``Annotated[Any, ArraySpec(...)]``.
    """

    def __init__(self) -> None:
        raise TypeError('Array is an annotation; write Array["float32", (None, 80)]')

    def __class_getitem__(cls, params: object) -> Any:
        if not isinstance(params, tuple):
            params = (params,)
        if not 1 <= len(params) <= 2:
            raise InvalidArgument(
                f"Array takes Array[dtype] or Array[dtype, shape], not {len(params)} arguments"
            )
        dtype, shape = params[0], params[1] if len(params) == 2 else None
        name: str | None = None
        if dtype is not None:
            try:
                name = numpy.dtype(dtype).name
            except TypeError:
                raise InvalidArgument(
                    f"Array dtype {dtype!r} is not a dtype NumPy understands; use a name "
                    'such as "float32"'
                ) from None
        return Annotated[Any, ArraySpec(name, _shape(shape))]
