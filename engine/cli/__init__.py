"""`stepline ...` on the command line. Nothing in the package imports this layer."""

from stepline.cli.main import app, main
from stepline.cli.options import option_setting

__all__ = ["app", "main", "option_setting"]
