# The documented path of the reader (docs/events.md, docs/api): it lives in
# stepline.log.consume, beside the log it reads; this module is that one's face.
from stepline.log import consume as _impl
from stepline.log.consume import TOPIC_NAMES, Delivery, EventStream, consume
from stepline.log.consume import Start as Start  # the type of `consume(start=...)`, as before the move

__doc__ = _impl.__doc__

__all__ = ["Delivery", "EventStream", "TOPIC_NAMES", "consume"]
