"""Micro-benchmark of the codec hot path: µs per encode and decode, best of N.

    python bench/codec_micro.py [--repeat 15] [--number 20000] [--baseline FILE]

`--baseline` loads another version of engine/core/codec.py and measures it side
by side, e.g. the committed one:

    git show HEAD:engine/core/codec.py > /tmp/codec_head.py
    python bench/codec_micro.py --baseline /tmp/codec_head.py

Times are CPU time of this process (`time.process_time`), the best of
`--repeat` runs of `--number` calls: the bench machines are shared and
noisy, and wall time counts the time other processes hold the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import timeit
from typing import Any

from stepline.core import codec
from stepline.core.events import (
    JSON,
    Event,
    Payload,
    RunStarted,
    RunTriggered,
    StepCompleted,
    StepStarted,
)

PAYLOAD = Payload(JSON, b'{"order": 17, "total": "9.90"}')


def event(body: Any, seq: int = 3) -> Event:
    """A typical worker event: ULID ids, no trace context, no extras."""
    return Event(
        event_id="01J9ZK8Q3W6X7Y8Z9A0B1C2D3E",
        type=body.TYPE,
        run_id="01J9ZK8Q3W6X7Y8Z9A0B1C2D3F",
        task_id="billing.charge",
        seq=seq,
        time=1700000000000 + seq,
        epoch=4,
        body=body,
    )


CASES = {
    "StepCompleted": event(StepCompleted(step=1, name="charge", attempt=1, output=PAYLOAD)),
    "StepStarted": event(StepStarted(step=1, name="charge", attempt=1, input=None)),
    "RunStarted": event(RunStarted(attempt=1, worker_id="worker-a")),
    "RunTriggered": event(RunTriggered(PAYLOAD), seq=1),
}


def load_codec(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("codec_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Codec()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--number", type=int, default=20000)
    ap.add_argument("--baseline", help="another codec.py to compare with")
    args = ap.parse_args()

    def best(f: Any) -> float:
        runs = timeit.Timer(f, timer=time.process_time).repeat(args.repeat, args.number)
        return min(runs) / args.number * 1e6

    codecs = {"current": codec.Codec()}
    if args.baseline:
        codecs = {"baseline": load_codec(args.baseline), **codecs}
    print(f"{'event':<15}{'codec':<10}{'bytes':>6}{'encode µs':>11}{'decode µs':>11}")
    for name, ev in CASES.items():
        results = {}
        for label, c in codecs.items():
            data = c.encode(ev)
            assert c.decode(data) == ev
            enc = best(lambda: c.encode(ev))  # noqa: B023
            dec = best(lambda: c.decode(data))  # noqa: B023
            results[label] = (data, enc, dec)
            print(f"{name:<15}{label:<10}{len(data):>6}{enc:>11.3f}{dec:>11.3f}")
        if len(results) == 2:
            (d0, e0, r0), (d1, e1, r1) = results.values()
            assert d0 == d1, f"{name}: the codecs write different bytes"
            print(f"{'':<15}{'speedup':<10}{'':>6}{e0 / e1:>10.2f}x{r0 / r1:>10.2f}x")


if __name__ == "__main__":
    main()
