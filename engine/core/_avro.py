"""The Avro pieces the codec is built from: binary primitives, and the
checked type tree of a parsed event schema (engine/core/codec.py).

The primitives are what the generated code (engine/core/_codegen.py)
inlines or calls; the type tree is what it is generated from, and what
maps fastavro's resolved dicts of older schema versions onto the
dataclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any, NamedTuple, NoReturn

from stepline import schemas
from stepline.core import events
from stepline.core.events import Event
from stepline.errors import SchemaError

_Schema = Any  # a parsed fastavro schema node: str, list or dict
Encoder = Callable[[Any], bytes]
Reader = Callable[[bytes, int], tuple[Any, int]]
FromDict = Callable[[Any], Any]

# Record full name -> the class it maps to. Field names match one to one.
_CLASSES: dict[str, type] = {
    f"{schemas.NAMESPACE}.{cls.__name__}": cls
    for cls in (Event, events.Payload, events.ErrorInfo, events.CopiedStep, *events.BODY_TYPES)
}


# --- Avro binary primitives --------------------------------------------------
# The generated code inlines the common cases and calls these for the rest.

_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1
_BYTE = [bytes((b,)) for b in range(256)]
# Zig-zag varints of -64..63 are one byte; most ints are small: _SMALL[n + 64].
_SMALL = [_BYTE[(n << 1) ^ (n >> 63)] for n in range(-64, 64)]
_UNZIG = [(b >> 1) ^ -(b & 1) for b in range(128)]
_BYTES_TYPES = (bytes, bytearray)


def _long_bytes(n: int) -> bytes:
    """The zig-zag varint of an Avro long."""
    if n >= 0:
        if n > _LONG_MAX:
            raise OverflowError(f"{n} does not fit an Avro long")
        z = n << 1
    else:
        if n < _LONG_MIN:
            raise OverflowError(f"{n} does not fit an Avro long")
        z = ~n << 1 | 1
    if z < 0x80:
        return _BYTE[z]
    if z < 0x4000:
        return bytes((z & 0x7F | 0x80, z >> 7))
    if 0x800000000 <= z < 0x40000000000:  # six bytes: timestamps in ms
        h = z >> 21  # two 21-bit halves: small-int arithmetic from here
        z &= 0x1FFFFF
        return bytes((
            z & 0x7F | 0x80, z >> 7 & 0x7F | 0x80, z >> 14 | 0x80,
            h & 0x7F | 0x80, h >> 7 & 0x7F | 0x80, h >> 14,
        ))
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _int_bytes(n: int) -> bytes:
    if not _INT_MIN <= n <= _INT_MAX:
        raise OverflowError(f"{n} does not fit an Avro int")
    return _long_bytes(n)


# The varints (one or two bytes) of lengths below this, by length.
_LEN_TABLE = 2048
_LEN = [_long_bytes(n) for n in range(_LEN_TABLE)]


def _expected(what: str, value: Any) -> NoReturn:
    raise TypeError(f"expected {what}, got {type(value).__name__}")


def _get_long(data: bytes, pos: int) -> tuple[int, int]:
    b = data[pos]
    if b < 0x80:
        return _UNZIG[b], pos + 1
    n = b & 0x7F
    for shift in (7, 14, 21, 28, 35, 42, 49, 56, 63):
        pos += 1
        b = data[pos]
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos + 1
    raise ValueError("varint longer than 10 bytes")


def _bad_length(n: int, pos: int, size: int) -> NoReturn:
    raise ValueError(f"length {n} at offset {pos} runs past the end ({size} bytes)")


# A length byte -> the length it encodes, None if it is not a one-byte length.
_LENGTH = [b >> 1 if b < 0x80 and not b & 1 else None for b in range(256)]


def _get_length(data: bytes, pos: int) -> tuple[int, int]:
    """A string or bytes length that is not one byte, or a negative one."""
    n, pos = _get_long(data, pos)
    if n < 0:
        _bad_length(n, pos, len(data))
    return n, pos


def _bad_byte(what: str, b: int, pos: int) -> NoReturn:
    raise ValueError(f"{what} byte {b} at offset {pos}")


def _read_block_count(data: bytes, pos: int) -> tuple[int, int]:
    """Array/map block count; a negative count is followed by the block's size."""
    count, pos = _get_long(data, pos)
    if count < 0:
        count = -count
        _, pos = _get_long(data, pos)
    # Guards against a huge count in garbage; holds because every array and
    # map item in the event schemas takes at least one byte.
    if count > len(data) - pos:
        raise ValueError(f"block of {count} items at offset {pos} exceeds the data")
    return count, pos


def _branch_table(readers: tuple[Reader, ...]) -> list[Reader]:
    """Union readers indexed by the branch's first byte, called after that byte.

    Branch indexes 0..63 are one byte (2 * index); a longer varint (a big
    union, or a non-minimal encoding) takes the general path.
    """
    count = len(readers)

    def general(data: bytes, pos: int) -> tuple[Any, int]:
        index, pos = _get_long(data, pos - 1)
        if not 0 <= index < count:
            raise ValueError(f"union branch {index} out of range at offset {pos}")
        return readers[index](data, pos)

    def bad(data: bytes, pos: int) -> tuple[Any, int]:
        raise ValueError(f"union branch {_UNZIG[data[pos - 1]]} out of range at offset {pos}")

    table: list[Reader] = [bad] * 256
    table[0x80:] = [general] * 128
    for index, read in enumerate(readers[:64]):
        table[index << 1] = read
    return table


