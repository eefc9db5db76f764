"""Prometheus metrics of one server replica, served on --metrics-address (/metrics).

Each server has a registry of its own (several run in one test process). Recorded where
things happen: calls and their latency by method and status code, and admission refusals
(server/rpc.py); open streams by method; jobs leased (session streams); sessions
expired by this replica's reaper; events this replica's fanout read and the deliveries to
its streams; the database pool (read at scrape time).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
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


class _Calls(Collector):
    """Calls by method and status code (balsam_rpc_calls_total) and their latency by
    method (the histogram balsam_rpc_seconds), counted in plain ints on the event loop
    and turned into metrics when scraped. prometheus_client's Counter and Histogram
    take a lock per value and walk the buckets in Python at every call: a fifth of the
    rpc wrapper's own work on every unary call."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        # method -> [count per bucket (the last: above every bound), sum of seconds]
        self.latency: dict[str, list[Any]] = {}

    def record(self, method: str, code: str, seconds: float) -> None:
        key = (method, code)
        self.counts[key] = self.counts.get(key, 0) + 1
        observed = self.latency.get(method)
        if observed is None:
            observed = self.latency[method] = [[0] * (len(_LATENCY_BUCKETS) + 1), 0.0]
        observed[0][bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        observed[1] += seconds

    def collect(self) -> Iterator[Metric]:
        calls = CounterMetricFamily("balsam_rpc_calls", "Calls handled, by method and status code.",
                                    labels=["method", "code"])
        for (method, code), count in list(self.counts.items()):
            calls.add_metric([method, code], count)
        yield calls
        latency = HistogramMetricFamily("balsam_rpc_seconds", "Call latency (streams: their lifetime), by method.",
                                        labels=["method"])
        for method, (buckets, total) in list(self.latency.items()):
            cumulative, running = [], 0
            for bound, count in zip((*map(str, _LATENCY_BUCKETS), "+Inf"), list(buckets), strict=True):
                running += count
                cumulative.append((bound, running))
            latency.add_metric([method], cumulative, total)
        yield latency


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._calls = _Calls()
        r.register(self._calls)
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
        # A call (or stream) ended with `code` after `seconds`: call(method, code, seconds).
        self.call = self._calls.record

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
