"""`stepline ...` on the command line. Nothing in the package imports this layer."""

from typing import Any

from stepline.cli import main as _main
from stepline.cli.main import main
from stepline.cli.options import option_setting

__all__ = ["app", "main", "option_setting"]


def __getattr__(name: str) -> Any:
    # `app` is built on first use (engine/cli/main.py).
    if name == "app":
        return _main.app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
