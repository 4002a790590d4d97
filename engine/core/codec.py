"""Events to bytes and back: Avro single-object encoding.

Wire format (Avro spec, "Single-object encoding"):

    C3 01 | 8-byte little-endian CRC-64-AVRO fingerprint | Avro binary body

The fingerprint is that of the writer schema's Parsing Canonical Form, so a
reader knows which schema wrote the bytes. Known writer schemas are the
current one plus every frozen `schemas/history/*.avsc`.

Two paths, one format:

* Current schema (the hot path, ~30k events/s): a codec generated once from
  the parsed schema as Python source, straight-line code per record type
  that writes the dataclasses to Avro binary and reads them back (see
  "Why generated code" below). fastavro's generic
  `schemaless_writer`/`schemaless_reader` interpret the schema dict on every
  call and cost ~13 µs each for a typical event, far over the budget. The
  generator handles only the Avro types the event schemas use and refuses
  anything else when it is built, and the tests check its bytes against
  fastavro's for every body type and for random events.
* Older schema versions: fastavro resolves the writer schema into the
  current reader schema (defaults, added branches, aliases), then the
  resulting dicts are mapped onto the dataclasses.

fastavro also parses and validates the schemas and computes canonical forms
and fingerprints. Schemas are read and compiled once, on first use.

Why generated code: encoding is about a quarter of a worker's CPU and
decoding another twentieth. The previous codec composed one closure per
schema node and looped over each record's fields; with 15-25 fields per
event, the calls per field and per value were most of the cost. The
generated functions read each attribute once, inline the primitives
(lengths and small ints come from lookup tables), build the output with one
`bytes.join`, and dispatch on the body's class once, to a function that
writes the whole event. Readers parse every field inline and store the
values straight into the slots of the frozen dataclasses (`_slot_setters`).
The bytes are exactly those fastavro writes (the tests compare them).
`Codec.source` holds the generated module; tracebacks show its lines.
"""

from __future__ import annotations

import dataclasses
import functools
import keyword
import linecache
import types
from collections.abc import Callable, Iterable
from io import BytesIO
from typing import Any, NamedTuple, NoReturn, cast

from fastavro import parse_schema, schemaless_reader
from fastavro.schema import fingerprint as _avro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from stepline import schemas
from stepline.core import events
from stepline.core.events import Event
from stepline.errors import MalformedEvent, SchemaError, UnknownSchemaVersion

__all__ = ["Codec", "MARKER", "encode", "decode", "fingerprint", "schema_fingerprint"]

MARKER = b"\xc3\x01"
_HEADER_LEN = 10  # marker + 8-byte fingerprint

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


# --- the code generator ----------------------------------------------------------


class _Function:
    """Lines of one generated function."""

    def __init__(self, header: str) -> None:
        self.lines = [header]

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)


def _cat(parts: list[str], ind: int = 0) -> str:
    """An expression for the concatenation of byte-string expressions."""
    if len(parts) == 1:
        return parts[0]
    if len(parts) <= 3:
        return " + ".join(parts)
    pad = "    " * (ind + 1)
    return "_join((\n" + "".join(f"{pad}{p},\n" for p in parts) + "    " * ind + "))"


_PRESENT = repr(b"\x02")  # zig-zag of branch 1 of [null, T]


def _attr(obj: str, name: str) -> str:
    return f"getattr({obj}, {name!r})" if keyword.iskeyword(name) else f"{obj}.{name}"


def _once(make: Callable[[_Generator, Any], str]) -> Callable[[_Generator, Any], str]:
    """Generate a helper once per distinct node and reuse its name."""

    def cached(gen: _Generator, node: Any) -> str:
        key = (make.__name__, node)
        if key not in gen.helpers:
            gen.helpers[key] = make(gen, node)
        return gen.helpers[key]

    return cached


