"""The code generator of the codec's hot path (engine/core/codec.py, "Why
generated code"): writes, compiles and loads the Python module with the
encoder and reader of one schema.
"""

from __future__ import annotations

import keyword
import linecache
from collections.abc import Callable
from typing import Any, TypeVar

from stepline.core._avro import (
    _BYTE,
    _BYTES_TYPES,
    _LEN,
    _LEN_TABLE,
    _LENGTH,
    _SMALL,
    _UNZIG,
    Encoder,
    Reader,
    _Array,
    _bad_byte,
    _bad_length,
    _branch_table,
    _expected,
    _get_length,
    _get_long,
    _int_bytes,
    _long_bytes,
    _Map,
    _Optional,
    _Prim,
    _read_block_count,
    _Record,
    _slot_setters,
    _Type,
    _Union,
)
from stepline.errors import SchemaError


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


_G = TypeVar("_G", bound="_Module")


def _once(make: Callable[[_G, Any], str]) -> Callable[[_G, Any], str]:
    """Generate a helper once per distinct node and reuse its name."""

    def cached(gen: _G, node: Any) -> str:
        key = (make.__name__, node)
        if key not in gen.helpers:
            gen.helpers[key] = make(gen, node)
        return gen.helpers[key]

    return cached


class _Module:
    """The generated module: its functions, module-level statements and globals."""

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


class _Encoders(_Module):
    """Encoding: statements into `fn`, returns the part expressions."""

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


class _Readers(_Module):
    """Decoding: statements into `fn` that set `target` and advance `pos`."""

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


class _Generator(_Encoders, _Readers):
    """Writes the Python module with the encoder and reader of one schema.

    Encoders are expressions of `bytes` parts, joined once per function;
    readers are statements that assign a local and advance `pos` over
    `data` (of length `size`). Records are inlined where they occur;
    unions of records and array/map bodies become functions of their own.
    """


def generate(root: _Type, header: bytes, label: str) -> tuple[Encoder, Reader, str]:
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
