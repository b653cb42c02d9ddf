"""``--metrics ENDPOINT``: Prometheus ``/metrics``, ``/healthz``,
``/readyz``, ``/status.json`` and a live status page at ``/``.

* ``/metrics``: the text exposition of prometheus_client, generated on the
  reactor thread (prometheus_client's own Twisted ``MetricsResource`` runs
  the collection in the reactor's thread pool, where it would race the
  plain counters the reactor thread updates; see metrics.py).
* ``/healthz``: 200 ``ok`` while the process serves.
* ``/readyz``: 200 once every backend has reported and every listener
  listens (ops.Readiness); 503 with ``{"ready": false, "reasons": [...]}``
  otherwise.
* ``/`` and ``/status.json``: the status page (HTML, CSS and a little
  JavaScript written here: no CDN, no framework, works offline) and the
  JSON it polls every second.

With ``--metrics-token-file``, everything but ``/healthz`` and ``/readyz``
needs the token: ``Authorization: Bearer TOKEN`` (Prometheus'
``authorization`` / ``bearer_token_file``) or HTTP Basic auth with any user
name and the token as password (what a browser prompts for).
"""

import base64
import collections
import hmac
import json
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import Site

from .. import __version__
from ..tap import Listener
from ..metrics import Collector, Metrics, quantile

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


def status(metrics, sampler, readiness, clock):
    """The dict behind ``/status.json`` (shape in docs/deployment.md)."""
    readers = []
    for reader in metrics.registry.readers[:metrics.max_readers]:
        stats = metrics.stats_of(reader)
        rate, p50, p99 = sampler.window(stats.name)
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
        })
    backends = [{
        "name": metrics.backend_names[id(b)],
        "readers": len(metrics.backend_readers(b)),
        "reported": metrics.registry.reported(b),
        "upstream_errors": metrics.backend_upstream_errors(b),
        "reconnects": getattr(b, "reconnects", 0),
    } for b in metrics.backends]
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
        "frontends": frontends,
        "unrouted_commands": metrics.none.commands,
        "interval": sampler.interval,
        "rates": list(sampler.rates),
    }


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, render, protected, token):
        super().__init__()
        self._render = render
        self.protected = protected
        self.token = token

    def render_GET(self, request):
        request.setHeader(b"cache-control", b"no-store")
        if self.protected and self.token is not None and not authorized(request, self.token):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="cloudfoxy-proxy metrics"')
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"unauthorized: send Authorization: Bearer TOKEN\n"
        return self._render(request)

    render_HEAD = render_GET


def authorized(request, token):
    """``Authorization: Bearer TOKEN``, or Basic with TOKEN as password."""
    given = request.getHeader(b"authorization") or b""
    scheme, _, value = given.partition(b" ")
    scheme = scheme.lower()
    if scheme == b"bearer":
        secret = value.strip()
    elif scheme == b"basic":
        try:
            secret = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except ValueError:
            return False
    else:
        return False
    return hmac.compare_digest(secret, token)


class StatusSite(Site):
    """Quiet access log: scrapes every few seconds would flood it."""

    noisy = False

    def log(self, request):
        pass


