"""`stepline archive`: ended runs' histories as an Avro Object Container File.

The file's schema is the event envelope of the log itself
(`schemas/Event.current.avsc`), so fastavro, avro-tools or any Avro reader
reads it without Stepline. Records written by older schema versions are
resolved to the current one first. Events are in log order: partition by
partition, by offset, so each run's events are in the order they happened.

The file is written beside its target under a temporary name and moved over
it when complete: a failed archive leaves nothing half-written, and
archiving the same period again writes the same content again (the
file's metadata holds the cutoff and the counts).
"""

from __future__ import annotations

import os
import tempfile
from io import BytesIO
from typing import Any, cast

from fastavro import parse_schema, reader, schemaless_reader
from fastavro.write import Writer

from stepline import schemas
from stepline.core import codec
from stepline.errors import SteplineError
from stepline.log.base import Log
from stepline.log.topics import Topics
from stepline.runtime.retention import Plan, read_runs

__all__ = ["ArchiveError", "ArchiveReport", "check_writable", "write_archive"]

_HEADER_LEN = 10  # single-object encoding: marker + fingerprint


class ArchiveError(SteplineError):
    """The archive cannot be written where asked; nothing was written."""


class ArchiveReport:
    def __init__(self, path: str, runs: int, events: int, replaced: bool) -> None:
        self.path, self.runs, self.events, self.replaced = path, runs, events, replaced

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "runs": self.runs, "events": self.events, "replaced": self.replaced}


def check_writable(path: str) -> str:
    """The absolute target, or ArchiveError naming why it cannot be written."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ArchiveError(f"cannot write the archive to {path}: it is a directory")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise ArchiveError(f"cannot write the archive to {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArchiveError(f"cannot write the archive to {path}: the folder {folder} is not writable")
    return target


async def write_archive(log: Log, topics: Topics, the_plan: Plan, path: str) -> ArchiveReport:
    """Write the events of every run in `the_plan` to `path` (see the module docstring)."""
    target = check_writable(path)
    schema = cast(dict[str, Any], parse_schema(schemas.event_schema()))
    metadata = {
        "stepline.ended_before_ms": str(the_plan.cutoff_ms),
        "stepline.runs": str(the_plan.runs),
        "stepline.events": str(the_plan.events),
        "stepline.schema_fingerprint": codec.fingerprint().hex(),
        "stepline.topic": topics.runs,
    }
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp",
                                   dir=os.path.dirname(target))
    except OSError as exc:
        raise ArchiveError(f"cannot write the archive to {path}: {exc.strerror or exc}") from exc
    events = 0
    try:
        with os.fdopen(fd, "wb") as out:
            writer = Writer(out, schema, codec="deflate", metadata=metadata)
            for pp in the_plan.partitions:
                if not pp.runs:
                    continue
                wanted = {o for r in pp.runs.values() for o in r.offsets}
                for rec in await read_runs(log, topics.runs, pp.partition, pp.start, pp.end):
                    if rec.offset in wanted:
                        writer.write(_as_record(rec.value, schema))
                        events += 1
            writer.flush()
            out.flush()
            os.fsync(out.fileno())
        replaced = os.path.exists(target)
        os.replace(tmp, target)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise ArchiveError(f"cannot write the archive to {path}: {exc.strerror or exc}") from exc
        raise
    return ArchiveReport(target, the_plan.runs, events, replaced)


def _as_record(value: bytes, schema: dict[str, Any]) -> Any:
    """A log record as the datum fastavro writes: decoded with any known
    writer schema, encoded with the current one, read back as a dict that
    names each union branch (so the writer never has to guess it)."""
    current = codec.encode(codec.decode(value))
    return schemaless_reader(BytesIO(current[_HEADER_LEN:]), schema, return_record_name=True,
                             return_record_name_override=True)


def archive_metadata(path: str) -> dict[str, str]:
    """The `stepline.*` metadata of an archive (for tests and tools)."""
    with open(path, "rb") as f:
        meta = reader(f).metadata
    return {k: v for k, v in meta.items() if k.startswith("stepline.")}
