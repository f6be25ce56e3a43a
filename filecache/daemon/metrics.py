"""
The daemon's figures in the Prometheus text format (docs/operations.md,
"Metrics"): read at scrape time from the counters the daemon keeps anyway,
summed over the worker processes through snapshots they write each second.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from filecache import __version__, wire
from filecache.daemon.admission import Admission
from filecache.daemon.responder import Responder

__all__ = ["CONTENT_TYPE_LATEST", "DURATION_BUCKETS", "DaemonMetrics", "Figures", "ReplyFigures"]

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""The request-duration histogram's upper bounds, seconds: from a hit answered
from memory (tens of microseconds) to a large file to a slow client."""

SNAPSHOT_EVERY = 1.0
"""Seconds between a process's snapshots: how stale another process's
figures may be in a scrape (the answering process's own are live)."""

STALE_AFTER = 5.0
"""A snapshot older than this is from a process that is gone (or hung): its
counters still count, its gauges and process figures no longer do."""


class ReplyFigures:
    """
    Replies by protocol and status, and how long they took: integers and
    one float bumped in place as each reply ends, made into metrics only
    at scrape time.  C{fast} and C{fast_native}: kept responses to plain
    GETs written in the turn their request was read
    (L{filecache.daemon.http.HttpSession._fast},
    L{filecache.daemon.native.FileCacheProtocol._fast_get}), counted with
    nothing else, so those paths stay cheap.
    """

    __slots__ = ("buckets", "fast", "fast_native", "seconds", "statuses")

    def __init__(self) -> None:
        self.statuses: dict[tuple[bool, str], int] = {}
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one: past every bound
        self.seconds = 0.0
        self.fast = 0
        self.fast_native = 0

    def answered(self, http: bool, status: str, seconds: float) -> None:
        """One reply ended with C{status} (what the access log says) after C{seconds}."""
        key = (http, status)
        statuses = self.statuses
        statuses[key] = statuses.get(key, 0) + 1
        self.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.seconds += seconds

    def gone(self, http: bool) -> None:
        """One request whose client left before any reply: counted, but not timed."""
        key = (http, "gone")
        self.statuses[key] = self.statuses.get(key, 0) + 1


def outcome(http: bool, status: str) -> str:
    """
    The C{outcome} label of a reply from the status the access log gives
    it: C{ok}, C{not_found}, C{bad_request}, C{unavailable}, C{error},
    C{cut} (a body cut short) or C{gone} (the client left before a reply).
    """
    if status == "gone":
        return "gone"
    if status.endswith(("cut", "-changed")):
        return "cut"
    if not http:
        if status == "OK":
            return "ok"
        code = status[4:]
        if code == wire.NOT_FOUND:
            return "not_found"
        if code == wire.UNAVAILABLE or code == wire.BUSY:
            return "unavailable"
        return "bad_request"
    number = int(status) if status.isdigit() else 500
    if number < 400:
        return "ok"
    if number == 404:
        return "not_found"
    if number == 503:
        return "unavailable"
    if number < 500:
        return "bad_request"
    return "error"


REFUSAL_REASONS = ("not_allowed", "too_many_connections", "too_many_per_address", "untrusted_proxy", "bad_proxy_header")
"""The C{reason} labels of L{Admission.refusals}."""

_COUNTERS = (
    ("response_body_bytes", "File content bytes sent in reply bodies, both protocols (STATS bytes_sent)."),
    ("cache_hits", "Cache lookups that found a current entry."),
    ("cache_misses", "Cache lookups that did not."),
    ("cache_evictions", "Cache entries dropped, to make room or because their file changed."),
    ("connections", "Client connections let in since the start."),
)
_GAUGES = (
    ("cache_bytes", "File content bytes held in the memory cache now."),
    ("cache_entries", "Files held in the memory cache now."),
    ("cache_capacity_bytes", "The memory cache's byte budget (--cache-size), summed over the processes."),
    ("connections_active", "Client connections open now."),
)


