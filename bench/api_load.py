#!/usr/bin/env python3
"""Load on the HTTP/JSON and WebSocket API (``--api``, docs/api.md).

C closed-loop clients each send ``transmit`` of one SELECT MF (K=1) to one
of 4 emulated cards (no card latency), check every answer
(``{"responses": ["9000"]}``) and send the next; over HTTP/1.1 keep-alive
(treq, one persistent connection per client) or over one WebSocket per
client (Autobahn).  The ``rest`` transport is the CloudFoxy REST front end
(``--rest``) under the same load: ``GET /api/v1/basic?terminal=/Emulated_0N&apdu=00A4000C023F00``
with ``X-Auth-Token`` over keep-alive, answer ``9000``.  Reported per transport and client count: APDUs/s,
latency p50/p99 and the proxy's CPU per APDU (utime+stime of the twistd
process from /proc over the measured window, as bench/loadgen.py reads it);
each round's line also gives the machine's steal time over the window (the
hypervisor running others on our cores: a round with steal was disturbed).
The clients run in this process under one Twisted reactor.

    .venv/bin/python bench/api_load.py [--clients 1,10,50] [--duration 5] [--rounds N]
        [--build LABEL=SRC ...] [--transports http,ws,rest] [--floor] [--write]

``--floor`` adds to every load a floor taking turns with the proxy: for
the WebSocket loads a bare Autobahn server with the proxy's options, for
the HTTP and REST loads a bare twisted.web ``Site`` and one leaf
``Resource`` (``serve_floor``), each answering a fixed answer of the same
shape: what the library and the machine cost before the proxy does
anything.  With it, a second table gives ours / floor / ratio per load.
The report's command: ``.venv/bin/python bench/api_load.py --floor --rounds 5 --clients 1,10``.

``--write`` puts the table into docs/performance.md (its own section after
bench/run.py's KEEP_MARK, replaced on each run).  Loopback only; every run
is bounded by warmup + duration + 10 s.
"""

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from bench.loadgen import _percentile, machine_steal, proc_cpu  # noqa: E402
from bench.run import KEEP_MARK  # noqa: E402
from support import HOST, ProxyProcess  # noqa: E402

TOKEN = "bench-api-token"
APDU = "00A4000C023F00"
CARDS = 4
SECTION = "## API: transmit over HTTP keep-alive and WebSocket"


class Stats:
    def __init__(self):
        self.latencies = []
        self.errors = 0
        self.measuring = False
        self.done = 0

    def record(self, started, ok):
        if not ok:
            self.errors += 1
        elif self.measuring:
            self.latencies.append(time.perf_counter() - started)


