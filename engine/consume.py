"""Reading the engine's topics as typed deliveries (docs/events.md); lives in `stepline.log.consume`."""

from stepline.log.consume import TOPIC_NAMES, Delivery, EventStream, Start, consume

__all__ = ["Delivery", "EventStream", "Start", "TOPIC_NAMES", "consume"]
