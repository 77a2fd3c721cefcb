"""Prometheus metrics (GET /metrics), one CollectorRegistry per app.

A registry per app, not the library's global one: tests run several apps in
one process, and a second app registering the same names globally would fail.

Counted as it happens: requests per route (the route's pattern, never the raw
path, which would make a series per chat id) and status, their latency, and
messages sent. Read when scraped: connected sockets, the page cache's hits and
misses, the PostgreSQL pool's usage, and the Socket.IO relay's publications
and channels (chatd.relay).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Latency buckets for a chat API: most answers take a few milliseconds; the
# tail up to DB_TIMEOUT (5 s) is what an operator needs to see.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "chatd_http_requests",
            "HTTP requests answered, by route pattern, method and status.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "chatd_http_request_duration_seconds",
            "Time to answer an HTTP request, by route pattern and method.",
            ("route", "method"),
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.messages = Counter(
            "chatd_messages_sent",
            "Messages created (committed), over REST and Socket.IO.",
            registry=self.registry,
        )
        self._live = _Live()
        self.registry.register(self._live)
        # labels() takes a lock and builds a key on every call; a route has a
        # handful of (method, status) pairs, so keep the children.
        self._children: dict[tuple, tuple] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(route, method, str(status)),
                self.latency.labels(route, method),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def watch(
        self,
        sockets: Callable[[], int] | None = None,
        cache: object = None,
        pool: Callable[[], dict] | None = None,
        relay: object = None,
    ) -> None:
        """Where the scrape-time values come from (set once the stores exist)."""
        self._live.sockets, self._live.cache, self._live.pool = sockets, cache, pool
        self._live.relay = relay

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Values read from live objects at scrape time."""

    def __init__(self) -> None:
        self.sockets: Callable[[], int] | None = None
        self.cache = None  # chatd.cache.PageCache: .hits / .misses
        self.pool: Callable[[], dict] | None = None
        self.relay = None  # chatd.relay.Relay: .published / .received / .channels

    def describe(self):
        return []

    def collect(self):
        sockets = GaugeMetricFamily(
            "chatd_sockets_connected", "Socket.IO connections open on this process."
        )
        sockets.add_metric([], self.sockets() if self.sockets else 0)
        yield sockets
        hits = CounterMetricFamily("chatd_cache_hits", "History pages served from Redis.")
        misses = CounterMetricFamily("chatd_cache_misses", "History pages read from PostgreSQL.")
        hits.add_metric([], getattr(self.cache, "hits", 0))
        misses.add_metric([], getattr(self.cache, "misses", 0))
        yield hits
        yield misses
        pool = GaugeMetricFamily(
            "chatd_db_pool_connections",
            "PostgreSQL pool connections: open (size), idle (free) and the maximum.",
            labels=("state",),
        )
        stats = self.pool() if self.pool else {}
        for state in ("size", "free", "max"):
            pool.add_metric([state], stats.get(state, 0))
        yield pool
        in_use = GaugeMetricFamily(
            "chatd_db_pool_in_use", "PostgreSQL pool connections lent out right now."
        )
        in_use.add_metric([], stats.get("size", 0) - stats.get("free", 0))
        yield in_use
        relay = self.relay
        published = CounterMetricFamily(
            "chatd_relay_published",
            "Publications this process sent to Redis for other processes (a batch counts once).",
        )
        received = CounterMetricFamily(
            "chatd_relay_received",
            "Publications this process received from Redis, its own included (a batch once).",
        )
        channels = GaugeMetricFamily(
            "chatd_relay_channels", "Redis channels this process is subscribed to now."
        )
        published.add_metric([], getattr(relay, "published", 0))
        received.add_metric([], getattr(relay, "received", 0))
        channels.add_metric([], getattr(relay, "channels", 0))
        yield published
        yield received
        yield channels


class CountingEvents:
    """chatd.events.Events that counts created messages, then delegates."""

    def __init__(self, inner, metrics: Metrics):
        self._inner = inner
        self._metrics = metrics

    def created(self, messages: list[dict], raws: list[bytes]):
        self._metrics.messages.inc(len(messages))
        return self._inner.created(messages, raws)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)