def run_load(base, transport, clients, duration, warmup, pid):
    """One load; a dict of results."""
    import treq
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
    from twisted.internet import defer, reactor, task
    from twisted.web.client import HTTPConnectionPool

    stats = Stats()
    stop = [False]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    rest_headers = {"X-Auth-Token": TOKEN}

    @defer.inlineCallbacks
    def http_client(n, pool):
        url = f"{base}/api/v1/readers/Emulated%200{n % CARDS}/transmit".encode()
        body = json.dumps({"apdus": [APDU]}).encode()
        while not stop[0]:
            t0 = time.perf_counter()
            try:
                r = yield treq.post(url, data=body, headers=headers, pool=pool, timeout=10)
                answer = yield r.json()
                ok = r.code == 200 and answer["responses"] == ["9000"]
            except Exception:
                ok = False
            stats.record(t0, ok)

    @defer.inlineCallbacks
    def rest_client(n, pool):
        url = f"{base}/api/v1/basic?terminal=/Emulated_0{n % CARDS}&apdu={APDU}".encode()
        while not stop[0]:
            t0 = time.perf_counter()
            try:
                r = yield treq.get(url, headers=rest_headers, pool=pool, timeout=10)
                answer = yield r.content()
                ok = r.code == 200 and answer == b"9000\n"
            except Exception:
                ok = False
            stats.record(t0, ok)

    class WsClient(WebSocketClientProtocol):
        def onOpen(self):
            self.n = 0
            self.reader = f"Emulated 0{self.factory.index % CARDS}"
            self.factory.opened.callback(self)
            self.next()

        def next(self):
            if stop[0]:
                self.sendClose()
                self.factory.done.callback(None)
                return
            self.n += 1
            self.t0 = time.perf_counter()
            self.sendMessage(json.dumps({"id": self.n, "reader": self.reader, "apdus": [APDU]}).encode())

        def onMessage(self, payload, isBinary):
            msg = json.loads(payload)
            stats.record(self.t0, msg.get("id") == self.n and msg.get("responses") == ["9000"])
            self.next()

    def ws_client(n):
        f = WebSocketClientFactory(base.replace("http", "ws", 1) + "/api/v1/ws", headers=headers)
        f.protocol = WsClient
        f.index = n
        f.opened = defer.Deferred()
        f.done = defer.Deferred()
        connectWS(f, timeout=10)
        return f.done

    result = {}

    @defer.inlineCallbacks
    def main(reactor):
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = clients
        client = {"http": lambda n: http_client(n, pool), "rest": lambda n: rest_client(n, pool), "ws": ws_client}
        loops = [client[transport](n) for n in range(clients)]
        yield task.deferLater(reactor, warmup, lambda: None)
        stats.measuring = True
        cpu0, t0, steal0 = proc_cpu(pid), time.perf_counter(), machine_steal()
        yield task.deferLater(reactor, duration, lambda: None)
        stats.measuring = False
        cpu1, t1, steal1 = proc_cpu(pid), time.perf_counter(), machine_steal()
        stop[0] = True
        yield defer.DeferredList(loops).addTimeout(10, reactor)
        yield pool.closeCachedConnections()
        n = len(stats.latencies)
        lat = sorted(stats.latencies)
        result.update(transport=transport, clients=clients, apdus=n, errors=stats.errors,
                      apdus_per_s=n / (t1 - t0),
                      p50_ms=_percentile(lat, 50) * 1000 if lat else None,
                      p99_ms=_percentile(lat, 99) * 1000 if lat else None,
                      cpu_us_per_apdu=(cpu1 - cpu0) * 1e6 / n if n and cpu0 is not None else None,
                      steal_pct=(100 * (steal1[0] - steal0[0]) / max(steal1[1] - steal0[1], 1e-9)
                                 if steal0 and steal1 else None))

    def report(_):
        print(json.dumps(result), flush=True)

    task.react(lambda r: main(r).addCallback(report))  # exits the process (this is a --one child)


def measure(clients_list, duration, warmup, rounds=1, builds=(("now", "."),), floor=False,
            transports=("http", "ws"), max_steal=5.0, retries=2):
    """Run every load ``rounds`` times, one proxy each (a fresh reactor per
    process: the loads run in child processes of this script); the
    ``builds`` (label, src: a tree whose ``src`` goes first on the proxy's
    PYTHONPATH, ``.`` this checkout) take turns within each round, so a
    change in the machine's load hits each alike; ``floor`` adds the bare
    Autobahn server or the bare twisted.web one (``serve_floor``) to
    every load's turns (build ``floor``).  A load
    during which the machine's steal time exceeded ``max_steal`` % is
    disturbed: it is run again, at most ``retries`` times, and kept marked
    if it stays disturbed.  One row per build, transport and client count,
    with every round's figures."""
    import subprocess

    rows = {}
    for n in range(rounds):
        for transport in transports:
            for clients in clients_list:
                for label, src in list(builds) + ([("floor", None)] if floor else []):
                    env = dict(os.environ)
                    if src not in (".", None):
                        env["PYTHONPATH"] = os.path.abspath(src)
                    for attempt in range(retries + 1):
                        out = subprocess.run([sys.executable, __file__, "--one", transport, str(clients),
                                              "--duration", str(duration), "--warmup", str(warmup)]
                                             + (["--floor"] if src is None else []),
                                             capture_output=True, text=True, timeout=warmup + duration + 60, env=env)
                        try:
                            r = json.loads(out.stdout.strip().splitlines()[-1])
                        except (ValueError, IndexError):
                            raise SystemExit(f"{transport} {clients}: {out.stdout}{out.stderr}")
                        r["disturbed"] = (r.get("steal_pct") or 0) > max_steal
                        print(f"round {n + 1} {label:6} {transport:4} {clients:3} clients: {r['apdus_per_s']:8,.0f} "
                              f"APDUs/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                              f"{r['cpu_us_per_apdu']:.0f} us proxy CPU/APDU  errors {r['errors']}  "
                              f"steal {r.get('steal_pct') or 0:.1f}%"
                              + ("  disturbed" + (", again" if attempt < retries else ", kept") if r["disturbed"]
                                 else ""), flush=True)
                        if not r["disturbed"]:
                            break
                    r["build"] = label
                    rows.setdefault((label, transport, clients), []).append(r)
    return [combine(runs) for runs in rows.values()]


