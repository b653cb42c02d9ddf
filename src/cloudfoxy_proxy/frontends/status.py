"""``--metrics ENDPOINT``: Prometheus ``/metrics``, ``/healthz``,
``/readyz``, ``/status.json`` and a live status page at ``/``.

* ``/metrics``: the text exposition of prometheus_client, generated on the
  reactor thread (prometheus_client's own Twisted ``MetricsResource`` runs
  the collection in the reactor's thread pool, where it would race the
  plain counters the reactor thread updates; see metrics.py).
* ``/healthz``: 200 ``ok`` while the process serves.
* ``/readyz``: 200 once every backend has reported and every listener
  listens, and while at least ``--ready-min-upstreams`` upstream proxies
  are up (ops.Readiness); 503 with ``{"ready": false, "reasons": [...]}``
  otherwise, also during ``--drain-announce`` after SIGTERM.
* ``/`` and ``/status.json``: the status page (``status.html``, package
  data: HTML, CSS and a little JavaScript, no CDN, no framework, works
  offline) and the JSON it polls every second.

Everything but ``/healthz`` and ``/readyz`` needs the front end
``metrics``'s secret (``StatusSite``): ``--metrics-token-file``'s token or
a ``--credentials`` client's secret, as ``Authorization: Bearer TOKEN``
(Prometheus' ``authorization`` / ``bearer_token_file``) or as the password
of HTTP Basic auth with any user name (what a browser prompts for).  With
neither, protected mode serves loopback clients only.  A client limited to
some readers sees only those, everywhere.
"""

import collections
import json
import time
from importlib import resources

import attr
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource

from .. import __version__, errors
from ..metrics import Collector, Metrics, quantile
from ..sessions import holder
from .base import OneListener
from .http import NONE, HttpSite, Route
from .jsonapi import error_body

#: Seconds of history behind the chart, one point a second.
HISTORY = 300
#: Seconds over which the page's per-reader rate and percentiles are taken.
WINDOW = 10


class Sampler:
    """Once a second: the total APDU count (for the chart) and each
    reader's APDU count and latency buckets (for rates and percentiles
    over the last WINDOW seconds).  Memory is bounded: HISTORY points, WINDOW+1 snapshots of at
    most metrics.MAX_READERS readers."""

    def __init__(self, metrics, clock, interval=1.0):
        self.metrics = metrics
        self.clock = clock
        self.interval = interval
        self.rates = collections.deque(maxlen=HISTORY)  # APDUs/s, oldest first
        self.snapshots = collections.deque(maxlen=WINDOW + 1)  # (t, total, {name: (n, buckets)})
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    def start(self):
        self._loop.start(self.interval, now=True)

    def stop(self):
        if self._loop.running:
            self._loop.stop()

    def snapshot(self):
        readers = {}
        total = 0
        for stats in list(self.metrics.by_name.values()):
            n = stats.apdus
            total += n
            readers[stats.name] = (n, list(stats.buckets))
        return self.clock.seconds(), total, readers

    def sample(self):
        now = self.snapshot()
        if self.snapshots:
            t, total, _ = self.snapshots[-1]
            if now[0] > t:
                self.rates.append(round((now[1] - total) / (now[0] - t), 1))
        self.snapshots.append(now)

    def window(self, name):
        """(APDUs/s, p50 s, p99 s of its commands) of reader ``name`` over the window."""
        if len(self.snapshots) < 2:
            return 0.0, None, None
        t0, _, old = self.snapshots[0]
        t1, _, new = self.snapshots[-1]
        n1, b1 = new.get(name, (0, None))
        n0, b0 = old.get(name, (0, None))
        if b1 is None or t1 <= t0:
            return 0.0, None, None
        delta = [x - y for x, y in zip(b1, b0 or [0] * len(b1))]
        return (n1 - n0) / (t1 - t0), quantile(delta, 0.5), quantile(delta, 0.99)


def status(metrics, sampler, readiness, clock, sees=None):
    """The dict behind ``/status.json`` (shape in docs/deployment.md);
    ``sees`` (None: every reader) limits the readers listed."""
    readers = []
    holders = []
    now, wall = clock.seconds(), time.time()
    for reader in metrics.registry.readers[:metrics.max_readers]:
        if sees is not None and not sees(reader):
            continue
        stats = metrics.stats_of(reader)
        rate, p50, p99 = sampler.window(stats.name)
        who = holder(reader, now) if reader.holder is not None else None
        if who is not None:
            held = who.pop("held_seconds")
            who.update(reader=reader.name, held_seconds=None if held is None else round(held, 1),
                       since=None if held is None else round(wall - held, 3), waiting=len(reader.queue))
            holders.append(who)
        readers.append({
            "name": reader.name,
            "backend": reader.backend.description,
            "present": bool(reader.present),
            "busy": bool(reader.queue.busy),
            "queue": len(reader.queue),
            "commands": stats.commands,
            "errors": stats.errors(),
            "rate": round(rate, 1),
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "queue_timeouts": stats.queue_timeouts,
        })
    backends = [{
        "name": metrics.backend_names[id(b)],
        "readers": len([r for r in metrics.backend_readers(b) if sees is None or sees(r)]),
        "reported": metrics.registry.reported(b),
        "upstream_errors": metrics.backend_upstream_errors(b),
        "reconnects": getattr(b, "reconnects", 0),
        "state": getattr(b, "upstream_state", None),  # upstream proxies only: up, down, silent
    } for b in metrics.backends]
    upstreams = [{
        "upstream": getattr(b, "where", b.description),
        "owner": getattr(b, "owner", None),
        "state": b.upstream_state,
        "readers": len([r for r in metrics.backend_readers(b) if sees is None or sees(r)]),
    } for b in metrics.upstreams()]
    frontends = [{
        "name": name,
        "connections": f.connections,
        "requests": f.requests,
        "auth_failures": f.auth_failures,
        "bytes_in": f.bytes_in,
        "bytes_out": f.bytes_out,
    } for name, f in metrics.frontends.items()]
    reasons = readiness.reasons() if readiness is not None else []
    return {
        "version": __version__,
        "uptime": round(time.time() - metrics.started),
        "ready": not reasons,
        "reasons": reasons,
        "readers": readers,
        "backends": backends,
        "upstreams": upstreams,
        "frontends": frontends,
        "holders": holders,
        "unrouted_commands": metrics.none.commands,
        "interval": sampler.interval,
        "rates": list(sampler.rates),
    }


