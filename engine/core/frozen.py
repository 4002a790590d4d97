"""Cheaper construction of frozen, slotted dataclasses.

`@dataclass(frozen=True)` writes an `__init__` that stores each field with
`object.__setattr__(self, name, value)`, going around the class's own
refusing `__setattr__`. For a slotted class the slot's descriptor can store
the value directly, at about half the cost per field. The engine builds
several such objects per event (the envelope, its body, payloads, the
fold's step and run states), which made these `__init__`s one of the
largest items of a worker's CPU profile (bench/PROFILE.md).

`fast_init(cls)` swaps in an `__init__` with the same parameters, defaults
and default factories that stores through the slots. It leaves a class
alone (and says so by returning False) unless it is a dataclass with the
`__init__` @dataclass wrote, slots for every field, no `__post_init__`, no
InitVar and no keyword-only or non-init fields, so the result is always
the object the original `__init__` would have built.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any


class _Factory:
    """The default of a field with a default_factory: "call the factory"."""

    def __repr__(self) -> str:
        return "<factory>"  # as dataclasses shows it in signatures


_FACTORY = _Factory()


def fast_init(cls: type) -> bool:
    """Give `cls` a slot-storing `__init__`; False when it does not qualify."""
    init = getattr(cls.__dict__.get("__init__"), "__code__", None)
    if (
        not dataclasses.is_dataclass(cls)
        or not cls.__dataclass_params__.frozen  # type: ignore[attr-defined]  # set by @dataclass
        or hasattr(cls, "__post_init__")
        or cls.__new__ is not object.__new__
        or init is None
        or init.co_filename != "<string>"  # written by @dataclass, not by hand
    ):
        return False
    fields = dataclasses.fields(cls)
    if len(fields) != init.co_argcount - 1:  # InitVars, or fields left out of __init__
        return False
    namespace: dict[str, Any] = {"_FACTORY": _FACTORY}
    params, body = [], []
    for f in fields:
        slot = cls.__dict__.get(f.name)
        if not f.init or f.kw_only or not isinstance(slot, types.MemberDescriptorType):
            return False
        namespace[f"_set_{f.name}"] = slot.__set__
        value = f.name
        if f.default is not dataclasses.MISSING:
            namespace[f"_default_{f.name}"] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        elif f.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_FACTORY")
            value = f"_factory_{f.name}() if {f.name} is _FACTORY else {f.name}"
        else:
            params.append(f.name)
        body.append(f"    _set_{f.name}(self, {value})")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body or ["    pass"])
    exec(compile(source, "<string>", "exec"), namespace)
    new_init = namespace["__init__"]
    new_init.__qualname__ = f"{cls.__qualname__}.__init__"
    new_init.__doc__ = cls.__init__.__doc__
    type.__setattr__(cls, "__init__", new_init)
    return True
