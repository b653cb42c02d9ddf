"""Counting what the proxy does, cheaply, and exporting it to Prometheus.

The hot path only touches plain Python integers: the dispatcher calls
:meth:`Metrics.record` once per command result (``run.RequestRun._result``),
which bumps a per-reader ``{(kind, result): count}`` dict entry and one slot
of a small latency-bucket list.  Nothing is locked and no
``prometheus_client`` object is touched per APDU; :class:`Collector` turns
the integers into metric families when ``/metrics`` is scraped (on the
reactor thread, so it never races the counting).

Cardinality is bounded: at most ``max_readers`` readers get their own
label values (later ones are counted under ``reader="(other)"``), and no
label value ever comes from a client: readers are canonical names from
the registry, kinds are the protocol's command names, results are the
C08x codes of errors.py or ``OK``.

Metric names and meanings are listed in docs/deployment.md.
"""

import bisect
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .errors import MEANING
from .parser import CARD_COMMANDS
from .registry import Reader
from .sessions import holder

#: Upper bounds (seconds) of the command latency buckets: 100 µs to 30 s.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Readers with a label of their own; the rest share ``(other)``.
MAX_READERS = 500
OTHER = "(other)"
#: Label of commands that reached no reader (unknown reader, READERS, LIST...).
NO_READER = "(none)"

perf_counter = time.perf_counter


class ReaderStats:
    """Counters of one reader (or of the ``(other)`` / ``(none)`` groups).

    ``counts``: ``{(kind, result): n}``, result ``OK`` for an answer;
    ``buckets``: observations per latency bucket (the last is +Inf), not
    cumulative; ``seconds``: the sum of the latencies; ``queue_timeouts``:
    requests and card sessions that got no turn within ``--queue-timeout``.
    """

    __slots__ = ("name", "counts", "buckets", "seconds", "queue_timeouts")

    def __init__(self, name):
        self.name = name
        self.counts = {}
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0
        self.queue_timeouts = 0

    @property
    def commands(self):
        return sum(self.counts.values())

    @property
    def apdus(self):
        return sum(n for (kind, _), n in self.counts.items() if kind == "APDU")

    def errors(self, code=None):
        return sum(n for (_, result), n in self.counts.items()
                   if result != "OK" and (code is None or result == code))


class Metrics:
    """All counters of one proxy process.

    ``registry`` gives the readers and backends at scrape time;
    ``backends`` is the list of IBackend objects in command-line order.
    """

    def __init__(self, registry, backends=(), max_readers=MAX_READERS, clock=time.time):
        self.registry = registry
        self.backends = list(backends)
        #: label values, fixed at start (a description may change, a series must not)
        self.backend_names = {id(b): b.description for b in self.backends}
        self.max_readers = max_readers
        self.readers = {}  # Reader -> ReaderStats (the hot-path lookup)
        self.by_name = {}  # label value -> ReaderStats
        self.none = ReaderStats(NO_READER)
        #: front-end name -> counters (frontends.base.FrontendStats), the
        #: core's ``stats``: every front end registers itself there
        self.frontends = {}
        self.started = clock()
        #: the dispatcher's clock (``IReactorTime.seconds``): how long holders held their cards
        self.seconds = time.monotonic
        #: the audit.AuditLog of --audit-log, or None (its counts are read at scrape time)
        self.audit = None

    def backend_added(self, backend):
        """An upstream added at run time (membership.UpstreamSet): its series from now on."""
        if id(backend) not in self.backend_names:
            self.backends.append(backend)
            self.backend_names[id(backend)] = backend.description

    def backend_dropped(self, backend):
        """An upstream dropped at run time: its series end."""
        if backend in self.backends:
            self.backends.remove(backend)
            self.backend_names.pop(id(backend), None)

    def queue_timeout(self, reader):
        """A request or card session got no turn on ``reader`` within
        ``--queue-timeout`` (counted apart from its C086 results)."""
        self.stats_of(reader).queue_timeouts += 1

    def record(self, run, value):
        """Count the result ``value`` of the command ``run`` just finished
        (``run.RequestRun``, its ``i`` already past the command) and its
        latency since ``run.started``; returns the time now, the start of
        the run's next command.  The only metrics code on the hot path."""
        now = perf_counter()
        kind = run.request.commands[run.i - 1].name
        if kind in CARD_COMMANDS:
            stats = self.readers.get(run.reader)
            if stats is None:
                stats = self._stats_for(run.reader)
        else:
            stats = self.none
        key = (kind, value if value in MEANING else "OK")
        counts = stats.counts
        counts[key] = counts.get(key, 0) + 1
        elapsed = now - run.started
        stats.buckets[bisect.bisect_left(BUCKETS, elapsed)] += 1
        stats.seconds += elapsed
        return now

    def _stats_for(self, reader):
        if not isinstance(reader, Reader):
            return self.none
        stats = self.by_name.get(reader.name)
        if stats is None:
            name = reader.name if len(self.by_name) < self.max_readers else OTHER
            stats = self.by_name.get(name) or ReaderStats(name)
            self.by_name[name] = stats
        self.readers[reader] = stats
        return stats

    def stats_of(self, reader):
        """The ReaderStats a reader is counted in (made on first use)."""
        return self.readers.get(reader) or self._stats_for(reader)

    def upstreams(self):
        """The backends that are upstream proxies (``tcp://``, ``tls://``:
        they have an ``upstream_state``), in command-line order."""
        return [b for b in self.backends if hasattr(b, "upstream_state")]

    def backend_readers(self, backend):
        return [r for r in self.registry.readers if r.backend is backend]

    def backend_upstream_errors(self, backend):
        """C086 results of the backend's readers (every reader it ever had)."""
        seen = set()
        total = 0
        for reader, stats in list(self.readers.items()):
            if reader.backend is backend and id(stats) not in seen:
                seen.add(id(stats))
                total += stats.errors("C086")
        return total