class StatusSite(HttpSite):
    """The metrics listener on the HTTP base: ``/healthz`` and ``/readyz``
    are open to every client (load balancers, Kubernetes probes); the rest
    need the front end ``metrics``'s secret (``--metrics-token-file``:
    ``Authorization: Bearer TOKEN`` or a Basic password; or a
    ``--credentials`` client allowed ``metrics``), and in protected mode
    (neither) are served to loopback clients only.  A quiet access log:
    scrapes every few seconds would flood it."""

    frontend = "metrics"
    log_prefix = "StatusSite"
    json_errors = True
    challenge = ((b"www-authenticate", b'Basic realm="cloudfoxy-proxy metrics"'),)

    def route(self, head):
        return _OPEN if head.path in (b"/healthz", b"/readyz") else _SCRAPE


_SCRAPE = Route({b"GET", b"HEAD"})
_OPEN = Route({b"GET", b"HEAD"}, auth=NONE, host_check=False)


class StatusResource(Resource):
    """The routes of the metrics listener; every answer is made for the
    request's identity (``request.session.identity``): readers it may not
    see are not named, in /metrics, /status.json or the page."""

    isLeaf = True

    def __init__(self, metrics, readiness, clock, sampler=None):
        super().__init__()
        self.metrics = metrics
        self.readiness = readiness
        self.clock = clock
        self.sampler = sampler or Sampler(metrics, clock)
        self.page = resources.files(__package__).joinpath("status.html").read_bytes()
        self.routes = {b"/": self.render_page, b"/metrics": self.render_metrics,
                       b"/status.json": self.render_status, b"/healthz": self.render_healthz,
                       b"/readyz": self.render_readyz}

    def render_GET(self, request):
        request.setHeader(b"cache-control", b"no-store")
        render = self.routes.get(request.path)
        if render is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"application/json")
            return error_body(errors.NOT_FOUND, "no such page: /, /metrics, /status.json, /healthz, /readyz")
        return render(request)

    render_HEAD = render_GET

    @staticmethod
    def sees(request):
        identity = request.session.identity if request.session is not None else None
        return None if identity is None or identity.readers is None else identity.sees

    def render_metrics(self, request):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(self.metrics, self.readiness.reasons if self.readiness is not None
                                    else None, sees=self.sees(request)))
        ProcessCollector(registry=registry)
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(registry)

    def render_healthz(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"

    def render_readyz(self, request):
        reasons = self.readiness.reasons() if self.readiness is not None else []
        request.setHeader(b"content-type", b"application/json")
        if reasons:
            request.setResponseCode(503)
        return json.dumps({"ready": not reasons, "reasons": reasons}).encode("utf-8") + b"\n"

    def render_status(self, request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(status(self.metrics, self.sampler, self.readiness, self.clock,
                                 self.sees(request))).encode("utf-8")

    def render_page(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy",
                          b"default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
        return self.page


@attr.s(frozen=True, kw_only=True)
class MetricsSettings:
    """``--metrics ENDPOINT``; its token (``--metrics-token-file``) is the
    dispatcher's access (tap.py)."""

    endpoint = attr.ib()


class MetricsFrontend(OneListener):
    """``--metrics``: Prometheus metrics, health, the status page
    (IFrontend).  Turns on counting in the dispatcher; counts every front
    end of ``core.stats``."""

    name = option = "metrics"

    def settings_of(self, options):
        return MetricsSettings(endpoint=options["metrics"])

    def make_service(self, settings, core):
        metrics = Metrics(core.registry, core.backends)
        metrics.frontends = core.stats
        metrics.seconds = core.reactor.seconds
        metrics.audit = core.dispatcher.audit
        core.dispatcher.metrics = metrics
        resource = StatusResource(metrics, core.readiness, core.reactor)
        service = core.listen(settings.endpoint, StatusSite(resource, core), "--metrics")
        service.on_start.append(resource.sampler.start)
        service.on_stop.append(resource.sampler.stop)
        service.resource = resource
        return service


METRICS = MetricsFrontend()
