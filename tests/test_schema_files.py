"""The schema files other tools read (schemas/README.md, "Which file to use").

`schemas/Event.current.avsc` is generated from the split files; it must
stay equal to them, parse on its own (no named type left undefined), and
carry the fingerprint the codec writes. The Java side (Avro's classic
`Schema.Parser`) reads it in tests/test_kafka_interop.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import fastavro

from stepline import schemas
from stepline.core import codec
from stepline.core.codec import schema_fingerprint

PRIMITIVES = ("null", "boolean", "int", "long", "float", "double", "bytes", "string")


def _named_references(node: Any, defined: set[str], used: set[str]) -> None:
    if isinstance(node, str):
        if node not in PRIMITIVES:
            used.add(node if "." in node else f"{schemas.NAMESPACE}.{node}")
    elif isinstance(node, list):
        for branch in node:
            _named_references(branch, defined, used)
    elif isinstance(node, dict):
        if node.get("type") in ("record", "enum", "fixed"):
            defined.add(f"{node.get('namespace', schemas.NAMESPACE)}.{node['name']}")
            for field in node.get("fields", []):
                _named_references(field["type"], defined, used)
        elif node.get("type") == "array":
            _named_references(node["items"], defined, used)
        elif node.get("type") == "map":
            _named_references(node["values"], defined, used)
        else:
            _named_references(node["type"], defined, used)


def test_the_current_schema_file_is_the_split_files_expanded() -> None:
    text = schemas.CURRENT_FILE.read_text(encoding="utf-8")
    assert text == schemas.current_text(), (
        "schemas/Event.current.avsc is stale: run `python -m stepline.schemas` and commit it"
    )
    current = json.loads(text)
    assert current == schemas.event_schema()
    # Self-contained: every name it uses, it defines (no other file needed).
    defined: set[str] = set()
    used: set[str] = set()
    _named_references(current, defined, used)
    assert used <= defined, f"names used but not defined: {sorted(used - defined)}"
    assert "io.stepline.Payload" in defined and "io.stepline.CopiedStep" in defined
    # ... so it parses alone, with no named schemas given.
    fastavro.parse_schema(current, named_schemas={})
    assert schema_fingerprint(current) == codec.fingerprint()


def test_the_current_schema_file_is_the_newest_frozen_version() -> None:
    history = schemas.history_schemas()
    newest = max(history, key=lambda stem: int(stem.rsplit(".v", 1)[1]))
    current = json.loads(schemas.CURRENT_FILE.read_text(encoding="utf-8"))
    assert schema_fingerprint(current) == schema_fingerprint(history[newest])


def test_the_envelope_alone_does_not_parse_which_is_why_the_current_file_exists() -> None:
    try:
        fastavro.parse_schema(schemas.load("Event"), named_schemas={})
    except fastavro.schema.UnknownType as exc:
        assert "io.stepline." in str(exc)
    else:
        raise AssertionError("schemas/Event.avsc parsed alone: schemas/README.md says it does not")


def test_python_m_stepline_schemas_rewrites_a_stale_file_and_leaves_a_fresh_one(tmp_path) -> None:
    # On a copy of the folder, so the checked-in file is never touched.
    import shutil

    copy = tmp_path / "schemas"
    shutil.copytree(schemas.SCHEMA_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "Event.current.avsc").write_text("{}", encoding="utf-8")
    probe = (
        "import sys, runpy, stepline.schemas as s; from pathlib import Path; "
        f"d = Path({str(copy)!r}); s.SCHEMA_DIR, s.HISTORY_DIR, s.CURRENT_FILE = "
        "d, d / 'history', d / 'Event.current.avsc'; "
        "runpy.run_module('stepline.schemas', run_name='__main__', alter_sys=False)"
    )
    first = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert first.stdout.startswith("wrote ")
    assert (copy / "Event.current.avsc").read_text(encoding="utf-8") == schemas.current_text()
    second = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "is up to date" in second.stdout
