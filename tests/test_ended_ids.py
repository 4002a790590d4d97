"""The ids of compacted ended runs: exact membership (never a false positive,
which could drop a live run's event) in 16 bytes per id of the engine's
format, through worker folds and snapshots of every readable version."""

from __future__ import annotations

import base64
import json
import random
import tracemalloc
import zlib

import pytest

from stepline.core.ids import idempotent_run_id, new_run_id
from stepline.projections import snapshot
from stepline.projections.ended import TAIL, EndedIds, id_value, value_id
from stepline.projections.runs import COMPLETED, PartitionRuns
from tests.test_compaction import copy, template


def engine_ids(n: int) -> list[str]:
    # Bursts within one millisecond share the high 64 bits and differ by one.
    ids = [new_run_id(now_ms=1_765_000_000_000 + i // 50) for i in range(n // 2)]
    return ids + [idempotent_run_id("task", f"key-{i}") for i in range(n - len(ids))]


def test_every_id_the_engine_makes_maps_to_one_value_and_back() -> None:
    ids = engine_ids(4000)
    values = [id_value(rid) for rid in ids]
    assert all(v is not None and v < 1 << 128 for v in values)
    assert len(set(values)) == len(set(ids))
    assert [value_id(v) for v in values if v is not None] == ids


@pytest.mark.parametrize("other", [
    "run_done1", "run_" + "0" * 25, "run_" + "0" * 27, "run_" + "8" + "0" * 25,  # 130 bits
    "run_" + "I" + "0" * 25, "run_" + "a" + "0" * 25, "RUN_" + "0" * 26, "",
])
def test_an_id_of_another_form_has_no_value(other: str) -> None:
    assert id_value(other) is None


def test_it_holds_exactly_what_was_added_across_flushes_and_merges() -> None:
    rng = random.Random(7)
    added = engine_ids(5 * TAIL + 123) + [f"run_custom{i}" for i in range(50)]
    rng.shuffle(added)
    ids = EndedIds()
    for rid in added + added[:500]:  # repeats change nothing
        ids.add(rid)
    assert len(ids) == len(set(added))
    assert all(rid in ids for rid in added)
    assert set(ids) == set(added)
    # Neighbours of every added id (the last digit changed) and other forms are not members.
    absent = set()
    for rid in added[:3000]:
        if id_value(rid) is not None:
            last = "1" if rid[-1] != "1" else "2"
            absent.add(rid[:-1] + last)
    absent -= set(added)
    absent |= {new_run_id() for _ in range(2000)} | {"run_custom-1", "run_done0"}
    assert not any(rid in ids for rid in absent)
    assert 42 not in ids


def test_an_id_of_the_engine_s_format_takes_at_most_24_bytes() -> None:
    added = engine_ids(100_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        ids = EndedIds(added)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(ids) == 100_000
    assert held / 100_000 <= 24  # a set of the strings holds about 130


async def test_a_compacted_run_with_an_engine_id_stays_ended_after_a_snapshot() -> None:
    tpl = await template()
    part = PartitionRuns(0, keep_ended=40)
    rids = [new_run_id() for _ in range(20)]
    off = 0
    for rid in rids:
        for ev in copy(tpl, rid, 1):
            part.apply(ev, off)
            off += 1
    compacted = [rid for rid in rids if rid not in part.runs]
    assert len(compacted) >= 10 and all(rid in part.ended for rid in compacted)
    data = snapshot.dump(part)
    doc = json.loads(zlib.decompress(data))
    assert doc["v"] == 7 and doc["ended"] == [] and len(base64.b64decode(doc["ended_ids"])) == 16 * len(compacted)
    loaded = snapshot.load(data)
    assert loaded.ended == part.ended and loaded.runs == part.runs
    # A repeated trigger of a compacted run changes nothing after the load.
    for ev in copy(tpl, compacted[0], 1):
        assert loaded.apply(ev, off) is None
        off += 1
    assert compacted[0] not in loaded.runs
    # A new run is still taken for one.
    fresh = new_run_id()
    for ev in copy(tpl, fresh, 1):
        loaded.apply(ev, off)
        off += 1
    assert loaded.runs[fresh].status == COMPLETED


def test_a_version_6_snapshot_s_ended_ids_are_read() -> None:
    ids = engine_ids(10) + ["run_done0"]
    doc = {"v": 6, "partition": 2, "epoch": 3, "next_offset": 90, "fenced": 0, "runs": [], "ended": ids,
           "ending": [[80, "run_x"]]}
    part = snapshot.load(zlib.compress(json.dumps(doc).encode()))
    assert part.partition == 2 and set(part.ended) == set(ids) and list(part.ending) == [(80, "run_x")]


def test_packed_ids_that_are_not_whole_are_refused() -> None:
    doc = {"v": 7, "partition": 0, "epoch": 1, "next_offset": 9, "fenced": 0, "runs": [],
           "ended_ids": base64.b64encode(b"\x00" * 17).decode(), "ended": []}
    with pytest.raises(snapshot.SnapshotError, match="16-byte"):
        snapshot.load(zlib.compress(json.dumps(doc).encode()))
