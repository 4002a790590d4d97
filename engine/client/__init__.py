"""Requests any process may make of the log: trigger, publish, read, pause, fork, bulk, backfill.

`Client` is the connection; the modules beside it are operations built on one
(`pause`, `fork`, `bulk`, `backfill`). Nothing here runs task code.
"""

from stepline.client._client import (
    Client,
    RunHandle,
    check_event_name,
    current_client,
    publish,
)
from stepline.client.sync import SyncClient, SyncRunHandle

__all__ = ["Client", "RunHandle", "SyncClient", "SyncRunHandle", "check_event_name", "current_client", "publish"]
