"""The Spool class: the relay's one handle on the spool, its operations gathered from the mixins.

Relay side only (asyncio): the writer process never imports this.
"""

from relay.spool.ingest import IngestMixin
from relay.spool.log import LogMixin
from relay.spool.queue import QueueMixin


class Spool(IngestMixin, QueueMixin, LogMixin):
    """Durable store of events and deliveries; see relay/spool/__init__.py."""
