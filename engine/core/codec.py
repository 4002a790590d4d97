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

import functools
from collections.abc import Iterable
from io import BytesIO
from typing import Any, cast

from fastavro import parse_schema, schemaless_reader
from fastavro.schema import fingerprint as _avro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from stepline import schemas
from stepline.core._avro import _Compiler, _from_dict, _get_long
from stepline.core._codegen import generate
from stepline.core.events import Event
from stepline.errors import MalformedEvent, SchemaError, UnknownSchemaVersion

__all__ = ["Codec", "MARKER", "encode", "decode", "fingerprint", "peek_envelope", "peek_type",
           "schema_fingerprint"]

MARKER = b"\xc3\x01"
_HEADER_LEN = 10  # marker + 8-byte fingerprint



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
        self._encode, self._read, self.source = generate(
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


def peek_type(value: bytes) -> bytes:
    """The envelope's `type` without decoding the event; b"" for bytes too short.

    The envelope starts with two strings, event_id then type (an evolution
    rule of schemas/), so the type sits right after the first string, in
    every schema version. A reader that sees every event of a partition and
    needs only a few kinds (the client's result watcher, the pause fold)
    keeps the others at a few hundred nanoseconds each.
    """
    try:
        n, pos = _get_long(value, _HEADER_LEN)
        n2, pos = _get_long(value, pos + n)
    except (IndexError, ValueError):
        return b""
    return value[pos : pos + n2]


def peek_envelope(value: bytes) -> tuple[str, str, int, int] | None:
    """(type, run_id, seq, epoch) of an event in the current schema, without
    decoding its body; None for another schema version or bytes that do not
    parse (the caller decodes those in full, which reports what is wrong).

    A rebuild folds a long log only to find most runs ended: it reads the
    envelopes first and decodes the bodies of the runs it must keep
    (projections/catchup.py). The envelope's first seven fields are
    event_id, type, run_id, task_id, seq, time, epoch in every version, but
    only the current writer's header is trusted here: that is the layout
    read by this code.
    """
    if value[:_HEADER_LEN] != _default()._header:
        return None
    try:
        n, pos = _get_long(value, _HEADER_LEN)  # event_id
        n, pos = _get_long(value, pos + n)  # type
        kind = value[pos : pos + n].decode()
        n2, pos = _get_long(value, pos + n)  # run_id
        run_id = value[pos : pos + n2].decode()
        n, pos = _get_long(value, pos + n2)  # task_id
        seq, pos = _get_long(value, pos + n)
        _, pos = _get_long(value, pos)  # time
        epoch, pos = _get_long(value, pos)
    except (IndexError, ValueError):
        return None
    if pos > len(value):
        return None
    return kind, run_id, seq, epoch
