"""Prometheus metrics of one server replica, served on --metrics-address (/metrics).

Each server has a registry of its own (several run in one test process). Recorded where
things happen: calls and their latency by method and status code, and admission refusals
(server/rpc.py); open streams by method; jobs leased (session streams); sessions
expired by this replica's reaper; events this replica's fanout read and the deliveries to
its streams; the database pool (read at scrape time).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _PoolCollector(Collector):
    """The SQLAlchemy pool's connections, read when scraped."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pool = self.engine.pool
        for name, doc, read in (("checked_out", "connections in use", "checkedout"),
                                ("idle", "idle connections in the pool", "checkedin"),
                                ("size", "configured pool size", "size")):
            fn = getattr(pool, read, None)
            if fn is not None:
                yield GaugeMetricFamily(f"balsam_db_pool_{name}", f"Database pool: {doc}.", value=float(fn()))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.calls = Counter("balsam_rpc_calls", "Calls handled, by method and status code.", ["method", "code"],
                             registry=r)
        self.latency = Histogram("balsam_rpc_seconds", "Call latency (streams: their lifetime), by method.",
                                 ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.streams_open = Gauge("balsam_streams_open", "Streams open now, by method.", ["method"], registry=r)
        self.admission_rejections = Counter("balsam_admission_rejections",
                                            "Calls and streams refused by admission control (RESOURCE_EXHAUSTED).",
                                            ["kind"], registry=r)
        self.jobs_leased = Counter("balsam_jobs_leased", "Jobs leased to launcher sessions.", registry=r)
        self.sessions_expired = Counter("balsam_sessions_expired", "Sessions this replica's reaper expired.",
                                        registry=r)
        self.events_read = Counter("balsam_events_read",
                                   "Committed events (by any replica) this replica's fanout read.", registry=r)
        self.events_delivered = Counter("balsam_events_delivered",
                                        "Event rows routed to this replica's streams.", registry=r)
        self._http: Any = None
        # (method, code) -> the labelled children: labels() cost as much as recording.
        self._call_children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def call(self, method: str, code: str, seconds: float) -> None:
        """A call (or stream) ended with `code` after `seconds`."""
        children = self._call_children.get((method, code))
        if children is None:
            children = self._call_children[method, code] = (self.calls.labels(method, code),
                                                             self.latency.labels(method))
        children[0].inc()
        children[1].observe(seconds)

    def watch_pool(self, engine: Any) -> None:
        self.registry.register(_PoolCollector(engine))

    def serve(self, address: str) -> int:
        """Serve /metrics on "host:port" (port 0: any free one); returns the port."""
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise SystemExit(f"--metrics-address {address!r}: expected host:port")
        server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