class _Generator:
    """Writes the Python module with the encoder and reader of one schema.

    Encoders are expressions of `bytes` parts, joined once per function;
    readers are statements that assign a local and advance `pos` over
    `data` (of length `size`). Records are inlined where they occur;
    unions of records and array/map bodies become functions of their own.
    """

    def __init__(self, header: bytes) -> None:
        self.functions: list[_Function] = []
        self.tail: list[str] = []  # module-level statements after the functions
        self.namespace: dict[str, Any] = {
            "_HEAD": header,
            "_new": object.__new__,
            "_join": b"".join,
            "_BYTE": _BYTE,
            "_SMALL": _SMALL,
            "_LEN": _LEN,
            "_UNZIG": _UNZIG,
            "_BYTES_TYPES": _BYTES_TYPES,
            "_long_bytes": _long_bytes,
            "_int_bytes": _int_bytes,
            "_expected": _expected,
            "_get_long": _get_long,
            "_LENGTH": _LENGTH,
            "_get_length": _get_length,
            "_bad_length": _bad_length,
            "_bad_byte": _bad_byte,
            "_read_block_count": _read_block_count,
            "_branch_table": _branch_table,
        }
        self.counter = 0
        self.helpers: dict[tuple[str, _Type], str] = {}  # one function per distinct node

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, name: str, value: Any) -> str:
        """A module global named `name` holding `value` (a class, a slot setter)."""
        if self.namespace.get(name, value) is not value:
            raise SchemaError(f"codec: two values for the generated name {name}")
        self.namespace[name] = value
        return name

    def function(self, header: str) -> _Function:
        fn = _Function(header)
        self.functions.append(fn)
        return fn

    def source(self) -> str:
        blocks = ["\n".join(fn.lines) for fn in self.functions]
        return "\n\n\n".join(blocks) + "\n\n\n" + "\n".join(self.tail) + "\n"

    # --- encoding: statements into `fn`, returns the part expressions ------------

    def enc(self, node: _Type, expr: str, fn: _Function, ind: int) -> list[str]:
        if isinstance(node, _Prim):
            return self.enc_prim(node.name, expr, fn, ind)
        if isinstance(node, _Record):
            if not expr.isidentifier():
                obj = self.fresh("r")
                fn.emit(ind, f"{obj} = {expr}")
                expr = obj
            parts: list[str] = []
            for name, field in node.fields:
                fn.emit(ind, f"# {node.cls.__name__}.{name}")
                parts += self.enc(field, _attr(expr, name), fn, ind)
            return parts
        if isinstance(node, _Optional):
            v, p = self.fresh("v"), self.fresh("p")
            fn.emit(ind, f"{v} = {expr}")
            fn.emit(ind, f"if {v} is None:")
            fn.emit(ind + 1, f"{p} = b'\\x00'")
            fn.emit(ind, "else:")
            inner = self.enc(node.inner, v, fn, ind + 1)
            fn.emit(ind + 1, f"{p} = {_cat([_PRESENT, *inner])}")
            return [p]
        if isinstance(node, _Union):
            table = self.union_encoder(node)
            v = self.fresh("v")
            fn.emit(ind, f"{v} = {expr}")
            return [f"{table}[type({v})]({v})"]
        if isinstance(node, _Array):
            encode = self.array_encoder(node)
            v = self.fresh("v")
            fn.emit(ind, f"{v} = {expr}")
            return [f"(b'\\x00' if {v} == () else {encode}({v}))"]
        encode = self.map_encoder(node)
        v = self.fresh("v")
        fn.emit(ind, f"{v} = {expr}")
        return [f"({encode}({v}) if {v} else b'\\x00')"]

    def enc_prim(self, kind: str, expr: str, fn: _Function, ind: int) -> list[str]:
        if kind in ("string", "bytes"):
            b, n = self.fresh("b"), self.fresh("n")
            if kind == "string":
                fn.emit(ind, f"{b} = {expr}.encode()")
            else:
                fn.emit(ind, f"{b} = {expr}")
                fn.emit(ind, f"if type({b}) is not bytes and not isinstance({b}, _BYTES_TYPES):")
                fn.emit(ind + 1, f"_expected('bytes', {b})")
            fn.emit(ind, f"{n} = len({b})")
            return [f"(_LEN[{n}] if {n} < {_LEN_TABLE} else _long_bytes({n}))", b]
        if kind in ("int", "long"):
            n = self.fresh("n")
            fn.emit(ind, f"{n} = {expr}")
            slow = "_int_bytes" if kind == "int" else "_long_bytes"
            # -64 <= n < 64 zig-zags to one byte; also refuses non-numbers.
            return [f"(_SMALL[{n} + 64] if -64 <= {n} < 64 else {slow}({n}))"]
        v = self.fresh("v")
        fn.emit(ind, f"{v} = {expr}")
        if kind == "boolean":
            return [
                f"(b'\\x01' if {v} is True else b'\\x00' if {v} is False "
                f"else _expected('bool', {v}))"
            ]
        assert kind == "null", kind
        return [f"(b'' if {v} is None else _expected('None', {v}))"]

    def record_encoder(self, fn: _Function, record: _Record, expr: str, prefix: list[str]) -> None:
        """Body of a function returning the bytes of `record` after `prefix`."""
        parts = prefix + self.enc(record, expr, fn, 1)
        fn.emit(1, f"return {_cat(parts, 1)}")

    @_once
    def union_encoder(self, node: _Union) -> str:
        """A dict: record class -> function writing branch index and record."""
        table = self.fresh("_ENCODE_UNION")
        entries = []
        for index, record in enumerate(node.branches):
            name = self.fresh(f"_encode_{record.cls.__name__}_")
            fn = self.function(f"def {name}(o):")
            self.record_encoder(fn, record, "o", [repr(_long_bytes(index))])
            cls = self.const(record.cls.__name__, record.cls)
            entries.append(f"{cls}: {name}")
        self.tail.append(f"{table} = {{{', '.join(entries)}}}")
        return table

    @_once
    def array_encoder(self, node: _Array) -> str:
        name = self.fresh("_encode_array")
        fn = self.function(f"def {name}(seq):")
        fn.emit(1, "if isinstance(seq, (str, bytes, dict)):")
        fn.emit(2, "_expected('a sequence', seq)")
        fn.emit(1, "items = tuple(seq)")
        fn.emit(1, "if not items:")
        fn.emit(2, "return b'\\x00'")
        fn.emit(1, "parts = [_long_bytes(len(items))]")
        fn.emit(1, "for item in items:")
        parts = self.enc(node.items, "item", fn, 2)
        fn.emit(2, f"parts += ({', '.join(parts)},)")
        fn.emit(1, "parts.append(b'\\x00')")
        fn.emit(1, "return _join(parts)")
        return name

    @_once
    def map_encoder(self, node: _Map) -> str:
        name = self.fresh("_encode_map")
        fn = self.function(f"def {name}(d):")
        fn.emit(1, "parts = [_long_bytes(len(d))]")
        fn.emit(1, "for key, value in d.items():")
        parts = self.enc_prim("string", "key", fn, 2) + self.enc(node.values, "value", fn, 2)
        fn.emit(2, f"parts += ({', '.join(parts)},)")
        fn.emit(1, "parts.append(b'\\x00')")
        fn.emit(1, "return _join(parts)")
        return name

    def root_encoder(self, root: _Type) -> None:
        """`encode(obj)`: header and body, bytes ready for the log.

        A root record with a union-of-records field (the event body) gets a
        function per branch that writes the whole event, picked by the class
        of that field's value: one dispatch per event, everything inlined.
        """
        split = None
        if isinstance(root, _Record):
            split = next(((n, t) for n, t in root.fields if isinstance(t, _Union)), None)
        if split is not None and isinstance(root, _Record):
            split_name, union = split
            entries = []
            for index, branch in enumerate(union.branches):
                name = self.fresh(f"_encode_{root.cls.__name__}_{branch.cls.__name__}_")
                fn = self.function(f"def {name}(o):")
                parts = ["_HEAD"]
                for field_name, field in root.fields:
                    fn.emit(1, f"# {root.cls.__name__}.{field_name}")
                    if field_name == split_name:
                        value = self.fresh("r")
                        fn.emit(1, f"{value} = {_attr('o', field_name)}")
                        parts.append(repr(_long_bytes(index)))
                        parts += self.enc(branch, value, fn, 1)
                    else:
                        parts += self.enc(field, _attr("o", field_name), fn, 1)
                fn.emit(1, f"return {_cat(parts, 1)}")
                entries.append(f"{self.const(branch.cls.__name__, branch.cls)}: {name}")
            table = f"_ENCODE_BY_{split_name.upper()}"
            self.tail.append(f"{table} = {{{', '.join(entries)}}}")
            fn = self.function("def encode(o):")
            fn.emit(1, f"return {table}[type({_attr('o', split_name)})](o)")
            return
        fn = self.function("def encode(o):")
        parts = ["_HEAD", *self.enc(root, "o", fn, 1)]
        fn.emit(1, f"return {_cat(parts, 1)}")

    # --- decoding: statements into `fn` that set `target` and advance `pos` -------

    def dec(self, node: _Type, target: str, fn: _Function, ind: int) -> None:
        if isinstance(node, _Prim):
            self.dec_prim(node.name, target, fn, ind)
        elif isinstance(node, _Record):
            values = {name: self.fresh(f"{name}_") for name, _ in node.fields}
            for name, field in node.fields:
                fn.emit(ind, f"# {node.cls.__name__}.{name}")
                self.dec(field, values[name], fn, ind)
            cls = self.const(node.cls.__name__, node.cls)
            setters = _slot_setters(node.cls)
            if setters is None:  # wire order -> the dataclass's order
                fn.emit(ind, f"{target} = {cls}({', '.join(values[n] for n in node.declared)})")
            else:  # what its __init__ would do, in a fraction of the time
                fn.emit(ind, f"{target} = _new({cls})")
                for name in node.declared:
                    setter = self.const(f"_set_{cls}_{name}", setters[name])
                    fn.emit(ind, f"{setter}({target}, {values[name]})")
        elif isinstance(node, _Optional):
            fn.emit(ind, "b = data[pos]")
            fn.emit(ind, "if b == 0:")
            fn.emit(ind + 1, f"{target} = None")
            fn.emit(ind + 1, "pos += 1")
            fn.emit(ind, "elif b == 2:")
            fn.emit(ind + 1, "pos += 1")
            self.dec(node.inner, target, fn, ind + 1)
            fn.emit(ind, "else:")
            fn.emit(ind + 1, "_bad_byte('optional branch', b, pos)")
        elif isinstance(node, _Union):
            table = self.union_reader(node)
            fn.emit(ind, f"{target}, pos = {table}[data[pos]](data, pos + 1)")
        elif isinstance(node, _Array):
            read = self.array_reader(node)
            fn.emit(ind, "if data[pos] == 0:")
            fn.emit(ind + 1, f"{target} = ()")
            fn.emit(ind + 1, "pos += 1")
            fn.emit(ind, "else:")
            fn.emit(ind + 1, f"{target}, pos = {read}(data, pos)")
        else:
            read = self.map_reader(node)
            fn.emit(ind, "if data[pos] == 0:")
            fn.emit(ind + 1, f"{target} = {{}}")
            fn.emit(ind + 1, "pos += 1")
            fn.emit(ind, "else:")
            fn.emit(ind + 1, f"{target}, pos = {read}(data, pos)")

    @staticmethod
    def dec_prim(kind: str, target: str, fn: _Function, ind: int) -> None:
        if kind in ("int", "long"):
            fn.emit(ind, f"{target} = data[pos]")
            fn.emit(ind, f"if {target} < 0x80:")
            fn.emit(ind + 1, f"{target} = _UNZIG[{target}]")
            fn.emit(ind + 1, "pos += 1")
            fn.emit(ind, "else:")
            fn.emit(ind + 1, f"{target}, pos = _get_long(data, pos)")
        elif kind in ("string", "bytes"):
            fn.emit(ind, "n = _LENGTH[data[pos]]")
            fn.emit(ind, "if n is None:")
            fn.emit(ind + 1, "n, pos = _get_length(data, pos)")
            fn.emit(ind, "else:")
            fn.emit(ind + 1, "pos += 1")
            fn.emit(ind, "end = pos + n")
            fn.emit(ind, "if end > size:")
            fn.emit(ind + 1, "_bad_length(n, pos, size)")
            decode = ".decode()" if kind == "string" else ""
            fn.emit(ind, f"{target} = data[pos:end]{decode}")
            fn.emit(ind, "pos = end")
        elif kind == "boolean":
            fn.emit(ind, f"{target} = data[pos]")
            fn.emit(ind, f"if {target} > 1:")
            fn.emit(ind + 1, f"_bad_byte('boolean', {target}, pos)")
            fn.emit(ind, f"{target} = {target} == 1")
            fn.emit(ind, "pos += 1")
        else:
            assert kind == "null", kind
            fn.emit(ind, f"{target} = None")

    def reader_function(self, name: str, node: _Type) -> None:
        fn = self.function(f"def {name}(data, pos):")
        fn.emit(1, "size = len(data)")
        self.dec(node, "value", fn, 1)
        fn.emit(1, "return value, pos")

    @_once
    def union_reader(self, node: _Union) -> str:
        """A table: the branch's first byte -> reader of the rest."""
        names = []
        for record in node.branches:
            name = self.fresh(f"_read_{record.cls.__name__}_")
            self.reader_function(name, record)
            names.append(name)
        table = self.fresh("_READ_UNION")
        self.tail.append(f"{table} = _branch_table(({', '.join(names)},))")
        return table

    @_once
    def array_reader(self, node: _Array) -> str:
        name = self.fresh("_read_array")
        fn = self.function(f"def {name}(data, pos):")
        fn.emit(1, "size = len(data)")
        fn.emit(1, "values = []")
        fn.emit(1, "while True:")
        fn.emit(2, "count, pos = _read_block_count(data, pos)")
        fn.emit(2, "if count == 0:")
        fn.emit(3, "return tuple(values), pos")
        fn.emit(2, "for _ in range(count):")
        self.dec(node.items, "item", fn, 3)
        fn.emit(3, "values.append(item)")
        return name

    @_once
    def map_reader(self, node: _Map) -> str:
        name = self.fresh("_read_map")
        fn = self.function(f"def {name}(data, pos):")
        fn.emit(1, "size = len(data)")
        fn.emit(1, "out = {}")
        fn.emit(1, "while True:")
        fn.emit(2, "count, pos = _read_block_count(data, pos)")
        fn.emit(2, "if count == 0:")
        fn.emit(3, "return out, pos")
        fn.emit(2, "for _ in range(count):")
        self.dec_prim("string", "key", fn, 3)
        self.dec(node.values, "value", fn, 3)
        fn.emit(3, "out[key] = value")
        return name