def _cumulative(buckets):
    out, total = [], 0
    for bound, n in zip(BUCKETS + (float("inf"),), buckets):
        total += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return out


class Collector:
    """A prometheus_client collector over :class:`Metrics` (and the
    readiness of ``ready``, a callable returning a list of reasons, empty
    when ready).  ``sees`` (``access.Identity.sees``, or None: every
    reader) limits the readers it names to those a scraper may see: no
    label of another reader, and no ``(other)`` group mixing them."""

    def __init__(self, metrics, ready=None, sees=None):
        self.metrics = metrics
        self.ready = ready
        self.sees = sees

    def describe(self):
        return []

    def collect(self):
        m = self.metrics
        commands = CounterMetricFamily(
            "foxyproxy_reader_commands", "Card commands finished, by reader, kind and result "
            "(OK or a C08x result code).", labels=["reader", "kind", "result"])
        latency = HistogramMetricFamily(
            "foxyproxy_reader_command_seconds", "Time from the start of a command (queue wait "
            "included) to its result.", labels=["reader"])
        queue = GaugeMetricFamily("foxyproxy_reader_queue_length",
                                  "Requests waiting for the card.", labels=["reader"])
        busy = GaugeMetricFamily("foxyproxy_reader_busy",
                                 "1 while a request holds the card.", labels=["reader"])
        present = GaugeMetricFamily("foxyproxy_reader_present",
                                    "1 when the reader is listed and has a card.", labels=["reader"])
        timeouts = CounterMetricFamily(
            "foxyproxy_reader_queue_timeouts", "Requests and card sessions answered C086 because they "
            "got no turn on the card within --queue-timeout.", labels=["reader"])
        held = GaugeMetricFamily("foxyproxy_reader_held", "1 while a card session (or a vpcd bridge) "
                                 "holds the card, labelled with its holder.",
                                 labels=["reader", "frontend", "identity"])
        held_for = GaugeMetricFamily("foxyproxy_reader_held_seconds", "Seconds the card session "
                                     "holding the card has held it.", labels=["reader", "frontend", "identity"])
        groups = list(m.by_name.values()) + [m.none]
        sees = self.sees
        if sees is not None:
            get = m.registry.get
            groups = [g for g in groups if g is m.none or (get(g.name) is not None and sees(get(g.name)))]
        for stats in groups:
            for (kind, result), n in sorted(stats.counts.items()):
                commands.add_metric([stats.name, kind, result], n)
            if stats.counts:
                latency.add_metric([stats.name], _cumulative(stats.buckets), stats.seconds)
            if stats.queue_timeouts:
                timeouts.add_metric([stats.name], stats.queue_timeouts)
        listed = 0
        now = m.seconds()
        for reader in m.registry.readers:
            if listed >= m.max_readers:
                break
            if sees is not None and not sees(reader):
                continue
            listed += 1
            queue.add_metric([reader.name], len(reader.queue))
            busy.add_metric([reader.name], 1 if reader.queue.busy else 0)
            present.add_metric([reader.name], 1 if reader.present else 0)
            who = holder(reader, now) if reader.holder is not None else None
            if who is not None:
                labels = [reader.name, who["frontend"], who["identity"] or ""]
                held.add_metric(labels, 1)
                if who["held_seconds"] is not None:
                    held_for.add_metric(labels, who["held_seconds"])
        yield from (commands, latency, queue, busy, present, timeouts, held, held_for)

        readers = GaugeMetricFamily("foxyproxy_backend_readers", "Readers the backend lists now.",
                                    labels=["backend"])
        errors = CounterMetricFamily("foxyproxy_backend_upstream_errors",
                                     "Commands on the backend's readers answered C086.",
                                     labels=["backend"])
        reconnects = CounterMetricFamily("foxyproxy_backend_reconnects",
                                         "Connections to the upstream made again after the first.",
                                         labels=["backend"])
        for backend in m.backends:
            name = m.backend_names[id(backend)]
            readers.add_metric([name], len([r for r in m.backend_readers(backend)
                                            if sees is None or sees(r)]))
            errors.add_metric([name], m.backend_upstream_errors(backend))
            reconnects.add_metric([name], getattr(backend, "reconnects", 0))
        yield from (readers, errors, reconnects)

        conns = GaugeMetricFamily("foxyproxy_frontend_connections", "Client connections open.",
                                  labels=["frontend"])
        requests = CounterMetricFamily("foxyproxy_frontend_requests", "Requests received.",
                                       labels=["frontend"])
        auth = CounterMetricFamily("foxyproxy_frontend_auth_failures",
                                   "Requests refused for bad credentials.", labels=["frontend"])
        received = CounterMetricFamily("foxyproxy_frontend_received_bytes",
                                       "Bytes received from clients.", labels=["frontend"])
        sent = CounterMetricFamily("foxyproxy_frontend_sent_bytes", "Bytes sent to clients.",
                                   labels=["frontend"])
        for name, f in m.frontends.items():
            conns.add_metric([name], f.connections)
            requests.add_metric([name], f.requests)
            auth.add_metric([name], f.auth_failures)
            received.add_metric([name], f.bytes_in)
            sent.add_metric([name], f.bytes_out)
        yield from (conns, requests, auth, received, sent)

        # -- upstream liveness (tcp://, tls://) and the audit trail (--audit-log) --
        misses = CounterMetricFamily("foxyproxy_backend_heartbeat_misses",
                                     "Silent upstream flows found by a missed heartbeat (every "
                                     "connection to the upstream dropped and dialled again).",
                                     labels=["backend"])
        for backend in m.backends:
            if hasattr(backend, "heartbeat_misses"):
                misses.add_metric([m.backend_names[id(backend)]], backend.heartbeat_misses)
        yield misses
        up = GaugeMetricFamily("foxyproxy_upstream_up", "1 while the upstream proxy answers and its "
                               "reader list is read (0: down or silent), by upstream and owner id.",
                               labels=["upstream", "owner"])
        for backend in m.upstreams():
            up.add_metric([getattr(backend, "where", m.backend_names[id(backend)]),
                           getattr(backend, "owner", None) or ""],
                          1 if backend.upstream_state == "up" else 0)
        yield up
        audit = m.audit
        if audit is not None:
            yield CounterMetricFamily("foxyproxy_audit_records", "Audit records written.",
                                      value=audit.written)
            yield CounterMetricFamily("foxyproxy_audit_records_lost",
                                      "Audit records that could not be written (a full disk, EIO).",
                                      value=audit.lost)

        if self.ready is not None:
            yield GaugeMetricFamily("foxyproxy_ready", "1 when /readyz answers 200.",
                                    value=0 if self.ready() else 1)
        yield GaugeMetricFamily("foxyproxy_start_time_seconds",
                                "Start of the proxy, seconds since the Unix epoch.", value=m.started)


def quantile(buckets, q):
    """The ``q`` quantile (0..1) estimated from non-cumulative bucket
    counts by linear interpolation inside the bucket (as Prometheus's
    histogram_quantile does); None without observations."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    lower = 0.0
    for i, n in enumerate(buckets):
        upper = BUCKETS[i] if i < len(BUCKETS) else BUCKETS[-1]
        if n and seen + n >= rank:
            return lower + (upper - lower) * (rank - seen) / n
        seen += n
        lower = upper
    return BUCKETS[-1]