@dataclass
class Figures:
    """
    One process's figures, or their sum over several: what a scrape
    reports, and what a worker's snapshot holds.
    """

    requests: dict[str, int] = field(default_factory=dict)  # "protocol outcome" -> replies
    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    seconds: float = 0.0
    # The process collector's samples: (family, type, help, sample name, value).
    process: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    pid: int = 0
    written: float = 0.0
    ended: bool = False

    def add(self, other: Figures, *, live: bool) -> None:
        """Add C{other}'s counters, and with C{live} its gauges too."""
        for mine, theirs in ((self.requests, other.requests), (self.counters, other.counters), (self.refusals, other.refusals)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        if live:
            for key, value in other.gauges.items():
                self.gauges[key] = self.gauges.get(key, 0) + value
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets)]
        self.seconds += other.seconds

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "requests": self.requests,
                "counters": self.counters,
                "gauges": self.gauges,
                "refusals": self.refusals,
                "buckets": self.buckets,
                "seconds": self.seconds,
                "process": self.process,
                "pid": self.pid,
                "written": self.written,
                "ended": self.ended,
            }
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Figures:
        """
        @raise ValueError: on anything but what L{to_json} writes.
        """
        raw = json.loads(data)
        buckets = [int(n) for n in raw["buckets"]]
        if len(buckets) != len(DURATION_BUCKETS) + 1:
            raise ValueError("snapshot has other buckets")
        return cls(
            requests={str(k): int(v) for k, v in raw["requests"].items()},
            counters={str(k): int(v) for k, v in raw["counters"].items()},
            gauges={str(k): int(v) for k, v in raw["gauges"].items()},
            refusals={str(k): int(v) for k, v in raw["refusals"].items()},
            buckets=buckets,
            seconds=float(raw["seconds"]),
            process=[(str(a), str(b), str(c), str(d), float(e)) for a, b, c, d, e in raw["process"]],
            pid=int(raw["pid"]),
            written=float(raw["written"]),
            ended=bool(raw["ended"]),
        )


def process_figures(collector: ProcessCollector) -> list[tuple[str, str, str, str, float]]:
    """This process's figures from prometheus_client's process collector."""
    return [
        (family.name, family.type, family.documentation, sample.name, sample.value)
        for family in collector.collect()
        for sample in family.samples
    ]


class SnapshotFolder:
    """
    The folder where each process of a C{--workers} daemon writes its
    figures (C{PID.json}) once a second, and where the process answering
    a scrape reads the others'.
    """

    _log = Logger()

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, figures: Figures) -> None:
        name = os.path.join(self.path, f"{figures.pid}.json")
        partial = os.path.join(self.path, f".{figures.pid}.partial")
        try:
            with open(partial, "wb") as out:
                out.write(figures.to_json())
            os.replace(partial, name)  # a reader sees the old snapshot or the new, whole
        except OSError as e:
            self._log.warn("cannot write metrics snapshot {name}: {error}", name=name, error=e.strerror)

    def others(self, pid: int) -> Iterator[Figures]:
        """Every snapshot but C{pid}'s; one that cannot be read is skipped."""
        try:
            names = os.listdir(self.path)
        except OSError:
            return
        for name in names:
            if not name.endswith(".json") or name == f"{pid}.json":
                continue
            try:
                with open(os.path.join(self.path, name), "rb") as f:
                    yield Figures.from_json(f.read())
            except (OSError, ValueError, KeyError, TypeError):
                continue


