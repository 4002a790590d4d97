"""Task versions and `sl.patched`: which code ran a run, and a deploy that
keeps runs already in flight on the path they started on.

The deploys are real: runs recorded by a worker with v1 of
tests/apps/history_app.py, then that worker stopped and one with v2 (a
change behind `sl.patched`) or v3 (the same change without it) started on
the same log, on every backend.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form

import stepline as sl
from stepline import schemas
from stepline.core import codec
from stepline.core.events import (
    CopiedStep,
    ErrorInfo,
    PatchRecorded,
    Payload,
    RunStarted,
    RunSuspended,
    RunTriggered,
)
from stepline.core.versions import code_hash
from tests.apps import history_app as v1
from tests.apps import history_app_v2 as v2
from tests.apps import history_app_v3 as v3
from tests.apps.history_app import executed

from .conftest import eventually

FIXTURES = Path(__file__).parent / "fixtures"


async def _suspended(client: sl.Client, run_id: str) -> bool:
    try:
        return (await client.get_run(run_id)).status == "suspended"
    except sl.UnknownRun:
        return False


async def _events(client: sl.Client, run_id: str, type_: str) -> list[object]:
    return [ev.body for _, ev in await client.history(run_id) if ev.type == type_]


async def _deploy(engine_factory, old, registry: sl.Registry):  # type: ignore[no-untyped-def]
    """Stop `old`'s worker, start a worker with `registry` on the same log."""
    await old.stop_worker()
    return await engine_factory(registry)


# --- versions ---------------------------------------------------------------------


async def test_every_attempt_records_the_version_of_the_code_that_ran_it(engine_factory):
    eng = await engine_factory(v1.registry)
    declared = await v1.quote.trigger({"sku": "pear", "qty": 1}, client=eng.client)
    hashed = await v1.greet.trigger({"name": "Ada"}, client=eng.client)
    await declared.result(timeout=30)
    await hashed.result(timeout=30)
    assert [b.task_version for b in await _events(eng.client, declared.run_id, "RunStarted")] == ["1"]  # type: ignore[attr-defined]
    assert (await eng.client.get_run(declared.run_id)).task_version == "1"
    greet_version = (await eng.client.get_run(hashed.run_id)).task_version
    assert greet_version == v1.greet.version == code_hash(v1.greet.fn)
    assert greet_version is not None and greet_version.startswith("code:") and len(greet_version) == 17


def test_a_source_hash_changes_with_the_function_text_only() -> None:
    # greet's text is the same in v1 and v2, different in v3.
    assert v1.greet.version == v2.greet.version != v3.greet.version
    assert v1.approve.version != v2.approve.version
    assert (v1.quote.version, v2.quote.version, v3.quote.version) == ("1", "2", "3")
    with pytest.raises(sl.TaskDefinitionError, match="version must be a non-empty string"):
        sl.task(id="x", version="", registry=sl.Registry())(v1.greet.fn)
    with pytest.raises(sl.TaskDefinitionError, match="marks computed source hashes"):
        sl.task(id="x", version="code:abc", registry=sl.Registry())(v1.greet.fn)


# --- patched ----------------------------------------------------------------------


async def test_a_run_started_on_patched_code_takes_the_new_path_and_records_it_once(engine_factory):
    eng = await engine_factory(v2.registry)
    run = await v2.approve.trigger({"sku": "apple", "qty": 10}, client=eng.client)
    await eventually(lambda: _suspended(eng.client, run.run_id), timeout=30, what="the token wait")
    await eng.client.complete_token(f"tok_{run.run_id}_2", {"by": "ops"})  # position 2: the discount took 1
    assert await run.result(timeout=30) == {"sku": "apple", "total": 20, "approved_by": "ops"}  # (3-1)*10
    assert executed(run.run_id) == ["fetch_price", "bulk_discount", "subtotal"]
    # Two attempts (before and after the wait); the answer was recorded by the first only.
    assert await _events(eng.client, run.run_id, "PatchRecorded") == [PatchRecorded("bulk-discount", True, 1)]
    assert len(await _events(eng.client, run.run_id, "RunStarted")) == 2
    assert (await eng.client.get_run(run.run_id)).patch_answers() == {"bulk-discount": True}


async def test_a_run_in_flight_across_a_patched_deploy_keeps_its_old_path(engine_factory):
    old = await engine_factory(v1.registry)
    run = await v1.approve.trigger({"sku": "apple", "qty": 10}, client=old.client)
    await eventually(lambda: _suspended(old.client, run.run_id), timeout=30, what="the token wait")
    assert (await old.client.get_run(run.run_id)).task_version == v1.approve.version

    new = await _deploy(engine_factory, old, v2.registry)
    await new.client.complete_token(f"tok_{run.run_id}_1", {"by": "ops"})
    assert await run.result(timeout=30) == {"sku": "apple", "total": 30, "approved_by": "ops"}  # no discount
    assert executed(run.run_id) == ["fetch_price", "subtotal"]
    state = await new.client.get_run(run.run_id)
    assert state.patches == (PatchRecorded("bulk-discount", False, 1),)
    assert [b.task_version for b in await _events(new.client, run.run_id, "RunStarted")] == [  # type: ignore[attr-defined]
        v1.approve.version, v2.approve.version]


