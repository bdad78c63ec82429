"""The node's HA nonce store (``[ha]``, docs/ha.md): opened at start, its health watched.

Without an answering store no replica can reserve counters, so nothing may be sent under
keys shared between replicas. The node says so in one log line when the store does not
answer at start (and again when it changes its mind), and ``pqtunnel status --json``
carries the store's name and health in ``ha``. Counter leases and single-use records are
taken from ``store`` (session migration and resumption build on it next).
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from pqtunnel.events import Event, StoreChecked, StoreHealthChanged
from pqtunnel.identity import Identity
from pqtunnel.stores import StoreCodec, StoreHealth

from .config import NodeConfig
from .noncestore import EtcdNonceStore, SqliteNonceStore, open_nonce_store

HEALTH_INTERVAL = 5.0
"""Seconds between health checks of the store after start."""


class HaWiring:
    """Owns the store: opens it (a bad ``[ha] path`` fails the start in one line), checks it."""

    def __init__(self, config: NodeConfig, identity: Identity, emit: Callable[[Event], None]) -> None:
        self.settings = config.ha
        self.emit = emit
        self.store: SqliteNonceStore | EtcdNonceStore = open_nonce_store(
            self.settings.store, codec=StoreCodec.for_identity(identity), path=config.nonce_store_path,
            etcd=self.settings.etcd, emit=emit)
        self.health: StoreHealth | None = None

    @property
    def can_send_under_shared_keys(self) -> bool:
        """Only with an answering store: a replica never guesses a counter."""
        return self.health is not None and self.health.ok

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Check once before the node serves (reported if bad), then every HEALTH_INTERVAL."""
        try:
            self._record(await self._check(), at_start=True)
            task_status.started()
            while True:
                await trio.sleep(HEALTH_INTERVAL)
                self._record(await self._check(), at_start=False)
        finally:
            with trio.CancelScope(shield=True):
                await self.store.aclose()

    async def _check(self) -> StoreHealth:
        """One health check, its latency on the event bus (the store latency metric)."""
        asked = trio.current_time()
        health = await self.store.health()
        self.emit(StoreChecked(self.store.kind, health.ok, round(trio.current_time() - asked, 6)))
        return health

    def _record(self, health: StoreHealth, *, at_start: bool) -> None:
        changed = self.health is None or health.ok != self.health.ok
        self.health = health
        if changed and (not health.ok or not at_start):
            self.emit(StoreHealthChanged(self.store.kind, health.ok, health.detail))

    def status(self) -> dict[str, Any]:
        """The ``ha`` field of ``pqtunnel status --json``."""
        return {
            "store": self.store.kind,
            "replica": self.settings.replica,
            "healthy": self.health.ok if self.health else None,
            "detail": self.health.detail if self.health else "not checked yet",
            "sending_under_shared_keys": self.can_send_under_shared_keys,
        }
