"""The quickstart example runs as the README says, and shows what it claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_process_order_retries_the_payment_without_fetching_the_order_again(tmp_path: Path) -> None:
    env = dict(os.environ, STEPLINE_LOG=f"sqlite:///{tmp_path}/stepline.db", ORDER_SLEEP_SECONDS="0.2")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "process_order.py"), "order-7"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    result = json.loads(next(line for line in lines if line.startswith("result: "))[len("result: "):])
    assert result["status"] == "completed" and result["orderId"] == "order-7"
    executions = next(line for line in lines if line.startswith("executions: "))
    assert "'fetch_order': 1" in executions and "'charge_payment': 2" in executions
    assert any(line.strip().startswith("retry -> attempt 2") and "GatewayTimeout" in line for line in lines)