class DaemonMetrics:
    """
    The figures of one daemon process, turned into metrics at scrape time:
    the responder's counters and cache, admission's connections and
    refusals, the protocols' L{ReplyFigures}.  With C{snapshots} (a
    C{--workers} daemon), the other processes' latest snapshots are added
    in, and the process figures get a C{pid} label, one series per process.
    """

    def __init__(
        self,
        responder: Responder,
        admission: Admission,
        replies: ReplyFigures,
        *,
        clock: IReactorTime,
        snapshots: SnapshotFolder | None = None,
    ) -> None:
        self._responder = responder
        self._admission = admission
        self.replies = replies
        self._clock = clock
        self.snapshots = snapshots
        self._process = ProcessCollector(registry=None)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        if snapshots is None:
            self.registry.register(self._process)

    def figures(self) -> Figures:
        """This process's figures now."""
        responder, admission, replies = self._responder, self._admission, self.replies
        cache = responder.cache
        requests: dict[str, int] = {}
        for (http, status), count in replies.statuses.items():
            key = ("http " if http else "native ") + outcome(http, status)
            requests[key] = requests.get(key, 0) + count
        buckets = list(replies.buckets)
        for key, fast in (("http ok", replies.fast), ("native ok", replies.fast_native)):
            if fast:
                # A kept response is written in microseconds: the lowest
                # bucket (its time is not measured, so the sum leaves it out).
                requests[key] = requests.get(key, 0) + fast
                buckets[0] += fast
        return Figures(
            requests=requests,
            counters={
                "response_body_bytes": responder.counters.bytes_sent,
                "cache_hits": cache.hits,
                "cache_misses": cache.misses,
                "cache_evictions": cache.evictions,
                "connections": admission.connections_total,
            },
            gauges={
                "cache_bytes": cache.size,
                "cache_entries": len(cache),
                "cache_capacity_bytes": cache.capacity,
                "connections_active": admission.connections_active,
            },
            refusals=dict(admission.refusals),
            buckets=buckets,
            seconds=replies.seconds,
            process=process_figures(self._process) if self.snapshots is not None else [],
            pid=os.getpid(),
            written=self._clock.seconds(),
        )

    def whole(self) -> tuple[Figures, list[Figures]]:
        """
        The daemon's figures: this process's, plus every other process's
        snapshot; and the processes alive (this one first), whose gauges
        and process figures count.
        """
        own = self.figures()
        total = Figures()
        total.add(own, live=True)
        alive = [own]
        if self.snapshots is not None:
            now = self._clock.seconds()
            for other in self.snapshots.others(own.pid):
                live = not other.ended and now - other.written < STALE_AFTER
                total.add(other, live=live)
                if live:
                    alive.append(other)
        return total, alive

    def write_snapshot(self, ended: bool = False) -> None:
        """Write this process's figures for the others to read."""
        if self.snapshots is not None:
            figures = self.figures()
            figures.ended = ended
            self.snapshots.write(figures)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything (L{CONTENT_TYPE_LATEST})."""
        return generate_latest(self.registry)


class _Collector(Collector):
    """prometheus_client's view of L{DaemonMetrics}: families made at each scrape."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        total, alive = self._metrics.whole()
        requests = CounterMetricFamily(
            "filecache_requests",
            "Requests answered, by protocol (native, http) and outcome (ok, not_found, bad_request, "
            "unavailable, error, cut, gone).",
            labels=["protocol", "outcome"],
        )
        for key, count in sorted(total.requests.items()):
            protocol, _, result = key.partition(" ")
            requests.add_metric([protocol, result], count)
        yield requests
        for name, text in _COUNTERS:
            yield CounterMetricFamily(f"filecache_{name}", text, value=total.counters.get(name, 0))
        for name, text in _GAUGES:
            yield GaugeMetricFamily(f"filecache_{name}", text, value=total.gauges.get(name, 0))
        refusals = CounterMetricFamily(
            "filecache_refusals",
            "Connections refused, by reason (not_allowed, too_many_connections, too_many_per_address, "
            "untrusted_proxy, bad_proxy_header).",
            labels=["reason"],
        )
        for reason in sorted(set(REFUSAL_REASONS) | set(total.refusals)):
            # Every reason from the start, at 0: a rate() over it is 0, not missing.
            refusals.add_metric([reason], total.refusals.get(reason, 0))
        yield refusals
        cumulative, running = [], 0
        for bound, count in zip((*(repr(b) for b in DURATION_BUCKETS), "+Inf"), total.buckets):
            running += count
            cumulative.append((bound, running))
        yield HistogramMetricFamily(
            "filecache_request_duration_seconds",
            "Seconds from a request's arrival to the end of its reply.",
            buckets=cumulative,
            sum_value=total.seconds,
        )
        info = GaugeMetricFamily("filecache_build_info", "The running filecache's version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("filecache_processes", "Processes serving (1, or --workers).", value=len(alive))
        if self._metrics.snapshots is not None:
            yield from _per_process(alive)


def _per_process(alive: list[Figures]) -> Iterator[Metric]:
    """The process collector's families with one series per process, labelled by its pid."""
    families: dict[str, Metric] = {}
    for figures in alive:
        for name, kind, text, sample, value in figures.process:
            family = families.get(name)
            if family is None:
                family = families[name] = Metric(name, text, kind)
            family.add_sample(sample, {"pid": str(figures.pid)}, value)
    yield from families.values()


class SnapshotService(Service):
    """Writes this process's snapshot every L{SNAPSHOT_EVERY} seconds, and a last one at the end."""

    def __init__(self, metrics: DaemonMetrics, clock: IReactorTime) -> None:
        self._metrics = metrics
        self._loop = LoopingCall(metrics.write_snapshot)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(SNAPSHOT_EVERY, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        self._metrics.write_snapshot(ended=True)


class _MetricsPage(Resource):
    """C{/metrics} on C{--metrics}'s own listener, made on the reactor thread."""

    isLeaf = True

    def __init__(self, metrics: DaemonMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return self._metrics.exposition()

    render_HEAD = render_GET


class _QuietSite(Site):
    """A site that logs no line per request: Prometheus scrapes every few seconds."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


class MetricsListener(StreamServerEndpointService):
    """
    C{--metrics ENDPOINT}'s listener.  It listens when the daemon starts,
    not in twistd's privileged start as a plain endpoint service would: so
    it comes after the daemon's own ports, whose "starting on" line is the
    log's first (which scripts and the tests read), workers or not.
    """

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        StreamServerEndpointService.privilegedStartService(self)  # the listen


def metrics_site(metrics: DaemonMetrics) -> Site:
    """The twisted.web site of C{--metrics ENDPOINT}: C{/metrics}, and 404 for anything else."""
    root = Resource()
    root.putChild(b"metrics", _MetricsPage(metrics))
    return _QuietSite(root)


def on_main_port(target: bytes) -> bool:
    """Whether an HTTP request target asks for the metrics (C{/metrics}, with or without a query)."""
    return target == b"/metrics" or target[:9] == b"/metrics?"