def combine(runs):
    """One row from a load's rounds: medians over the undisturbed rounds
    (all rounds if every one was disturbed), the least CPU per APDU and
    every round's CPU (``cpu_rounds``; ``disturbed`` flags per round)."""
    import statistics

    quiet = [r for r in runs if not r.get("disturbed")] or runs
    cpu = [r["cpu_us_per_apdu"] for r in quiet]
    row = dict(runs[0], cpu_us_per_apdu=statistics.median(cpu), cpu_min=min(cpu),
               cpu_rounds=[r["cpu_us_per_apdu"] for r in runs],
               disturbed=[bool(r.get("disturbed")) for r in runs],
               errors=sum(r["errors"] for r in runs))
    for key in ("apdus_per_s", "p50_ms", "p99_ms"):
        row[key] = statistics.median(r[key] for r in quiet)
    return row


def serve_floor(transport="ws"):
    """The floor of a load, on loopback; prints its port.

    ``ws``: a bare Autobahn server (the proxy's factory options, no HTTP
    upgrade through twisted.web, no limits, no dispatcher, no card)
    answering every message ``{"id", "atr": null, "responses": ["9000"]}``.

    ``http`` and ``rest``: a bare twisted.web ``Site`` with one leaf
    ``Resource`` (no access check, no dispatcher, no card), with the
    proxy's listener options that change the cost of a request: no
    twisted.web idle timeout (``timeout=None``), no access log line,
    TCP_NODELAY.  A POST (the HTTP/JSON API's transmit) has its JSON body
    parsed and is answered ``{"atr":null,"responses":["9000"]}`` as
    ``application/json``; a GET (the REST front end's ``/api/v1/basic``)
    ``9000`` as ``text/plain``; both with ``Cache-Control: no-store``, as
    the proxy answers them."""
    import orjson
    from twisted.internet import reactor

    if transport != "ws":
        from twisted.web.http import HTTPChannel
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        class Transmit(Resource):
            isLeaf = True

            def render_POST(self, request):
                orjson.loads(request.content.read())
                request.setHeader(b"content-type", b"application/json")
                request.setHeader(b"cache-control", b"no-store")
                return orjson.dumps({"atr": None, "responses": ["9000"]}) + b"\n"

            def render_GET(self, request):
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                request.setHeader(b"cache-control", b"no-store")
                return b"9000\n"

        class Channel(HTTPChannel):
            def connectionMade(self):
                self.transport.setTcpNoDelay(True)
                super().connectionMade()

        class FloorSite(Site):
            noisy = False
            protocol = Channel

            def log(self, request):
                pass

        print(reactor.listenTCP(0, FloorSite(Transmit(), timeout=None), interface=HOST).getHost().port,
              flush=True)
        reactor.run()
        return

    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

    class Floor(WebSocketServerProtocol):
        def onMessage(self, payload, isBinary):
            self.sendMessage(orjson.dumps({"id": orjson.loads(payload)["id"], "atr": None, "responses": ["9000"]}))

    factory = WebSocketServerFactory()
    factory.protocol = Floor
    factory.setProtocolOptions(utf8validateIncoming=False)
    print(reactor.listenTCP(0, factory, interface=HOST).getHost().port, flush=True)
    reactor.run()


