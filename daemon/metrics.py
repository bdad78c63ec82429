"""Prometheus metrics, read from the event bus (never counters sprinkled through the code).

``[metrics] listen = "127.0.0.1:9330"`` (off by default) serves ``/metrics`` in the text
format; every name starts with ``pqtunnel_``. The counters move on the same structured
events that the log and the audit read, so the three always tell the same story. The HTTP
server is prometheus-client's own (a small thread), private to this registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pqtunnel import events

from .config import Address


STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Seconds: a local SQLite store answers in well under a millisecond, etcd in a few."""


class NodeMetrics:
    """The node's metrics; ``observe`` is the event-bus subscriber."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sessions = Gauge("pqtunnel_sessions", "Live sessions by suite", ["suite"], registry=self.registry)
        self.handshakes = Counter("pqtunnel_handshakes_total", "Handshakes by result (up, or whose fault a failure was)",
                                  ["result"], registry=self.registry)
        self.streams = Counter("pqtunnel_streams_total", "Inbound streams by decision", ["decision"],
                               registry=self.registry)
        self.bytes = Counter("pqtunnel_session_bytes_total", "Bytes carried by ended sessions, per peer and direction",
                             ["peer", "direction"], registry=self.registry)
        self.rekeys = Counter("pqtunnel_rekeys_total", "In-band rekeys", registry=self.registry)
        self.reloads = Counter("pqtunnel_reloads_total", "Configuration reloads by result", ["result"],
                               registry=self.registry)
        self.handshake_seconds = Histogram(
            "pqtunnel_handshake_seconds", "Handshake time from the connection to the session keys (or the failure)",
            ["direction", "result"], registry=self.registry)
        self.reservations = Counter(
            "pqtunnel_nonce_reservations_total", "Counter-block reservations asked of the HA nonce store, by result",
            ["store", "result"], registry=self.registry)
        self.store_seconds = Histogram(
            "pqtunnel_store_seconds", "Latency of the HA nonce store by operation (reserve, health)",
            ["store", "operation"], buckets=STORE_BUCKETS, registry=self.registry)

    def observe(self, event: events.Event) -> None:
        if isinstance(event, events.SessionUp):
            self.sessions.labels(event.suite).inc()
            self.handshakes.labels("up").inc()
            self._handshake_took(event.direction, "up", event.handshake_seconds)
        elif isinstance(event, events.SessionDown):
            suite = getattr(event, "suite", "") or "unknown"
            self.sessions.labels(suite).dec()
            self.bytes.labels(event.peer, "in").inc(event.bytes_in)
            self.bytes.labels(event.peer, "out").inc(event.bytes_out)
        elif isinstance(event, events.HandshakeFailed):
            self.handshakes.labels(f"failed_{event.fault.value}").inc()
            self._handshake_took(event.direction, f"failed_{event.fault.value}", event.handshake_seconds)
        elif isinstance(event, events.StreamAllowed):
            self.streams.labels("allowed").inc()
        elif isinstance(event, events.StreamDenied):
            self.streams.labels("denied").inc()
        elif isinstance(event, events.Rekeyed):
            self.rekeys.inc()
        elif isinstance(event, events.ConfigReloaded):
            self.reloads.labels("applied" if event.ok else "refused").inc()
        elif isinstance(event, events.CounterBlockReserved):
            self.reservations.labels(event.store, event.result).inc()
            self.store_seconds.labels(event.store, "reserve").observe(event.seconds)
        elif isinstance(event, events.StoreChecked):
            self.store_seconds.labels(event.store, "health").observe(event.seconds)

    def _handshake_took(self, direction: str, result: str, seconds: float | None) -> None:
        if seconds is not None:  # None: refused before a handshake began (nothing to time)
            self.handshake_seconds.labels(direction, result).observe(seconds)

    def serve(self, address: Address) -> None:
        start_http_server(address.port, addr=address.host, registry=self.registry)