def make_root(metrics, readiness, clock, token=None, sampler=None):
    """The resource tree of the metrics listener (``token`` bytes or None)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(metrics, readiness.reasons if readiness is not None else None))
    ProcessCollector(registry=registry)
    sampler = sampler or Sampler(metrics, clock)

    def render_metrics(request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(registry)

    def render_healthz(request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"

    def render_readyz(request):
        reasons = readiness.reasons() if readiness is not None else []
        request.setHeader(b"content-type", b"application/json")
        if reasons:
            request.setResponseCode(503)
        return json.dumps({"ready": not reasons, "reasons": reasons}).encode("utf-8") + b"\n"

    def render_status(request):
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(status(metrics, sampler, readiness, clock)).encode("utf-8")

    def render_page(request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy",
                          b"default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
        return PAGE.encode("utf-8")

    routes = {b"": (render_page, True), b"metrics": (render_metrics, True),
              b"status.json": (render_status, True), b"healthz": (render_healthz, False),
              b"readyz": (render_readyz, False)}
    root = Resource()
    for name, (render, protected) in routes.items():
        root.putChild(name, _Leaf(render, protected, token))
    root.sampler = sampler
    root.registry = registry
    return root


class MetricsService(Listener):
    """The ``--metrics`` listener (a tap.Listener: a busy port stops
    start-up with one line); runs the page's sampler while it listens.
    With ``limits`` its connections count in the front ends' shared
    ConnectionLimits."""

    def __init__(self, endpoint, root, description, limits=None):
        site = StatusSite(root)
        super().__init__(endpoint, limits.wrap(site) if limits is not None else site, description, "--metrics")
        self.root = root

    def startService(self):
        super().startService()
        self.root.sampler.start()

    def stopService(self):
        self.root.sampler.stop()
        return super().stopService()


def make_metrics_service(config, top, line_factory, rest_service, reactor):
    """The ``--metrics`` listener of the service tree ``top`` (tap.makeService):
    turns on counting in the dispatcher and registers the front ends."""
    from twisted.internet.endpoints import serverFromString

    metrics = Metrics(top.registry, top.backends)
    metrics.frontend("line", line_factory)
    if rest_service is not None:
        metrics.frontend("rest", getattr(rest_service.factory, "wrappedFactory", rest_service.factory))
    top.dispatcher.metrics = metrics
    top.metrics = metrics
    token = config.get("metrics-token")
    root = make_root(metrics, top.readiness, reactor, token.encode("utf-8") if token else None)
    return MetricsService(serverFromString(reactor, config["metrics"]), root, config["metrics"],
                          getattr(top, "limits", None))


PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cloudfoxy-proxy status</title>
<style>
:root { --fg:#1d2330; --muted:#6b7385; --line:#e3e6ec; --bg:#f6f7f9; --ok:#1f8a4c; --bad:#c0392b;
        --warn:#b7791f; --accent:#2f6fdd; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color:var(--fg); background:var(--bg); }
header { display:flex; align-items:baseline; gap:1rem; padding:.9rem 1.5rem; background:#fff;
         border-bottom:1px solid var(--line); }
header h1 { font-size:1.15rem; margin:0; }
header .meta { color:var(--muted); }
main { max-width:1200px; margin:0 auto; padding:1rem 1.5rem 2rem; display:grid; gap:1rem;
       grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:.8rem 1rem;
          overflow-x:auto; }
section.wide { grid-column: 1 / -1; }
h2 { font-size:.8rem; text-transform:uppercase; letter-spacing:.06em; color:var(--muted);
     margin:0 0 .5rem; }
table { width:100%; border-collapse:collapse; }
th, td { text-align:left; padding:.3rem .5rem; border-bottom:1px solid var(--line);
         white-space:nowrap; }
th { font-weight:600; color:var(--muted); font-size:.8rem; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
tr:last-child td { border-bottom:none; }
.pill { display:inline-block; padding:0 .5rem; border-radius:999px; font-size:.78rem;
        font-weight:600; }
.ok { background:#e3f4ea; color:var(--ok); } .bad { background:#fbe6e3; color:var(--bad); }
.busy { background:#fff2d9; color:var(--warn); } .idle { background:#eef0f4; color:var(--muted); }
#chart { width:100%; height:160px; display:block; }
#chart .grid { stroke:var(--line); stroke-width:1; }
#chart .lbl { fill:var(--muted); font-size:11px; }
#chart polyline { fill:none; stroke:var(--accent); stroke-width:2; }
#chart polygon { fill:var(--accent); opacity:.12; }
.now { font-size:1.6rem; font-weight:600; }
.muted { color:var(--muted); }
@media (max-width: 900px) { main { grid-template-columns: minmax(0, 1fr); } }
</style></head>
<body>
<header><h1>cloudfoxy-proxy</h1><span id="ready" class="pill idle">…</span>
<span class="meta" id="meta"></span></header>
<main>
<section class="wide"><h2>APDUs per second, last 5 minutes</h2>
<div><span class="now" id="rate-now">0</span> <span class="muted">APDUs/s now</span></div>
<svg id="chart" viewBox="0 0 1000 160" preserveAspectRatio="none" role="img"
     aria-label="APDUs per second"></svg></section>
<section class="wide"><h2>Readers</h2><table id="readers"><thead><tr>
<th>Reader</th><th>Backend</th><th>Card</th><th>State</th><th class="num">Queue</th>
<th class="num">APDUs/s</th><th class="num">p50 ms</th><th class="num">p99 ms</th>
<th class="num">Commands</th><th class="num">Errors</th></tr></thead><tbody></tbody></table></section>
<section><h2>Backends</h2><table id="backends"><thead><tr><th>Backend</th><th>Health</th>
<th class="num">Readers</th><th class="num">C086</th><th class="num">Reconnects</th>
</tr></thead><tbody></tbody></table></section>
<section><h2>Front ends</h2><table id="frontends"><thead><tr><th>Front end</th>
<th class="num">Connections</th><th class="num">Requests</th><th class="num">Auth failures</th>
<th class="num">Bytes in</th><th class="num">Bytes out</th></tr></thead><tbody></tbody></table>
</section>
<section class="wide" id="reasons-box" hidden><h2>Not ready because</h2><ul id="reasons"></ul></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (n) => (n === null || n === undefined) ? "\u2014" : Number(n).toLocaleString("en-US");
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}
function pill(text, cls) {
  const td = document.createElement("td"), s = document.createElement("span");
  s.className = "pill " + cls; s.textContent = text; td.appendChild(s); return td;
}
function fill(id, rows, make) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...rows.map((r) => { const tr = document.createElement("tr");
    tr.append(...make(r)); return tr; }));
}
function bytes(n) {
  const u = ["B", "kB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function chart(rates) {
  const svg = $("chart"), W = 1000, H = 160, top = 18, bottom = 20;
  const n = 300, max = Math.max(10, ...rates) * 1.15;
  const y = (v) => H - bottom - (H - top - bottom) * v / max;
  const x = (i) => W - (rates.length - 1 - i) * (W / (n - 1));
  let out = "";
  for (const f of [0, 0.5, 1]) {
    const v = max * f, yy = y(v).toFixed(1);
    out += `<line class="grid" x1="0" x2="${W}" y1="${yy}" y2="${yy}"/>` +
           `<text class="lbl" x="4" y="${(yy - 3).toFixed(1)}">${Math.round(v).toLocaleString("en-US")}</text>`;
  }
  out += `<text class="lbl" x="4" y="${H - 4}">−5 min</text>` +
         `<text class="lbl" x="${W - 4}" y="${H - 4}" text-anchor="end">now</text>`;
  if (rates.length > 1) {
    const pts = rates.map((v, i) => x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    out += `<polygon points="${x(0).toFixed(1)},${y(0)} ${pts} ${W},${y(0)}"/><polyline points="${pts}"/>`;
  }
  svg.innerHTML = out;
}
async function refresh() {
  let s;
  try {
    const r = await fetch("status.json", {cache: "no-store", credentials: "same-origin"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    s = await r.json();
  } catch (e) {
    $("ready").className = "pill bad"; $("ready").textContent = "unreachable"; return;
  }
  $("ready").className = "pill " + (s.ready ? "ok" : "bad");
  $("ready").textContent = s.ready ? "ready" : "not ready";
  $("meta").textContent = `version ${s.version} \u00b7 up ${s.uptime} s \u00b7 ` +
    `${s.readers.length} readers`;
  const rates = s.rates;
  $("rate-now").textContent = fmt(rates.length ? rates[rates.length - 1] : 0);
  chart(rates);
  fill("readers", s.readers, (r) => [cell(r.name), cell(r.backend, "muted"),
    pill(r.present ? "present" : "absent", r.present ? "ok" : "idle"),
    pill(r.busy ? "busy" : "idle", r.busy ? "busy" : "idle"), cell(fmt(r.queue), "num"),
    cell(fmt(r.rate), "num rate"), cell(fmt(r.p50_ms), "num"), cell(fmt(r.p99_ms), "num"),
    cell(fmt(r.commands), "num"), cell(fmt(r.errors), "num")]);
  fill("backends", s.backends, (b) => [cell(b.name),
    pill(b.reported ? "reported" : "waiting", b.reported ? "ok" : "bad"),
    cell(fmt(b.readers), "num"), cell(fmt(b.upstream_errors), "num"), cell(fmt(b.reconnects), "num")]);
  fill("frontends", s.frontends, (f) => [cell(f.name), cell(fmt(f.connections), "num"),
    cell(fmt(f.requests), "num"), cell(fmt(f.auth_failures), "num"),
    cell(bytes(f.bytes_in), "num"), cell(bytes(f.bytes_out), "num")]);
  $("reasons-box").hidden = s.ready;
  $("reasons").replaceChildren(...s.reasons.map((t) => { const li = document.createElement("li");
    li.textContent = t; return li; }));
}
refresh();
setInterval(refresh, 1000);
</script>
</body></html>
"""