def one_floor(transport, clients, duration, warmup):
    import subprocess

    server = subprocess.Popen([sys.executable, __file__, "--serve-floor", transport], stdout=subprocess.PIPE,
                              text=True)
    try:
        port = int(server.stdout.readline())
        run_load(f"http://{HOST}:{port}", transport, clients, duration, warmup, server.pid)
    finally:
        server.terminate()
        server.wait(10)


def one(transport, clients, duration, warmup):
    front = ("--rest", "Site", "FOXYPROXY_REST_TOKEN") if transport == "rest" else (
        "--api", "ApiSite", "FOXYPROXY_API_TOKEN")
    p = ProxyProcess(front[0], f"tcp:0:interface={HOST}", "--backend", f"emulated:?cards={CARDS}", "--no-signing",
                     listeners=2, env={front[2]: TOKEN}).start()
    try:
        base = f"http://{HOST}:{p.ports[front[1]][0]}"
        run_load(base, transport, clients, duration, warmup, p.proc.pid)
    finally:
        p.stop()


NAMES = {"http": "HTTP keep-alive", "ws": "WebSocket", "rest": "REST front end (keep-alive)"}
FLOORS = {"http": "bare twisted.web", "ws": "bare Autobahn", "rest": "bare twisted.web"}


def ratio_table(rows):
    """Markdown: ours / floor / ratio of the proxy's CPU per APDU for every
    load measured with a floor (medians, every round in brackets)."""
    floors = {(r["transport"], r["clients"]): r for r in rows if r["build"] == "floor"}
    lines = ["| path | ours µs/APDU | floor µs/APDU | ratio |", "|---|---|---|---|"]
    for r in rows:
        f = floors.get((r["transport"], r["clients"]))
        if r["build"] == "floor" or f is None:
            continue
        rounds = lambda x: ", ".join(f"{c:.0f}" for c in x["cpu_rounds"])  # noqa: E731
        label = f"{r['build']}: " if len({x['build'] for x in rows}) > 2 else ""
        lines.append(f"| {label}{NAMES[r['transport']]}, {r['clients']} clients | {r['cpu_us_per_apdu']:.0f} "
                     f"[{rounds(r)}] | {FLOORS[r['transport']]} {f['cpu_us_per_apdu']:.0f} [{rounds(f)}] | "
                     f"{r['cpu_us_per_apdu'] / f['cpu_us_per_apdu']:.2f}× |")
    return "\n".join(lines)


