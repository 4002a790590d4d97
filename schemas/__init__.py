"""Avro schemas of Stepline's events, one `.avsc` file per named record.

`Event.avsc` is the envelope; it refers to the body records by full name.
`event_schema()` inlines them into one self-contained schema, which is what
the codec parses and what `history/Event.v<N>.avsc` freezes per release.
`Event.current.avsc` is the same schema written out, for other tools (Avro's
classic `Schema.Parser` reads one file): `python -m stepline.schemas`
rewrites it. See README.md in this folder for the evolution rules.

Nothing here reads files at import time; the functions read on each call and
the codec calls them once.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, cast

__all__ = [
    "NAMESPACE", "SCHEMA_DIR", "HISTORY_DIR", "CURRENT_FILE",
    "load", "event_schema", "history_schemas", "current_text",
]

NAMESPACE = "io.stepline"

# The package data is installed as plain files (editable or from a wheel), so
# the resource root is a real directory; Path() makes that explicit.
SCHEMA_DIR: Path = Path(str(resources.files(__name__)))
HISTORY_DIR: Path = SCHEMA_DIR / "history"
# The expanded current schema in one file; generated, never edited by hand.
CURRENT_FILE: Path = SCHEMA_DIR / "Event.current.avsc"

Schema = dict[str, Any]


def load(name: str) -> Schema:
    """One record schema as written in `<name>.avsc`, named records not inlined."""
    schema: Schema = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text(encoding="utf-8"))
    return schema


def _records() -> dict[str, Schema]:
    """Every schema file, keyed by the record's full name."""
    out: dict[str, Schema] = {}
    for path in sorted(SCHEMA_DIR.glob("*.avsc")):
        if path.name == CURRENT_FILE.name:
            continue  # generated from the others
        schema = json.loads(path.read_text(encoding="utf-8"))
        out[f"{schema.get('namespace', NAMESPACE)}.{schema['name']}"] = schema
    return out


def _inline(node: Any, records: dict[str, Schema], defined: set[str]) -> Any:
    """Replace each named reference by its definition, the first time only.

    Avro forbids defining a name twice, so later references stay names; the
    depth-first order makes the result deterministic.
    """
    if isinstance(node, str):
        full = node if "." in node else f"{NAMESPACE}.{node}"
        if full in records and full not in defined:
            return _inline(records[full], records, defined)
        return node
    if isinstance(node, list):
        return [_inline(branch, records, defined) for branch in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    if node.get("type") == "record":
        defined.add(f"{node.get('namespace', NAMESPACE)}.{node['name']}")
        out["fields"] = [
            {**fld, "type": _inline(fld["type"], records, defined)} for fld in node["fields"]
        ]
        return out
    for key in ("type", "items", "values"):
        if key in node:
            out[key] = _inline(node[key], records, defined)
    return out


def event_schema() -> Schema:
    """The current envelope schema with every named record inlined (a fresh dict)."""
    records = _records()
    return cast(Schema, _inline(records[f"{NAMESPACE}.Event"], records, set()))


def history_schemas() -> dict[str, Schema]:
    """Every frozen envelope schema in `history/`, keyed by file stem (`Event.v1`)."""
    return {
        path.name.removesuffix(".avsc"): json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(HISTORY_DIR.glob("*.avsc"))
    }


def current_text() -> str:
    """What `Event.current.avsc` holds: `event_schema()` as the history files
    are written (two-space JSON, a final newline)."""
    return json.dumps(event_schema(), indent=2) + "\n"