def _generate(root: _Type, header: bytes, label: str) -> tuple[Encoder, Reader, str]:
    """Generate, compile and load the codec module; returns encode, read, source."""
    gen = _Generator(header)
    gen.root_encoder(root)
    gen.reader_function("read", root)
    source = f"# Generated by stepline.codec for schema {label}; do not edit.\n\n\n" + gen.source()
    filename = f"<stepline.codec generated {label}>"
    namespace = gen.namespace
    exec(compile(source, filename, "exec"), namespace)
    # Lets tracebacks and debuggers show the generated lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return namespace["encode"], namespace["read"], source


# --- the codec ------------------------------------------------------------------


def schema_fingerprint(schema: dict[str, Any]) -> bytes:
    """CRC-64-AVRO of the Parsing Canonical Form, as the 8 little-endian bytes."""
    # fastavro returns the hex of the little-endian bytes, as the spec wants.
    return bytes.fromhex(_avro_fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


class Codec:
    """Encodes with one reader/writer schema; decodes any known writer version.

    `schema` defaults to the current expanded envelope schema and `history`
    to every frozen schema in `schemas/history/`. Build one explicitly to
    read with other versions, e.g. in tests.
    """

    def __init__(
        self,
        schema: dict[str, Any] | None = None,
        history: Iterable[dict[str, Any]] | None = None,
    ) -> None:
        if schema is None:
            schema = schemas.event_schema()
        if history is None:
            history = schemas.history_schemas().values()
        try:
            # fastavro types the result as any schema (str | list | dict);
            # a record schema parses to a record, a dict.
            self._schema = cast(dict[str, Any], parse_schema(schema))
            olders = [cast(dict[str, Any], parse_schema(h)) for h in history]
        except Exception as exc:  # fastavro.schema.SchemaParseException and friends
            raise SchemaError(f"an event schema does not parse: {exc}") from exc
        self.fingerprint = schema_fingerprint(self._schema)
        self._header = MARKER + self.fingerprint
        # fingerprint -> parsed writer schema; None marks the current schema,
        # read by the compiled path without resolution.
        self._writers: dict[bytes, dict[str, Any] | None] = {
            schema_fingerprint(h): h for h in olders
        }
        self._writers[self.fingerprint] = None
        root = _Compiler().node(self._schema)
        self._from_dict = _from_dict(root)
        # The hot path; `source` is the generated module, for reading and debugging.
        self._encode, self._read, self.source = _generate(
            root, self._header, self.fingerprint.hex()
        )

    def known_fingerprints(self) -> frozenset[bytes]:
        return frozenset(self._writers)

    def encode(self, event: Event) -> bytes:
        """Single-object-encode `event` with the current schema."""
        try:
            return self._encode(event)
        except Exception as exc:  # TypeError, AttributeError, OverflowError, KeyError...
            raise SchemaError(
                f"event {getattr(event, 'event_id', '?')} "
                f"({type(getattr(event, 'body', None)).__name__}) does not fit the schema: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def decode(self, data: bytes) -> Event:
        """Decode single-object-encoded bytes written by any known schema version."""
        if not isinstance(data, bytes):
            data = bytes(data)
        if data[:_HEADER_LEN] == self._header:  # the current schema: the hot path
            fp, writer = self.fingerprint, None
        else:
            if len(data) < _HEADER_LEN:
                raise MalformedEvent(f"{len(data)} bytes is shorter than the 10-byte header")
            if data[:2] != MARKER:
                raise MalformedEvent(f"bad marker {data[:2].hex()}, expected c301")
            fp = data[2:_HEADER_LEN]
            try:
                writer = self._writers[fp]
            except KeyError:
                raise UnknownSchemaVersion(
                    f"unknown writer schema fingerprint {fp.hex()} (known: "
                    f"{', '.join(sorted(f.hex() for f in self._writers))}); the bytes come "
                    f"from a newer Stepline, or its schema is missing from schemas/history/"
                ) from None
        try:
            if writer is None:
                event, end = self._read(data, _HEADER_LEN)
            else:
                event, end = self._resolve(data, writer)
        except Exception as exc:  # IndexError, ValueError, UnicodeDecodeError, EOFError...
            raise MalformedEvent(
                f"cannot decode {len(data)} bytes written by schema {fp.hex()}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if end != len(data):
            raise MalformedEvent(
                f"{len(data) - end} trailing bytes after the event (schema {fp.hex()})"
            )
        return event  # type: ignore[no-any-return]  # the root record maps to Event

    def _resolve(self, data: bytes, writer: dict[str, Any]) -> tuple[Any, int]:
        """Read bytes of an older version through fastavro's schema resolution."""
        buf = BytesIO(data)
        buf.seek(_HEADER_LEN)
        record = schemaless_reader(
            buf, writer, self._schema, return_record_name=True, return_record_name_override=True
        )
        return self._from_dict(record), buf.tell()


@functools.cache
def _default() -> Codec:
    return Codec()


def fingerprint() -> bytes:
    """CRC-64-AVRO fingerprint (8 bytes, little-endian) of the current schema."""
    return _default().fingerprint


def encode(event: Event) -> bytes:
    """Single-object-encode `event` with the current schema."""
    return _default().encode(event)


def decode(data: bytes) -> Event:
    """Decode bytes written by the current or any frozen schema version."""
    return _default().decode(data)
