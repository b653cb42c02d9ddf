#!/usr/bin/env python3
"""What counting for ``--metrics`` costs on the hot path.

1. In process: the CPU time of one ``Metrics.record`` call (what the
   dispatcher adds per command result when metrics are on), and of a
   whole K=1 APDU request through ``Dispatcher.execute`` on an emulated
   card, for the dispatcher of ``--base`` (a git commit, before metrics)
   and for this tree without and with metrics: the same process-free
   measurement, free of socket and scheduling noise.
2. Real processes: emulated cards, 50 persistent clients, K=1 (the budget
   load of docs/performance.md), the proxy's CPU per APDU without
   ``--metrics`` and with it (while /metrics is scraped once a second),
   alternating ``--rounds`` times so drift on a shared machine hits both.

Every load is bounded in time; every process is started here and stopped
by its PID.  Usage::

    .venv/bin/python bench/metrics_overhead.py [--rounds 3] [--duration 5] [--base f4bd29c] [--json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

from support import HOST, ProxyProcess  # noqa: E402

from bench import loadgen  # noqa: E402


def record_cost(n=200000):
    """Seconds of CPU per Metrics.record call for a K=1 APDU on a reader."""
    from cloudfoxy_proxy.interfaces import ReaderInfo
    from cloudfoxy_proxy.metrics import Metrics
    from cloudfoxy_proxy.parser import make_command, Request
    from cloudfoxy_proxy.registry import ReaderRegistry

    registry = ReaderRegistry()
    backend = object()
    registry.update(backend, [ReaderInfo("k", "Emulated 00")])
    metrics = Metrics(registry, [])

    class Run:
        __slots__ = ("reader", "request", "i", "started")

    run = Run()
    run.reader = registry.readers[0]
    run.request = Request("Emulated 00", None, [make_command(["1", "APDU", "00A4000C023F00"])])
    run.i = 1
    run.started = time.perf_counter()
    record = metrics.record
    t0 = time.process_time()
    for _ in range(n):
        record(run, "9000")
    return (time.process_time() - t0) / n


def execute_cost(with_metrics, n=20000):
    """Seconds of CPU per K=1 APDU request through Dispatcher.execute on an
    emulated card (no sockets), best of 25 runs of ``n``; run in a child
    process whose PYTHONPATH picks the code under test."""
    from twisted.internet.task import Clock

    from cloudfoxy_proxy.backends.emulated import from_url
    from cloudfoxy_proxy.dispatch import Dispatcher, Session
    from cloudfoxy_proxy.parser import Request, make_command
    from cloudfoxy_proxy.registry import ReaderRegistry

    clock = Clock()
    registry = ReaderRegistry()
    backend = from_url("emulated:?cards=1", {})(clock)
    backend.start(registry)
    dispatcher = Dispatcher(registry, clock)
    if with_metrics:
        from cloudfoxy_proxy.metrics import Metrics

        dispatcher.metrics = Metrics(registry, [backend])
    request = Request("Emulated 00", None, [make_command(["1", "APDU", "00A4000C023F00"])])
    session = Session()
    execute = dispatcher.execute
    assert execute(request, session) == [("1", "9000")]
    best = None
    for _ in range(25):
        t0 = time.process_time()
        for _ in range(n):
            execute(request, session)
        cost = (time.process_time() - t0) / n
        best = cost if best is None else min(best, cost)
    return best


def execute_cost_of(src, with_metrics, module="bench.metrics_overhead"):
    """``module``'s ``execute_cost(with_metrics)`` run in a child process
    with the src/ tree ``src`` first on its path."""
    code = ("import sys; sys.path.insert(0, %r); sys.path.insert(0, %r); "
            "from %s import execute_cost; print(execute_cost(%r))"
            % (REPO, src, module, with_metrics))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=src))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def base_tree(commit, into):
    """The src/ tree of ``commit`` extracted into ``into``; its path."""
    archive = subprocess.run(["git", "-C", REPO, "archive", commit, "src"], capture_output=True,
                             check=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True, timeout=60)
    return os.path.join(into, "src")


def scraper(port, stop):
    while not stop.is_set():
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as r:
            r.read()
        stop.wait(1.0)


def one(with_metrics, duration):
    args = ["--metrics", f"tcp:0:interface={HOST}"] if with_metrics else []
    p = ProxyProcess(*args, listeners=2 if with_metrics else 1).start()
    stop = threading.Event()
    t = None
    try:
        if with_metrics:
            t = threading.Thread(target=scraper, args=(p.ports["StatusSite"][0], stop), daemon=True)
            t.start()
        r = loadgen.run(HOST, p.port, clients=50, k=1, duration=duration, warmup=1.0, pid=p.proc.pid)
        assert r["errors"] == 0, r["error_samples"]
        return r
    finally:
        stop.set()
        if t is not None:
            t.join(10)
        p.stop()


def measure(rounds=3, duration=5.0, base="f4bd29c", log=print):
    """Every figure of this module as a dict (see :func:`report`)."""
    per_call = min(record_cost() for _ in range(3))
    log(f"Metrics.record: {per_call * 1e6:.3f} us CPU per call (best of 3 x 200,000)")
    res = {"record_us": per_call * 1e6, "base": base, "off": [], "on": []}
    here = os.path.join(REPO, "src")
    with tempfile.TemporaryDirectory() as tmp:
        old = base_tree(base, tmp)
        runs = [(execute_cost_of(old, False), execute_cost_of(here, False), execute_cost_of(here, True))
                for _ in range(5)]  # interleaved, so drift on a shared machine hits all three
    b, off, on = (min(r[i] for r in runs) for i in range(3))
    res.update(execute_base_us=b * 1e6, execute_off_us=off * 1e6, execute_on_us=on * 1e6)
    log(f"Dispatcher.execute, K=1 APDU on an emulated card, CPU per request (best of 5 x 25 x 20,000): "
        f"{base} {b * 1e6:.2f} us; this tree without metrics {off * 1e6:.2f} us, "
        f"with metrics {on * 1e6:.2f} us ({(on - b) * 1e6:+.2f} us against {base})")
    for i in range(rounds):
        for key, enabled in (("off", False), ("on", True)):
            r = one(enabled, duration)
            res[key].append({"cpu_us": r["proxy_cpu_us_per_apdu"], "apdus_per_s": r["apdus_per_s"],
                             "p99_ms": r["latency_ms"]["p99"]})
            log(f"round {i + 1} metrics {key:3}: {r['proxy_cpu_us_per_apdu']:.1f} us/APDU, "
                f"{r['apdus_per_s']:,.0f} APDUs/s, p99 {r['latency_ms']['p99']} ms")
    if rounds:
        m_off = statistics.median(x["cpu_us"] for x in res["off"])
        m_on = statistics.median(x["cpu_us"] for x in res["on"])
        res.update(off_median=m_off, on_median=m_on, delta=m_on - m_off)
        log(f"median CPU per APDU: without --metrics {m_off:.1f} us, with {m_on:.1f} us "
            f"(difference {m_on - m_off:+.1f} us)")
    return res


def report(res):
    """The docs/performance.md section for :func:`measure`'s results."""
    out = ["## Metrics", "",
           "What counting for `--metrics` adds to the hot path (`bench/metrics_overhead.py`; "
           "budget: about 2 µs of CPU per APDU).", "",
           "| measurement | without metrics | with metrics | difference |", "|---|---|---|---|"]
    out.append(f"| `Dispatcher.execute`, one K=1 APDU request on an emulated card, in process, "
               f"CPU per request (best of 5×25×20,000; before: commit {res['base']}) | "
               f"{res['execute_base_us']:.2f} µs before, {res['execute_off_us']:.2f} µs now | "
               f"{res['execute_on_us']:.2f} µs | {res['execute_on_us'] - res['execute_base_us']:+.2f} µs |")
    out.append(f"| `Metrics.record` alone, CPU per call | — | {res['record_us']:.2f} µs | |")
    if res.get("off"):
        offs = ", ".join(f"{x['cpu_us']:.1f}" for x in res["off"])
        ons = ", ".join(f"{x['cpu_us']:.1f}" for x in res["on"])
        out.append(f"| real processes, emulated, 50 clients, K=1, proxy CPU per APDU (median of "
                   f"{len(res['off'])} alternating rounds: {offs} / {ons}; /metrics scraped every second) "
                   f"| {res['off_median']:.1f} µs | {res['on_median']:.1f} µs | {res['delta']:+.1f} µs |")
    out += ["", "The in-process figure is the one to read: it runs the dispatcher's hot path "
            "alone, so neither the sockets nor other work on the machine blur it. The real-process "
            "rounds share two cores with the load generator; their spread between rounds is larger "
            "than the difference being measured.", ""]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--base", default="f4bd29c", help="git commit of the dispatcher before metrics")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="print the docs/performance.md section")
    a = ap.parse_args()
    res = measure(a.rounds, a.duration, a.base, log=lambda m: print(m, flush=True))
    if a.json:
        print(json.dumps(res))
    if a.markdown:
        print("\n".join(report(res)))


if __name__ == "__main__":
    main()