def table(rows):
    """Markdown: one line per row; the budget is judged on the median."""
    builds = len({r["build"] for r in rows}) > 1
    lines = [("| build " if builds else "") + "| transport | clients | APDUs/s | p50 ms | p99 ms "
             "| proxy CPU µs/APDU: median (least; every round) | budget | errors |",
             ("|---" if builds else "") + "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = 150 if r["transport"] == "ws" else 300
        name = NAMES[r["transport"]]
        rounds = ", ".join(f"{c:.0f}" + ("*" if d else "")
                           for c, d in zip(r["cpu_rounds"], r.get("disturbed") or [False] * len(r["cpu_rounds"])))
        verdict = (f"≤ {budget} {'ok' if r['cpu_us_per_apdu'] <= budget else 'OVER'}" if r["build"] != "floor"
                   else f"– ({FLOORS[r['transport']]}, not the proxy)")
        lines.append((f"| {r['build']} " if builds else "") +
                     f"| {name} | {r['clients']} | {r['apdus_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['cpu_us_per_apdu']:.0f} ({r['cpu_min']:.0f}; {rounds}) | {verdict} | {r['errors']} |")
    if any(any(r.get("disturbed") or ()) for r in rows):
        lines.append("\n\\* a disturbed round (steal time over the limit, after the retries); medians and "
                     "least are of the other rounds when there are any.")
    return "\n".join(lines)


NOTES = """With one client every request is a round trip on its own: the proxy sleeps in `epoll_wait`
between messages and is woken for each, so its CPU per APDU is highest there, and the same Python
work costs about three times what it costs back to back (`python bench/api_frame.py`: the CPU has
run other code in between). The `floor` rows are a bare Autobahn server (WebSocket) or a bare twisted.web
`Site` with one leaf `Resource` (HTTP, REST) with the proxy's options, answering a fixed answer of
the same shape: what the library and the machine cost before the proxy does anything. Over HTTP most of the proxy's CPU is twisted.web's request machinery (a `Request`
object, header parsing and formatting, a `Date` header, pausing and resuming the transport around
each request). APDUs/s are bounded by the Python clients sharing the 2 cores, not by the proxy.
On this shared machine a round with steal time is a disturbed round: compare builds within a run
(they take turns), not across runs."""


def write(text, args, load):
    path = os.path.join(os.path.dirname(HERE), "docs", "performance.md")
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    if KEEP_MARK not in doc:
        doc = doc.rstrip("\n") + "\n\n" + KEEP_MARK + "\n"
    cmd = "python bench/api_load.py " + " ".join(a for a in sys.argv[1:])
    section = (f"{SECTION}\n\nMeasured {time.strftime('%Y-%m-%d %H:%M')} by `{cmd}` on {os.cpu_count()} CPUs, "
               f"Python {platform.python_version()}; load average before the run {load}. {CARDS} emulated cards, "
               f"no card latency, K=1 (one SELECT MF per transmit), every answer checked, {args.duration:g} s "
               f"measured after {args.warmup:g} s of warm-up, a fresh proxy per load; every load ran "
               f"{args.rounds} times (builds taking turns; a load with over {args.max_steal:g} % steal time "
               f"run again up to {args.retries} times); the clients (treq / Autobahn) "
               f"run in one other process on the same machine.\n\n{text}\n\n{NOTES}\n")
    head, tail = doc.split(KEEP_MARK, 1)
    if SECTION in tail:
        before, rest = tail.split(SECTION, 1)
        after = rest[rest.find("\n## "):] if "\n## " in rest else ""
        tail = before + section + ("\n" + after.lstrip("\n") if after else "")
    else:
        tail = tail.rstrip("\n") + "\n\n" + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + KEEP_MARK + tail)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,10,50")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=1, help="times every load runs (the builds taking turns)")
    ap.add_argument("--build", action="append", metavar="LABEL=SRC",
                    help="a proxy build to measure: the src directory of a tree of this project "
                         "(e.g. an older commit from git archive); repeatable; default: this checkout")
    ap.add_argument("--transports", default="http,ws,rest",
                    help="some of http, ws, rest (the CloudFoxy REST front end), comma-separated (default: all)")
    ap.add_argument("--max-steal", type=float, default=5.0,
                    help="a load with more steal time (%% of the machine) is disturbed and run again (default 5)")
    ap.add_argument("--retries", type=int, default=2, help="runs again of a disturbed load (default 2)")
    ap.add_argument("--floor", action="store_true",
                    help="also measure the floor under the same loads: a bare Autobahn WebSocket server, "
                         "a bare twisted.web HTTP server (the libraries' floors)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("TRANSPORT", "CLIENTS"), help=argparse.SUPPRESS)
    ap.add_argument("--serve-floor", nargs="?", const="ws", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.duration = max(0.5, min(args.duration, 120))
    args.warmup = max(0.0, min(args.warmup, 30))
    if args.serve_floor:
        return serve_floor(args.serve_floor)
    if args.one:
        run = one_floor if args.floor else one
        return run(args.one[0], min(int(args.one[1]), 500), args.duration, args.warmup)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    builds = [tuple(b.split("=", 1)) for b in args.build or ["now=."]]
    if any(len(b) != 2 for b in builds):
        raise SystemExit("--build LABEL=SRC, e.g. --build before=/tmp/before/src")
    rows = measure([min(int(c), 500) for c in args.clients.split(",")], args.duration, args.warmup,
                   max(1, min(args.rounds, 10)), builds, args.floor,
                   [t for t in ("http", "ws", "rest") if t in args.transports.split(",")], args.max_steal,
                   max(0, min(args.retries, 5)))
    text = table(rows)
    if args.floor:
        text += "\n\n" + ratio_table(rows)
    print("\n" + text)
    if args.write:
        write(text, args, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
