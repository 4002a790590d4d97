"""The engine's events and their typed reader, for code that reads the log (docs/events.md).

    from stepline.events import RunCompleted, consume

The event classes live in `stepline.core.events` and the reader in
`stepline.log.consume`; this module is the documented path to both.
"""

from stepline.core.events import *  # noqa: F403
from stepline.core.events import __all__ as _event_names
from stepline.log.consume import TOPIC_NAMES, Delivery, EventStream, consume

__all__ = [*_event_names, "Delivery", "EventStream", "TOPIC_NAMES", "consume"]