# --- schema -> validated type tree ------------------------------------------------


class _Prim(NamedTuple):
    name: str  # null, boolean, int, long, string, bytes


class _Record(NamedTuple):
    name: str
    cls: type
    fields: tuple[tuple[str, _Type], ...]  # in schema (wire) order
    declared: tuple[str, ...]  # the dataclass's field order


class _Optional(NamedTuple):
    inner: _Type  # the union [null, inner]


class _Union(NamedTuple):
    branches: tuple[_Record, ...]  # a union of records


class _Array(NamedTuple):
    items: _Type


class _Map(NamedTuple):
    values: _Type


_Type = _Prim | _Record | _Optional | _Union | _Array | _Map

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "string", "bytes"})


class _Compiler:
    """Checks a parsed schema and builds its `_Type` tree; named records once.

    Refuses, when the codec is built, what the generated code cannot handle
    and records that do not match their dataclass.
    """

    def __init__(self) -> None:
        self.named: dict[str, _Record] = {}

    def node(self, schema: _Schema) -> _Type:
        if isinstance(schema, str):
            if schema in _PRIMITIVES:
                return _Prim(schema)
            if schema in self.named:
                return self.named[schema]
            raise SchemaError(f"codec: reference to undefined or recursive type {schema!r}")
        if isinstance(schema, list):
            return self.union(schema)
        kind = schema["type"]
        if "logicalType" in schema:
            raise SchemaError(f"codec: logical types are not supported ({schema['logicalType']})")
        if kind == "record":
            return self.record(schema)
        if kind == "array":
            return _Array(self.node(schema["items"]))
        if kind == "map":
            return _Map(self.node(schema["values"]))
        if kind in _PRIMITIVES:
            return self.node(kind)
        raise SchemaError(f"codec: Avro type {kind!r} is not supported by the compiled codec")

    def record(self, schema: dict[str, Any]) -> _Record:
        name = schema["name"]
        cls = _CLASSES.get(name)
        if cls is None:
            raise SchemaError(f"codec: no event class for record {name}")
        names = tuple(f["name"] for f in schema["fields"])
        declared = tuple(f.name for f in dataclasses.fields(cls))
        if set(names) != set(declared):
            raise SchemaError(
                f"codec: record {name} has fields {sorted(names)} but {cls.__name__} "
                f"has {sorted(declared)}; keep events.py and the schema in step"
            )
        fields = tuple((f["name"], self.node(f["type"])) for f in schema["fields"])
        record = _Record(name, cls, fields, declared)
        self.named[name] = record
        return record

    def union(self, branches: list[_Schema]) -> _Type:
        if len(branches) == 2 and branches[0] == "null":
            return _Optional(self.node(branches[1]))
        nodes = [self.node(b) for b in branches]
        records = tuple(n for n in nodes if isinstance(n, _Record))
        if len(records) != len(nodes):
            names = [b["name"] if isinstance(b, dict) else b for b in branches]
            raise SchemaError(f"codec: only [null, T] and unions of records supported: {names}")
        return _Union(records)


@functools.cache
def _slot_setters(cls: type) -> dict[str, Callable[[Any, Any], None]] | None:
    """The slot setters of `cls` if calling it does nothing but store the fields.

    True of the event classes: slotted frozen dataclasses with the `__init__`
    that @dataclass writes and no `__post_init__`. Such an `__init__` stores
    each field with `object.__setattr__` (the class is frozen), which makes
    building the objects the largest part of decoding; storing through the
    slot descriptors directly halves that. Any other class is called.
    """
    init = getattr(cls.__dict__.get("__init__"), "__code__", None)
    if (
        not dataclasses.is_dataclass(cls)
        or hasattr(cls, "__post_init__")
        or cls.__new__ is not object.__new__
        or init is None
        or init.co_filename != "<string>"  # written by @dataclass, not by hand
    ):
        return None
    setters = {}
    for f in dataclasses.fields(cls):
        slot = cls.__dict__.get(f.name)
        if not isinstance(slot, types.MemberDescriptorType):
            return None
        setters[f.name] = slot.__set__
    return setters


def _same(v: Any) -> Any:
    return v


def _from_dict(node: _Type) -> FromDict:
    """fastavro's resolved dicts (older writer schemas) -> dataclasses."""
    if isinstance(node, _Prim):
        return _same
    if isinstance(node, _Record):
        cls = node.cls
        fields_d = tuple((n, _from_dict(t)) for n, t in node.fields)
        return lambda d: cls(**{n: conv(d[n]) for n, conv in fields_d})
    if isinstance(node, _Optional):
        conv = _from_dict(node.inner)
        return lambda v: None if v is None else conv(v)
    if isinstance(node, _Union):
        # fastavro's return_record_name notation: (full name, record dict)
        by_name = {r.name: _from_dict(r) for r in node.branches}
        return lambda value: by_name[value[0]](value[1])
    if isinstance(node, _Array):
        conv = _from_dict(node.items)
        return lambda vs: tuple(conv(v) for v in vs)
    conv = _from_dict(node.values)
    return lambda d: {k: conv(v) for k, v in d.items()}
