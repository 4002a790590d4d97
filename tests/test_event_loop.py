"""`stepline worker` and `stepline dev` run on uvloop when it is there, on
asyncio's loop when told to or when it is missing, and say so when uvloop
is asked for and missing."""

from __future__ import annotations

import asyncio
import sys

import pytest

from stepline.cli._common import CliError, _run, serving_loop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_when_installed_and_asyncio_when_told() -> None:
    pytest.importorskip("uvloop")
    assert _run(_loop_module(), loop="auto").startswith("uvloop")
    assert _run(_loop_module(), loop="uvloop").startswith("uvloop")
    assert _run(_loop_module(), loop="asyncio").startswith("asyncio")


def test_without_uvloop_auto_falls_back_and_uvloop_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert serving_loop("auto") is None
    with pytest.raises(CliError, match="uvloop is not installed"):
        serving_loop("uvloop")
