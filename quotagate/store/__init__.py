"""Counters and ledger behind one protocol (:mod:`quotagate.store.base`), and the catalog
of users, limits, prices and keys. Backends are chosen by URL with :func:`open_store`."""

from quotagate.store.base import CounterDiff, CounterStore, StoredTicket, UsageEvent
from quotagate.store.factory import open_store

__all__ = ["CounterDiff", "CounterStore", "StoredTicket", "UsageEvent", "open_store"]
