"""Knob types: each field of a method, selector or `VTA` checked against its annotation when it is built.

The classes' own `validate()` checks ranges; this checks what the annotation promises first, so that a bad
value fails at construction with the knob's name instead of deep inside a run: `True` is not an `int`
(`keep=true` would keep one token), `1.5` is not an `int`, NaN and infinities are not numbers a knob can
take, a string is not a number, and an integer fits in 64 bits (knobs end up in tensors). An `int` given
for a `float` knob becomes a float and a list given for a tuple becomes a tuple, so a knob holds its
annotated type afterwards (`st3.match` reads it).

    check_types(self)   # the first line of a base class's __post_init__
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import types
import typing
from functools import cache

__all__ = ["check_types", "knob_types", "unknown_knobs"]


def check_types(obj) -> None:
    """Raise ValueError('<knob>: must be ..., got ...') unless every init field of the dataclass `obj` holds a
    value of its annotated type; store the normalised value (int -> float, list -> tuple)."""
    for name, kind in knob_types(type(obj)).items():
        setattr(obj, name, _coerce(name, getattr(obj, name), kind))


def unknown_knobs(cls: type, knobs: dict, owner: str) -> None:
    """Raise ValueError('<knob>: not a knob of <owner>; its knobs: ...') for the first name `cls` does not take."""
    valid = list(knob_types(cls))
    for name in knobs:
        if name not in valid:
            raise UnknownKnob(f"{name}: not a knob of {owner}; its knobs: {', '.join(valid)}")


class UnknownKnob(ValueError, TypeError):
    """An unknown knob: a ValueError like every bad knob, and the TypeError a dataclass raises for it."""


@cache
def knob_types(cls: type) -> dict[str, object]:
    """{knob: its annotation, evaluated} for the init fields of the dataclass `cls` (a subclass's own first)."""
    def origin(field: dataclasses.Field) -> int:  # the class that introduced it: a method's own knobs come first
        return max(i for i, c in enumerate(cls.__mro__) if field.name in c.__dict__.get("__annotations__", {}))

    chosen = sorted((f for f in dataclasses.fields(cls) if f.init), key=origin)
    return {field.name: _resolve(cls, field) for field in chosen}


def describe(kind) -> str:
    """The values a knob of annotation `kind` accepts, in words ('an integer or None')."""
    arms = typing.get_args(kind) if _is_union(kind) else (kind,)
    words = [_WORDS.get(arm) or _describe_arm(arm) for arm in arms]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# ----------------------------------------------------------------------------------------------- private
_WORDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "None"}


def _describe_arm(arm) -> str:
    if typing.get_origin(arm) is tuple:
        return f"a list of {describe(typing.get_args(arm)[0]).removeprefix('an ').removeprefix('a ')}s"
    return f"a {arm.__name__}"


def _is_union(kind) -> bool:
    return typing.get_origin(kind) is typing.Union or isinstance(kind, types.UnionType)


def _resolve(cls: type, field: dataclasses.Field):
    """The field's annotation as an object, evaluated in the module of the class that declared it last."""
    if not isinstance(field.type, str):
        return field.type
    owner = next(c for c in cls.__mro__ if field.name in c.__dict__.get("__annotations__", {}))
    return eval(field.type, vars(sys.modules[owner.__module__]))


class _Refused(Exception):
    pass


def _coerce(name: str, value, kind):
    try:
        return _accept(value, kind)
    except _Refused:
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ValueError(f"{name}: must fit in 64 bits (it becomes a tensor value), got {value}") from None
        shown = f"{value!r} ({type(value).__name__})" if not isinstance(value, float) else repr(value)
        raise ValueError(f"{name}: must be {describe(kind)}, got {shown}") from None


def _accept(value, kind):
    """`value` as a `kind` (int -> float, list -> tuple), or raise _Refused."""
    if _is_union(kind):
        for arm in typing.get_args(kind):
            try:
                return _accept(value, arm)
            except _Refused:
                continue
        raise _Refused
    if kind is type(None):
        if value is None:
            return value
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
            return int(value)
    elif kind is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if isinstance(value, (list, tuple)):
            return tuple(_accept(v, item) for v in value)
    elif isinstance(kind, type):
        if isinstance(value, kind):
            return value
    else:
        raise TypeError(f"st3.knobs cannot check a knob annotated {kind!r}: annotate it with a plain type")
    raise _Refused
