"""A plain synchronous program using stepline.SyncClient: no asyncio anywhere.

Run as `python sync_script.py LOG_URL`; prints one JSON line per check.
"""

from __future__ import annotations

import json
import sys

import stepline as sl

client = sl.SyncClient(sys.argv[1])  # module level, as in Django settings: closed at exit


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


run = client.trigger("sync-greet", {"name": "ada"})
say(check="result", run_id=run.run_id, value=run.result(timeout=60))
say(check="state", status=run.state().status)

try:
    client.trigger("sync-refuse", {"name": "bob"}).result(timeout=60)
except sl.RunFailedError as exc:
    say(check="failed", error=type(exc).__name__, message=str(exc))

later = client.trigger("sync-greet", {"name": "eve"}, delay=3600)
try:
    later.result(timeout=0.5)
except TimeoutError as exc:
    say(check="timeout", message=str(exc))
client.cancel(later.run_id)
say(check="cancelled", status=client.wait(later.run_id, timeout=60).status)

try:
    client.cancel(later.run_id)
except sl.InvalidRunState as exc:
    say(check="cancel-again", error=type(exc).__name__)

try:
    client.get_run("run_00000000000000000000000000")
except sl.UnknownRun as exc:
    say(check="unknown", error=type(exc).__name__)

event_id = client.publish("sync.ping", {"n": 7})
say(check="published", event_id=event_id)

say(check="listed", runs=sorted((r.task_id, r.status) for r in client.list_runs()
                                if r.task_id != "sync-on-ping"))