async def test_the_same_deploy_without_a_patch_breaks_the_run_in_flight(engine_factory):
    old = await engine_factory(v1.registry)
    run = await v1.approve.trigger({"sku": "apple", "qty": 10}, client=old.client)
    await eventually(lambda: _suspended(old.client, run.run_id), timeout=30, what="the token wait")
    new = await _deploy(engine_factory, old, v3.registry)
    await new.client.complete_token(f"tok_{run.run_id}_1", {"by": "ops"})
    with pytest.raises(sl.RunFailedError, match="NonDeterminismError"):
        await run.result(timeout=30)
    assert executed(run.run_id) == ["fetch_price"]


async def test_a_fork_keeps_the_patch_answers_given_before_its_fork_point(engine_factory):
    old = await engine_factory(v1.registry)
    run = await v1.approve.trigger({"sku": "apple", "qty": 10}, client=old.client)
    await eventually(lambda: _suspended(old.client, run.run_id), timeout=30, what="the token wait")
    new = await _deploy(engine_factory, old, v2.registry)
    await new.client.complete_token(f"tok_{run.run_id}_1", {"by": "ops"})
    await run.result(timeout=30)  # answered False at position 1

    # Forked after the answer: it is copied, and the fork stays on the old path.
    late = await new.client.fork(run.run_id, 2)
    assert await late.result(timeout=30) == {"sku": "apple", "total": 30, "approved_by": "ops"}
    assert (await new.client.get_run(late.run_id)).patch_answers() == {"bulk-discount": False}
    assert executed(late.run_id) == ["subtotal"]
    # Forked before it: the fork asks anew, from position 1 on the new code, and takes the new path.
    early = await new.client.fork(run.run_id, 1)
    await eventually(lambda: _suspended(new.client, early.run_id), timeout=30, what="the fork's token wait")
    await new.client.complete_token(f"tok_{early.run_id}_2", {"by": "fork"})
    assert await early.result(timeout=30) == {"sku": "apple", "total": 20, "approved_by": "fork"}
    assert (await new.client.get_run(early.run_id)).patch_answers() == {"bulk-discount": True}
    assert executed(early.run_id) == ["bulk_discount", "subtotal"]


async def test_replay_checks_and_shadows_answer_patched_from_the_record(engine_factory):
    from stepline.history.replay import check_run
    from stepline.history.shadow import shadow_run

    eng = await engine_factory(v2.registry)
    run = await v2.quote.trigger({"sku": "apple", "qty": 10}, client=eng.client)
    assert await run.result(timeout=30) == {"sku": "apple", "total": 22}  # (3-1)*10, +10%
    state = await eng.client.get_run(run.run_id)
    # The run's journal goes past the patch point, but it answered True: the replay must too.
    assert await check_run(v2.quote, state) is None
    same = await shadow_run(v2.quote, state)
    assert not same.diverged
    assert [s.recorded_name for s in same.steps] == ["fetch_price", "bulk_discount", "subtotal", "add_tax"]
    # Rolled back to v1, the run would not replay: the shadow says where.
    back = await shadow_run(v1.quote, state)
    assert back.first_divergence()["kind"] == "name-changed"  # type: ignore[index]


async def test_patched_outside_a_run_is_an_error() -> None:
    with pytest.raises(sl.NotInRunContext, match="stepline.patched"):
        sl.patched("anything")


# --- schema v5 --------------------------------------------------------------------


def _records(path: Path) -> list[bytes]:
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def test_what_schema_v5_added_stays_readable() -> None:
    """tests/fixtures/events-v5.bin: forks, task versions, patch answers, wait_for_any groups."""
    records = _records(FIXTURES / "events-v5.bin")
    v5 = json.loads((schemas.HISTORY_DIR / "Event.v5.avsc").read_text())
    v5_fp = bytes.fromhex(fastavro_fingerprint(to_parsing_canonical_form(v5), "CRC-64-AVRO"))
    assert all(r[2:10] == v5_fp for r in records)
    # (The PauseChanged after them is checked in tests/test_pause.py.)
    trig, started, patch, suspended = (codec.decode(r).body for r in records[:4])
    assert isinstance(trig, RunTriggered)
    assert (trig.forked_from, trig.forked_at_step, trig.tags) == ("run_01KB0000000000000000000000", 2, ("vip",))
    json_ = "application/json"
    assert trig.journal == (
        CopiedStep(0, "fetch_price", Payload(json_, b'["pear"]'), Payload(json_, b"5"), None),
        CopiedStep(1, "child", None, None, ErrorInfo("ValueError", "no stock", "", False)),
    )
    assert trig.patches == (PatchRecorded("bulk-discount", False, 1),)
    assert started == RunStarted(1, "worker-a", "code:0123456789ab")
    assert patch == PatchRecorded("free-shipping", True, 2)
    assert isinstance(suspended, RunSuspended) and suspended.step == 3


def test_older_events_read_as_unforked_unversioned_and_unpatched() -> None:
    for name in ("events-v1.bin", "events-v4.bin"):
        for record in _records(FIXTURES / name):
            body = codec.decode(record).body
            if isinstance(body, RunTriggered):
                assert (body.forked_from, body.forked_at_step, body.journal, body.patches) == (None, None, (), ())
            if isinstance(body, RunStarted):
                assert body.task_version is None
