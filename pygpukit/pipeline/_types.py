"""Whether a value of one field's type may feed another field: the edge check of a graph.

The rule is deliberately simple and static: a source annotation fits a target annotation
when they are equal, when the target is ``Any`` (or the source is: gradual typing — pydantic
still validates the value at run time), when the target is a supertype or a ``Union`` that
contains the source, when the target is ``float`` and the source ``int`` (as in typing), or,
for generics, when the origins fit and the arguments fit pairwise. ``Array[...]`` fields
compare dtype and shape.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from ._arrays import ArraySpec

__all__ = ("edge_problem", "field_type", "fmt_type")


def _norm(tp: Any) -> Any:
    """Strip ``Annotated`` (keeping an :class:`ArraySpec`), recursively."""
    if get_origin(tp) is Annotated:
        base, *meta = get_args(tp)
        for m in meta:
            if isinstance(m, ArraySpec):
                return m
        return _norm(base)
    args = get_args(tp)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return Union[tuple(_norm(a) for a in args)]  # noqa: UP007 - rebuilding a Union
    if origin is not None and args and origin is not Literal:
        try:
            return origin[tuple(_norm(a) for a in args)]
        except TypeError:  # pragma: no cover - an origin that cannot be re-subscripted
            return tp
    return tp


def field_type(info: FieldInfo) -> Any:
    """A field's annotation in comparable form (an :class:`ArraySpec` for array fields)."""
    for m in info.metadata:
        if isinstance(m, ArraySpec):
            return m
    return _norm(info.annotation)


def fmt_type(tp: Any) -> str:
    """A short, readable spelling: ``str``, ``list[int]``, ``int | None``, ``Array[...]``."""
    if isinstance(tp, ArraySpec) or tp is Any:
        return repr(tp).removeprefix("typing.")
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(fmt_type(a) for a in args)
    if origin is Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None:
        name = getattr(origin, "__name__", repr(origin))
        return f"{name}[{', '.join(fmt_type(a) for a in args)}]" if args else name
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", repr(tp).removeprefix("typing."))


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def assignable(src: Any, dst: Any) -> bool:
    """Whether every value of type ``src`` is a value of type ``dst`` (see module doc)."""
    if dst is Any or src is Any or dst is object:
        return True
    if isinstance(src, ArraySpec) or isinstance(dst, ArraySpec):
        return isinstance(src, ArraySpec) and isinstance(dst, ArraySpec) and not dst.mismatch(src)
    if src == dst:
        return True
    if _is_union(src):
        return all(assignable(s, dst) for s in get_args(src))
    if _is_union(dst):
        return any(assignable(src, d) for d in get_args(dst))
    if get_origin(src) is Literal:
        if get_origin(dst) is Literal:
            return set(get_args(src)) <= set(get_args(dst))
        return all(assignable(type(v), dst) for v in get_args(src))
    if get_origin(dst) is Literal:
        return False
    if src is int and dst is float:
        return True
    s_origin, d_origin = get_origin(src) or src, get_origin(dst) or dst
    if not (isinstance(s_origin, type) and isinstance(d_origin, type)):
        return False
    if not issubclass(s_origin, d_origin):
        return False
    d_args = get_args(dst)
    if not d_args:
        return True
    s_args = get_args(src)
    return len(s_args) == len(d_args) and all(
        assignable(s, d) for s, d in zip(s_args, d_args, strict=True)
    )


def edge_problem(src: FieldInfo, dst: FieldInfo) -> str | None:
    """Why a ``src`` field may not feed a ``dst`` field, or ``None`` if it may."""
    s, d = field_type(src), field_type(dst)
    if isinstance(s, ArraySpec) and isinstance(d, ArraySpec):
        return d.mismatch(s)
    return None if assignable(s, d) else "types differ"
