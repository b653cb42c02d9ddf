#!/usr/bin/env python3
"""The benchmark suite: starts real ``twistd -n foxyproxy`` processes on
loopback, drives them with bench/loadgen.py and writes
docs/performance.md (+ docs/performance.png) with every figure next to
its budget line.

    .venv/bin/python bench/run.py              # everything, ~5 minutes
    .venv/bin/python bench/run.py --quick      # ~1-2 minute smoke run (bench/results/quick.md)
    .venv/bin/python bench/run.py --only k1,k4 # a subset (bench/results/partial.md)
    .venv/bin/python bench/run.py --profile-only   # just the py-spy profile

Every load is bounded in time, every process is started here and
stopped by its PID.  Raw results go to bench/results/*.json.
"""

import argparse
import base64
import collections
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

from support import HOST, LineClient, ProxyProcess, free_port  # noqa: E402

from bench import loadgen  # noqa: E402
from bench.helpers import fake_cloudfoxy, fake_stats, rest_args, trivial_responder  # noqa: E402

MB = 1e6  # budgets are in MB (10^6 bytes)

# The budget (docs/performance.md states each figure next to its line).
BUDGET_CPU_US = 40.0
BUDGET_APDUS = 10000
BUDGET_REST_APDUS = 2500
BUDGET_REST_P99_MS = 25.0
CARDS_120_CEILING = 120 / 0.005  # 120 cards, 5 ms each: 24,000 APDUs/s
BUDGET_START_EMU_S = 1.0
BUDGET_START_REST_S = 2.0
BUDGET_IDLE_RSS_MB = 50
BUDGET_1000_IDLE_MB = 20
BURST_CONNECTIONS = 5000


#: In docs/performance.md, what follows this line is written by other bench scripts and kept.
KEEP_MARK = "<!-- kept by bench/run.py: written by other bench scripts -->"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rest_available():
    return importlib.util.find_spec("cloudfoxy_proxy.backends.rest") is not None


def wait_readers(port, count, timeout=15.0):
    """READERS once it lists ``count`` readers (a REST backend reads its
    inventory after start-up)."""
    deadline = time.monotonic() + timeout
    names = []
    while time.monotonic() < deadline:
        names = loadgen.list_readers(HOST, port)
        if len(names) >= count:
            return names
        time.sleep(0.05)
    raise RuntimeError(f"only {len(names)} of {count} readers listed after {timeout}s")


#: Every load generator connects from 127.0.0.1: one peer address holding
#: thousands of connections, which --max-connections-per-peer would cut.
ONE_PEER = ("--max-connections-per-peer", "1000000")


def proxy(*args, env=None):
    return ProxyProcess(*ONE_PEER, *args, env=env).start()


#: Busy cores of other work above which the machine does not count as quiet.
QUIET_CORES = 0.25


def background(seconds=0.5):
    """Busy cores of the whole machine over ``seconds`` while we send nothing."""
    m0 = loadgen.machine_busy()
    time.sleep(seconds)
    m1 = loadgen.machine_busy()
    return None if m0 is None or m1 is None else (m1 - m0) / seconds


class Quiet:
    """Waits (within a total budget for the run) until other work on the
    machine has calmed down before a load, and remembers how busy it was."""

    def __init__(self, budget):
        self.budget = budget

    def settle(self):
        bg = background()
        while bg is not None and bg > QUIET_CORES and self.budget > 0:
            log(f"  the machine is busy with other work ({bg:.2f} cores); waiting "
                f"(up to {self.budget:.0f} s more in this run)")
            time.sleep(2.0)
            self.budget -= 2.5
            bg = background()
        return bg


QUIET = Quiet(0)


def load(p, **kw):
    kw.setdefault("pid", p.proc.pid)
    bg = QUIET.settle()
    r = loadgen.run(HOST, p.port, **kw)
    r["background_cores"] = bg
    log(f"  {r['clients']} clients K={r['k']}: {r['apdus_per_s']:.0f} APDUs/s, p50 "
        f"{r['latency_ms']['p50']} ms, p99 {r['latency_ms']['p99']} ms, "
        f"CPU {fmt(r.get('proxy_cpu_us_per_apdu'), 1)} us/APDU, errors {r['errors']}")
    for s in r["error_samples"]:
        log(f"    ! {s}")
    return r


def fmt(v, digits=0, unit=""):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}{unit}"


def bound(r, extra=0.0):
    """Which side was saturated in a closed-loop run (``extra``: CPU share
    of a helper process such as the fake CloudFoxy server)."""
    p, g = r.get("proxy_cpu_util") or 0, r.get("loadgen_cpu_util") or 0
    m = r.get("machine_cpu_util")
    cores = os.cpu_count() or 1
    rest = "" if m is None else f", rest of the machine {100 * max(0.0, m - p - g - extra):.0f}%"
    shares = f"proxy {100 * p:.0f}%, load generator {100 * g:.0f}%" + (
        f", fake server {100 * extra:.0f}%" if extra else "") + rest
    if p >= 0.9:
        return f"proxy CPU-bound ({shares} of a core)"
    if m is not None and m >= 0.9 * cores:
        return f"machine-bound: all {cores} cores busy ({shares})"
    if g >= 0.9:
        return f"load-generator-bound ({shares})"
    return f"no CPU saturated ({shares}): latency-bound"


# -- scenarios -----------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.a = args
        self.res = collections.OrderedDict()

    def lk(self, **kw):
        kw.setdefault("duration", self.a.duration)
        kw.setdefault("warmup", self.a.warmup)
        return kw

    def harness(self):
        """The load generator against the trivial responder: its own ceiling."""
        out = {}
        with trivial_responder() as t:
            for c in self.a.sweep:
                bg = QUIET.settle()
                r = loadgen.run(HOST, t.port, readers=["Trivial 00"], clients=c, pid=t.pid, **self.lk())
                r["background_cores"] = bg
                log(f"  trivial responder, {c} clients: {r['apdus_per_s']:.0f} APDUs/s, p99 "
                    f"{r['latency_ms']['p99']} ms, load generator {100 * r['loadgen_cpu_util']:.0f}%")
                out[c] = r
            bg = QUIET.settle()
            r4 = loadgen.run(HOST, t.port, readers=["Trivial 00"], clients=50, k=4, pid=t.pid, **self.lk())
            r4["background_cores"] = bg
        self.res["harness"] = {"sweep": out, "k4": r4}

    def ceiling(self, clients=50):
        h = self.res.get("harness")
        if not h:
            return None
        r = h["sweep"].get(clients) or h["sweep"].get(str(clients))
        return r["apdus_per_s"] if r else None

    def k1(self):
        p = proxy()
        try:
            self.res["k1"] = load(p, clients=50, k=1, **self.lk())
        finally:
            p.stop()

    def k4(self):
        p = proxy()
        try:
            self.res["k4"] = load(p, clients=50, k=4, **self.lk())
        finally:
            p.stop()

    def rest(self):
        if not rest_available():
            self.res["rest"] = {"skipped": "the REST backend (cloudfoxy_proxy.backends.rest) does not exist yet"}
            log("  REST backend not available: skipped")
            return
        with fake_cloudfoxy(cards=120) as f:
            args, env = rest_args(f.port)
            p = proxy(*args, env=env)
            try:
                names = wait_readers(p.port, 120)
                r = load(p, clients=50, k=1, readers=names[:120], watch={"fake": f.pid}, **self.lk())
                r["fake_cpu_util"] = r.get("watch_cpu_util", {}).get("fake")
                r["fake_stats"] = fake_stats(f.port)
                self.res["rest"] = r
            finally:
                p.stop()

    def cards120(self):
        p = proxy("--backend", "emulated:?cards=120&latency_ms=5")
        try:
            r = load(p, clients=240, k=1, reader_count=120, **self.lk())
            self.res["cards120"] = r
        finally:
            p.stop()

    def onecard(self):
        out = {}
        for latency in (0, 1):
            p = proxy("--backend", f"emulated:?cards=4&latency_ms={latency}")
            try:
                out[latency] = load(p, clients=10, k=1, readers=["Emulated 00"], **self.lk())
            finally:
                p.stop()
        self.res["onecard"] = out

    def startup(self):
        out = {"emulated": self._startup([], "Emulated 00")}
        log(f"  emulated: first correct answer after {out['emulated']['first_answer_s']:.3f} s")
        if rest_available():
            with fake_cloudfoxy(cards=120) as f:
                args, env = rest_args(f.port)
                out["rest"] = self._startup(args, None, env=env, cards=120)
            log(f"  REST 120 cards: first correct answer after {out['rest']['first_answer_s']:.3f} s, "
                f"all 120 listed after {fmt(out['rest'].get('all_listed_s'), 3)} s")
        else:
            out["rest"] = {"skipped": "the REST backend does not exist yet"}
        self.res["startup"] = out

    def _startup(self, args, reader, env=None, cards=None, timeout=15.0):
        """Seconds from launching twistd to the first correct answer
        (polled every 5 ms on a port chosen beforehand)."""
        port = free_port()
        p = ProxyProcess(*ONE_PEER, *args, env=env, port=f"tcp:{port}:interface={HOST}")
        failed = []

        def start():
            try:
                p.start()
            except Exception as e:
                failed.append(e)

        t0 = time.monotonic()
        th = threading.Thread(target=start, daemon=True)
        th.start()
        first = all_listed = None
        try:
            client = None
            deadline = t0 + timeout
            while time.monotonic() < deadline and first is None and not failed:
                try:
                    if client is None:
                        client = LineClient(HOST, port, timeout=2)
                    name = reader
                    if name is None:
                        got = client.results(">*|\n>1:READERS|\n\n")[0]
                        if not got or got.startswith("C0"):
                            raise RuntimeError("no readers yet")
                        name = base64.b64decode(got.split("|")[0]).decode()
                    if client.results(f">{name}|\n>1:APDU:00A4000C023F00|\n\n") == ["9000"]:
                        first = time.monotonic() - t0
                        break
                except (OSError, ConnectionError, RuntimeError):
                    if client is not None:
                        client.close()
                        client = None
                time.sleep(0.005)
            if client is not None:
                client.close()
            if cards:
                while time.monotonic() < deadline:
                    if len(loadgen.list_readers(HOST, port)) >= cards:
                        all_listed = time.monotonic() - t0
                        break
                    time.sleep(0.01)
            th.join(timeout)
            time.sleep(0.5)
            rss = loadgen.proc_status(p.proc.pid, "VmRSS") if p.proc else None
        finally:
            th.join(timeout)
            p.stop()
        if failed:
            raise failed[0]
        if first is None:
            raise RuntimeError(f"no correct answer within {timeout}s: {p.log()[-2000:]}")
        return {"first_answer_s": first, "all_listed_s": all_listed, "rss_bytes": rss}

    def memory(self):
        p = proxy()
        out = {}
        try:
            with LineClient(HOST, p.port) as c:
                assert c.results(">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n") == ["9000"]
            time.sleep(0.5)
            pid = p.proc.pid
            out["idle_rss"] = loadgen.proc_status(pid, "VmRSS")
            b = loadgen.open_connections(HOST, p.port, 1000, "Emulated 00")
            time.sleep(0.5)
            out["rss_1000"] = loadgen.proc_status(pid, "VmRSS")
            out["idle_1000"] = b.result
            b.close()
            log(f"  idle RSS {out['idle_rss'] / MB:.1f} MB; with 1000 idle connections "
                f"{out['rss_1000'] / MB:.1f} MB ({b.result['errors']} errors)")
            time.sleep(1.0)
            out["burst"] = self._burst(p)
            time.sleep(1.0)
            with LineClient(HOST, p.port) as c:
                out["after_ok"] = c.results(">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n") == ["9000"]
        finally:
            p.stop()
        # The same burst against a listener with a deeper accept queue
        # (Twisted's tcp: endpoints listen with backlog 50 unless told).
        p = ProxyProcess(*ONE_PEER, port=f"tcp:0:interface={HOST}:backlog=1024").start()
        try:
            out["burst_backlog"] = self._burst(p)
        finally:
            p.stop()
        self.res["memory"] = out

    def _burst(self, p):
        bg = QUIET.settle()
        pid = p.proc.pid
        cpu0 = loadgen.proc_cpu(pid)
        b = loadgen.open_connections(HOST, p.port, BURST_CONNECTIONS, "Emulated 00")
        r = dict(b.result)
        r["background_cores"] = bg
        r["proxy_cpu_s"] = loadgen.proc_cpu(pid) - cpu0
        r["rss"] = loadgen.proc_status(pid, "VmRSS")
        r["peak_rss"] = loadgen.proc_status(pid, "VmHWM")
        b.close()
        log(f"  {BURST_CONNECTIONS} connections ({p.requested_port or 'default listener'}): {r['ok']} "
            f"correct answers, {r['errors']} errors, connect {r['connect_s']} s, serve "
            f"{r['serve_s']} s, RSS {r['rss'] / MB:.1f} MB")
        for s in r["error_samples"]:
            log(f"    ! {s}")
        return r

    def sweep(self):
        out = {}
        p = proxy()
        try:
            for c in self.a.sweep:
                out[c] = load(p, clients=c, k=1, **self.lk())
        finally:
            p.stop()
        self.res["sweep"] = out

    def profile(self):
        spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        if not os.path.exists(spy):
            self.res["profile"] = {"skipped": "py-spy is not installed (pip install py-spy)"}
            log("  py-spy not installed: profile skipped")
            return
        from bench import profiling as prof

        out = {}
        for backend in self.a.profiles:
            if backend == "rest" and not rest_available():
                continue
            QUIET.settle()
            out[backend] = prof.profile(spy, seconds=self.a.profile_seconds,
                                        outdir=os.path.join(BENCH, "results"), log=log, backend=backend)
        self.res["profile"] = out

    def metrics(self):
        from bench import metrics_overhead as mo

        self.res["metrics"] = mo.measure(rounds=3, duration=self.lk()["duration"], log=log)


ORDER = ["harness", "k1", "k4", "rest", "cards120", "onecard", "startup", "memory", "sweep", "metrics",
         "profile"]


# -- the report ------------------------------------------------------------------------

def contaminated(r):
    bg = (r or {}).get("background_cores")
    return bg is not None and bg > QUIET_CORES


def verdict(ok, r=None):
    """pass / FAIL; a miss measured while other work kept the machine busy
    is inconclusive rather than a failure of the proxy."""
    if ok:
        return "**pass**"
    if contaminated(r):
        return (f"**inconclusive** (other work kept {r['background_cores']:.1f} cores busy "
                "before the load)")
    return "**FAIL**"


def capacity(r):
    """APDUs/s one core of proxy CPU would serve at the measured CPU per APDU."""
    cpu = r.get("proxy_cpu_us_per_apdu")
    return f"{1e6 / cpu:,.0f} APDUs/s per core of proxy CPU" if cpu else "n/a"


def lat(r, key):
    return fmt(r["latency_ms"][key], 2)


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import twisted

    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "?"
    with open("/proc/loadavg") as f:
        loadavg = " ".join(f.read().split()[:3])
    return (f"{os.cpu_count()} CPUs ({model or platform.machine()}), Linux {platform.release()}, "
            f"Python {platform.python_version()}, Twisted {twisted.__version__}, commit {commit}, "
            f"load average before the run {loadavg}")


def report(b, elapsed, cmdline):
    R = b.res
    lines = []
    w = lines.append
    w("# Performance")
    w("")
    when = R.get("_when") or datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    w(f"Measured {when} by `{cmdline}` in {elapsed:.0f} s on {R.get('_machine') or machine()}.")
    w("")
    w("Every figure comes from a real `twistd -n foxyproxy` process on loopback driven by "
      "`bench/loadgen.py`, a closed-loop client (one process, one thread, many sockets on epoll) "
      "that checks every answer byte for byte (ids, count, result). The proxy, the load generator "
      "(and the fake CloudFoxy server) share the machine's 2 cores, so each figure is a floor for "
      "the proxy alone. *CPU/APDU* is the proxy process's utime+stime over the measured window "
      "divided by the APDUs answered in it; RSS is read from /proc/PID/status. Each load runs "
      f"{b.a.warmup:g} s unmeasured, then {b.a.duration:g} s measured.")
    w("")
    busy = busy_loads(R)
    if busy:
        w(f"**Other work was running on the machine** before {len(busy)} of the loads (more than "
          f"{QUIET_CORES:g} of a core busy while the bench sent nothing: {', '.join(busy[:8])}"
          f"{'…' if len(busy) > 8 else ''}). Their throughput and latency figures are floors; "
          "CPU per APDU is the least affected figure.")
        w("")
    w("## Budget")
    w("")
    w("| budget | measured | verdict |")
    w("|---|---|---|")
    ceil50 = b.ceiling(50)
    if "k1" in R:
        r = R["k1"]
        cpu = r.get("proxy_cpu_us_per_apdu")
        target = BUDGET_APDUS if ceil50 is None else min(BUDGET_APDUS, ceil50)
        note = "" if ceil50 is None or ceil50 >= BUDGET_APDUS else \
            f" (the load generator's ceiling, {ceil50:,.0f}/s, is lower than 10,000: it is the target)"
        w(f"| emulated, 50 persistent clients, K=1: ≤ {BUDGET_CPU_US:g} µs proxy CPU per APDU | "
          f"{fmt(cpu, 1)} µs | {verdict(cpu is not None and cpu <= BUDGET_CPU_US)} |")
        w(f"| same: ≥ {BUDGET_APDUS:,} APDUs/s{note} | {fmt(r['apdus_per_s'])} APDUs/s, p50 {lat(r, 'p50')} ms, "
          f"p99 {lat(r, 'p99')} ms, {r['errors']} errors; {bound(r)}; {capacity(r)}; load generator "
          f"ceiling at 50 clients {fmt(ceil50)}/s | "
          f"{verdict(r['apdus_per_s'] >= target and not r['errors'], r)} |".replace("n/a/s", "not measured"))
    if "k4" in R:
        r = R["k4"]
        cpu = r.get("proxy_cpu_us_per_apdu")
        cpu1 = R.get("k1", {}).get("proxy_cpu_us_per_apdu")
        every = not r["errors"] and r["checked"] == r["sent"]
        w(f"| K=4: all four answers every time | {r['checked']:,} requests ({4 * r['checked']:,} APDUs) "
          f"checked, {r['errors']} errors | {verdict(every)} |")
        w(f"| K=4: CPU per APDU no worse than K=1 | {fmt(cpu, 1)} µs vs {fmt(cpu1, 1)} µs; "
          f"{fmt(r['apdus_per_s'])} APDUs/s ({fmt(r['requests_per_s'])} requests/s), p99 {lat(r, 'p99')} ms | "
          f"{verdict(cpu is not None and cpu1 is not None and cpu <= cpu1)} |")
    if "rest" in R:
        r = R["rest"]
        if "skipped" in r:
            w(f"| CloudFoxy REST backend, fake upstream, 120 cards, 50 clients: > {BUDGET_REST_APDUS:,} "
              f"APDUs/s, p99 < {BUDGET_REST_P99_MS:g} ms | not available: {r['skipped']} | — |")
        else:
            fs = r.get("fake_stats", {})
            w(f"| CloudFoxy REST backend, fake upstream, 120 cards, 50 clients: > {BUDGET_REST_APDUS:,} "
              f"APDUs/s | {fmt(r['apdus_per_s'])} APDUs/s, {r['errors']} errors; "
              f"{bound(r, r.get('fake_cpu_util') or 0)}; fake server CPU {fmt(1e6 * (r['fake_cpu_util'] or 0) / max(1.0, r['requests_per_s']), 1)} µs/request | "
              f"{verdict(r['apdus_per_s'] > BUDGET_REST_APDUS and not r['errors'], r)} |")
            p99 = r["latency_ms"]["p99"]
            w(f"| same: p99 < {BUDGET_REST_P99_MS:g} ms | p50 {lat(r, 'p50')} ms, p99 {lat(r, 'p99')} ms, "
              f"max {lat(r, 'max')} ms | {verdict(p99 is not None and p99 < BUDGET_REST_P99_MS, r)} |")
            w(f"| same: proxy CPU per APDU (stated) | {fmt(r.get('proxy_cpu_us_per_apdu'), 1)} µs "
              f"({capacity(r)}); most commands one card ever had at once: "
              f"{fs.get('max_inflight', 'n/a')} | — |")
    if "cards120" in R:
        r = R["cards120"]
        cpu = r.get("proxy_cpu_us_per_apdu")
        share = r["apdus_per_s"] / CARDS_120_CEILING
        cpu_bound = (r.get("proxy_cpu_util") or 0) >= 0.9
        if share >= 0.9:
            which = f"card-bound: {100 * share:.0f}% of the 24,000/s ceiling"
            ok = True
        elif cpu_bound:
            which = (f"CPU-bound first at {100 * share:.0f}% of the card ceiling; CPU/APDU "
                     f"{fmt(cpu, 1)} µs against the {BUDGET_CPU_US:g} µs budget")
            ok = cpu is not None and cpu <= BUDGET_CPU_US
        else:
            which = f"neither bound reached: {100 * share:.0f}% of the card ceiling, {bound(r)}"
            ok = False
        which += f"; {capacity(r)} (90% of the card ceiling is {0.9 * CARDS_120_CEILING:,.0f})"
        w(f"| 120 emulated cards, 5 ms each, 240 clients: ≥ 90% of {CARDS_120_CEILING:,.0f} APDUs/s, "
          f"or CPU-bound within {BUDGET_CPU_US:g} µs/APDU | {fmt(r['apdus_per_s'])} APDUs/s, CPU "
          f"{fmt(cpu, 1)} µs/APDU ({100 * (r.get('proxy_cpu_util') or 0):.0f}% of a core), p50 "
          f"{lat(r, 'p50')} ms, p99 {lat(r, 'p99')} ms, {r['errors']} errors; {which} | "
          f"{verdict(ok and not r['errors'], r)} |")
    if "onecard" in R:
        for latency, r in R["onecard"].items():
            p50, p99, mx = (r["latency_ms"][k] for k in ("p50", "p99", "max"))
            even = r["per_client_max"] and r["per_client_min"] >= 0.9 * r["per_client_max"]
            stall = mx is None or mx > max(10 * p50, 50.0)
            if p50 is None:
                w(f"| 10 clients, one card ({latency} ms) | no answer measured, {r['errors']} errors | "
                  f"{verdict(False, r)} |")
                continue
            figures = (f"{fmt(r['apdus_per_s'])} APDUs/s, p50 {p50} ms, p99 {p99} ms (p99/p50 "
                       f"{p99 / p50:.1f}), max {mx} ms, {r['errors']} errors; answers per client "
                       f"{r['per_client_min']:,}–{r['per_client_max']:,}")
            if latency:
                fair = p99 <= 2 * p50
                w(f"| 10 clients hammering one card ({latency} ms per APDU, so requests queue): no errors, "
                  f"fair FIFO (p99 ≤ 2× p50), no stall | {figures} | "
                  f"{verdict(fair and even and not r['errors'] and not stall, r)} |")
            else:
                w(f"| (extra) 10 clients, one card, no card latency: no errors, even shares, no stall "
                  f"(each request runs synchronously, so there is no queue and p99/p50 only shows "
                  f"reactor-turn jitter) | {figures} | {verdict(even and not r['errors'] and not stall, r)} |")
    if "startup" in R:
        s = R["startup"]["emulated"]
        w(f"| start-up to first correct answer, emulated: < {BUDGET_START_EMU_S:g} s | "
          f"{s['first_answer_s']:.3f} s | {verdict(s['first_answer_s'] < BUDGET_START_EMU_S)} |")
        s = R["startup"].get("rest", {})
        if "skipped" in s:
            w(f"| start-up to first correct answer, 120 REST cards: < {BUDGET_START_REST_S:g} s | "
              f"not available: {s['skipped']} | — |")
        elif s:
            w(f"| start-up to first correct answer, 120 REST cards: < {BUDGET_START_REST_S:g} s | "
              f"{s['first_answer_s']:.3f} s (all 120 listed after {fmt(s.get('all_listed_s'), 3)} s) | "
              f"{verdict(s['first_answer_s'] < BUDGET_START_REST_S)} |")
    if "memory" in R:
        m = R["memory"]
        idle = m["idle_rss"] / MB
        w(f"| RSS idle < {BUDGET_IDLE_RSS_MB} MB (10^6 bytes) | {idle:.1f} MB = "
          f"{m['idle_rss'] / 2 ** 20:.1f} MiB (VmRSS after start-up and one request) | "
          f"{verdict(idle * MB < BUDGET_IDLE_RSS_MB * 1e6)} |")
        add = (m["rss_1000"] - m["idle_rss"]) / MB
        w(f"| 1,000 idle connections add < {BUDGET_1000_IDLE_MB} MB | +{add:.1f} MB "
          f"({m['idle_1000']['ok']} of 1,000 answered correctly first) | "
          f"{verdict(add * MB < BUDGET_1000_IDLE_MB * 1e6 and m['idle_1000']['errors'] == 0)} |")
        bu, bb = m["burst"], m.get("burst_backlog")
        ok = bu["errors"] == 0 and bu["ok"] == BURST_CONNECTIONS and m.get("after_ok")
        w(f"| {BURST_CONNECTIONS:,} concurrent connections served without errors | {bu['ok']:,} correct "
          f"answers, {bu['errors']} errors; all {BURST_CONNECTIONS:,} connected in {bu['connect_s']} s "
          f"(at most 256 connects pending), all answered {bu['serve_s']} s later; RSS with them "
          f"{bu['rss'] / MB:.1f} MB; proxy answers normally afterwards: {'yes' if m.get('after_ok') else 'NO'}"
          + (f"; {bu['unanswered']} connections got no answer within the 60 s bound: Twisted's "
             "default listen backlog (50) overflows under this connect storm and the kernel drops "
             "handshakes (see the backlog=1024 line)" if bu.get("unanswered") else "") + f" | {verdict(ok, bu)} |")
        if bb:
            w(f"| (extra) the same with `-p tcp:PORT:backlog=1024` | {bb['ok']:,} correct answers, "
              f"{bb['errors']} errors; connected in {bb['connect_s']} s, answered {bb['serve_s']} s later | "
              f"{verdict(bb['errors'] == 0 and bb['ok'] == BURST_CONNECTIONS)} |")
    if ceil50 is not None:
        h = R["harness"]
        floor = h["sweep"][50].get("proxy_cpu_us_per_apdu")
        w(f"| load generator ceiling (trivial responder, 50 clients) | {fmt(ceil50)} requests/s K=1, "
          f"{fmt(h['k4']['apdus_per_s'])} APDUs/s K=4; the trivial responder itself spent "
          f"{fmt(floor, 1)} µs of CPU per request (epoll, recv, framing, send in plain Python: the "
          f"floor for any Python server on this machine) | — |")
    w("")
    if "sweep" in R:
        w("## Clients sweep (emulated, 4 cards, no card latency, K=1, persistent)")
        w("")
        w("![throughput and latency against clients](performance.png)")
        w("")
        w("| clients | APDUs/s | p50 ms | p90 ms | p99 ms | max ms | proxy CPU µs/APDU | proxy CPU | "
          "load generator CPU | machine busy | harness ceiling APDUs/s | errors |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|")
        hs = R.get("harness", {}).get("sweep", {})
        for c, r in R["sweep"].items():
            h = hs.get(c)
            w(f"| {c} | {fmt(r['apdus_per_s'])} | {lat(r, 'p50')} | {lat(r, 'p90')} | {lat(r, 'p99')} | "
              f"{lat(r, 'max')} | {fmt(r.get('proxy_cpu_us_per_apdu'), 1)} | "
              f"{100 * (r.get('proxy_cpu_util') or 0):.0f}% | {100 * (r.get('loadgen_cpu_util') or 0):.0f}% | "
              f"{fmt(100 * r['machine_cpu_util'] if r.get('machine_cpu_util') is not None else None, 0, '%')} | "
              f"{fmt(h['apdus_per_s']) if h else 'n/a'} | {r['errors']} |")
        w("")
        w("CPU columns are shares of one core; *machine busy* counts both cores (200% = all busy), "
          "including the kernel's loopback TCP work and anything else running. With one client the "
          "figure is round-trip-bound: each request waits for the previous answer and the proxy "
          "wakes up for every request, so its CPU per APDU is higher. Where the proxy column is near "
          "100% the proxy is the limit; where the machine is near 200% the two cores are shared out "
          "between proxy, load generator and kernel, and the proxy alone on a core would do more.")
        w("")
    if "metrics" in R:
        from bench import metrics_overhead as mo

        lines.extend(mo.report(R["metrics"]))
    if "profile" in R:
        if "skipped" in R["profile"]:
            w(f"## Where the proxy's CPU goes\n\nNot measured: {R['profile']['skipped']}.\n")
        else:
            w(PROFILE_NOTE)
            w("")
        for p in R["profile"].values() if "skipped" not in R["profile"] else ():
            lines.extend(profile_section(p))
    w("## How to run")
    w("")
    w("```")
    w(".venv/bin/python bench/run.py            # full run (~5 min), rewrites this file and performance.png")
    w(".venv/bin/python bench/run.py --quick    # ~1-2 min smoke run, writes bench/results/quick.md")
    w(".venv/bin/python bench/run.py --only k1,sweep   # a subset, writes bench/results/partial.md")
    w(".venv/bin/python bench/run.py --profile-only    # py-spy profile of the 50-client K=1 load")
    w("tox -e bench                             # the same as the full run, in its own env")
    w(".venv/bin/python bench/loadgen.py --port 4001 -c 50 -k 1 -d 5 --pid PID   # ad hoc load")
    w(".venv/bin/python bench/line_builds.py before=DIR/src now=. --floor   # builds in turns, and the floor")
    w(".venv/bin/python bench/rest_http.py before=DIR/src now=src           # REST backend, builds in turns")
    w(".venv/bin/python bench/api_load.py --rounds 3 [--build L=DIR/src]    # HTTP/WebSocket API")
    w("```")
    w("")
    w(f"Scenarios: {', '.join(ORDER)}. Raw numbers of the last run: `bench/results/*.json`. "
      "`bench/fake_cloudfoxy.py` is a fast fake CloudFoxy REST server (also usable by tests), "
      "`bench/trivial_responder.py` measures the load generator's own ceiling.")
    w("")
    return "\n".join(lines)


def busy_loads(R):
    """Names of the loads that started while other work kept the machine busy."""
    found = []

    def visit(name, r):
        if isinstance(r, dict):
            bg = r.get("background_cores")
            if bg is not None and bg > QUIET_CORES:
                found.append(f"{name} ({bg:.2f} cores)")
            for k, v in r.items():
                if isinstance(v, dict) and k not in ("latency_ms", "error_kinds", "watch_cpu_util"):
                    visit(f"{name}/{k}", v)

    for name, r in R.items():
        visit(name, r)
    return found


PROFILE_NOTE = (
    "How to read these profiles: py-spy samples the proxy's thread whenever it is not idle in "
    "epoll, also while it is runnable but waiting for a core. A send() on loopback runs the "
    "receiver's TCP path and wakes the peer process, which may take the core at once on a "
    "2-core machine, so time attributed to `untilConcludes` (the send() call in "
    "`writeSomeData`) overstates pure CPU time. The CPU-per-APDU figures above come from "
    "utime+stime and are not affected. Compare with the trivial responder's CPU per request "
    "in the budget table: that is what the system calls plus minimal framing cost in Python "
    "here; the rest of the proxy's figure is Twisted's reactor and transport and the proxy's "
    "own code.")


def profile_section(p):
    out = [f"## Where the proxy's CPU goes: {p['title']}", ""]
    out.append(f"{p['samples']:,} samples of the busy proxy at {p['rate']} Hz over {p['seconds']:g} s "
               f"while it served {fmt(p['load']['apdus_per_s'])} APDUs/s at "
               f"{fmt(p['load'].get('proxy_cpu_us_per_apdu'), 1)} µs/APDU (py-spy `--nonblocking`; "
               "idle time in epoll is not sampled, so percentages are shares of the proxy's busy CPU). "
               f"Flame graph (written by the run; bench/results/ is not committed): `{os.path.relpath(p['svg'], REPO) if p.get('svg') else 'n/a'}`.")
    out.append("")
    out.append("By area (self time of the innermost Python frame, by file):")
    out.append("")
    out.append("| area | share |")
    out.append("|---|---|")
    for name, share in p["areas"]:
        out.append(f"| {name} | {100 * share:.1f}% |")
    out.append("")
    out.append("Top functions by self time, and by inclusive time (the function and what it calls):")
    out.append("")
    out.append("| self % | function | | incl. % | function |")
    out.append("|---|---|---|---|---|")
    for (s_name, s_share), (i_name, i_share) in zip(p["self"], p["inclusive"]):
        out.append(f"| {100 * s_share:.1f} | `{s_name}` | | {100 * i_share:.1f} | `{i_name}` |")
    out.append("")
    return out


def chart(b, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = b.res.get("sweep")
    if not sweep:
        return False
    hs = b.res.get("harness", {}).get("sweep", {})
    xs = list(sweep)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.4))
    ax1.plot(xs, [sweep[c]["apdus_per_s"] for c in xs], "o-", label="proxy (emulated, K=1)")
    if hs:
        hx = [c for c in xs if c in hs]
        ax1.plot(hx, [hs[c]["apdus_per_s"] for c in hx], "s--", color="grey",
                 label="load generator ceiling (trivial responder)")
    ax1.axhline(BUDGET_APDUS, color="red", lw=0.8, ls=":", label="budget 10,000/s")
    ax1.set_xscale("log")
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("APDUs/s")
    ax1.set_ylim(bottom=0)
    ax1.set_title("Throughput")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(xs, [sweep[c]["latency_ms"]["p50"] for c in xs], "o-", label="proxy p50")
    ax2.plot(xs, [sweep[c]["latency_ms"]["p99"] for c in xs], "^-", label="proxy p99")
    if hs:
        ax2.plot(hx, [hs[c]["latency_ms"]["p99"] for c in hx], "s--", color="grey",
                 label="trivial responder p99")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("latency, ms")
    ax2.set_title("Latency (request to full answer)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, which="both")
    ax3.plot(xs, [sweep[c].get("proxy_cpu_us_per_apdu") for c in xs], "o-", color="tab:green",
             label="proxy CPU per APDU")
    ax3.axhline(BUDGET_CPU_US, color="red", lw=0.8, ls=":", label=f"budget {BUDGET_CPU_US:g} µs")
    ax3.set_xscale("log")
    ax3.set_ylim(bottom=0)
    ax3.set_xlabel("concurrent clients")
    ax3.set_ylabel("µs of proxy CPU (user+system) per APDU")
    ax3.set_title("Proxy CPU per APDU")
    ax3.legend(fontsize=8)
    ax3.grid(alpha=0.3)
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(xs)
        ax.set_xticklabels([str(c) for c in xs])
    fig.suptitle("cloudfoxy-proxy, closed-loop load on loopback (2 cores shared with the load generator)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _int_keys(pairs):
    """JSON object hook: the clients counts and latencies used as keys come back as ints."""
    return collections.OrderedDict((int(k) if k.isdigit() else k, v) for k, v in pairs)


def main(argv=None):
    p = argparse.ArgumentParser(description="Run the benchmark suite and write docs/performance.md.")
    p.add_argument("--quick", action="store_true", help="~1-2 minute smoke run (short loads, no profile)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(ORDER)}")
    p.add_argument("--skip", default="", help="comma-separated scenarios to leave out")
    p.add_argument("--profile-only", action="store_true", help="only the py-spy profile")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per load (default 5)")
    p.add_argument("--warmup", type=float, default=None, help="unmeasured seconds per load (default 1)")
    p.add_argument("--profile-seconds", type=float, default=6.0, help="per py-spy recording")
    p.add_argument("--profiles", default="emulated,latency,rest",
                   help="which loads to profile (emulated, latency, rest)")
    p.add_argument("--wait-quiet", type=float, default=None,
                   help="seconds in all this run may wait for other work on the machine to calm "
                        "down before loads (default 150; 20 with --quick)")
    p.add_argument("--report-from", default=None, metavar="JSON",
                   help="only rewrite the report (and chart) from a results file of an earlier run")
    p.add_argument("--out", default=None, help="markdown report (default docs/performance.md for a full run)")
    a = p.parse_args(argv)
    a.duration = a.duration or (1.5 if a.quick else 5.0)
    a.warmup = a.warmup or (0.5 if a.quick else 1.0)
    a.sweep = [1, 10, 50, 100, 200]
    a.profiles = [x.strip() for x in a.profiles.split(",") if x.strip()]
    QUIET.budget = a.wait_quiet if a.wait_quiet is not None else (20.0 if a.quick else 150.0)
    names = list(ORDER)
    if a.quick:
        names.remove("profile")
        a.profile_seconds = min(a.profile_seconds, 3.0)
    if a.profile_only:
        names = ["profile"]
    if a.only:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
    skip = {n.strip() for n in a.skip.split(",") if n.strip()}
    unknown = [n for n in names + list(skip) if n not in ORDER]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; known: {', '.join(ORDER)}")
    names = [n for n in ORDER if n in names and n not in skip]
    full = names == ORDER and not a.quick
    outdir = os.path.join(BENCH, "results")
    os.makedirs(outdir, exist_ok=True)
    tag = "quick" if a.quick else ("full" if full else "partial")
    md = a.out or (os.path.join(REPO, "docs", "performance.md") if full else os.path.join(outdir, f"{tag}.md"))
    png = os.path.splitext(md)[0] + ".png"
    b = Bench(a)
    b.res["_machine"] = machine()  # before the run: its load average
    b.res["_when"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.monotonic()
    failed = []
    if a.report_from:
        with open(a.report_from) as f:
            b.res = json.load(f, object_pairs_hook=_int_keys)
        names = []
        full = "harness" in b.res and "sweep" in b.res
        md = a.out or (os.path.join(REPO, "docs", "performance.md") if full else
                       os.path.join(outdir, "report.md"))
        png = os.path.splitext(md)[0] + ".png"
    for name in names:
        log(f"{name} ...")
        try:
            getattr(b, name)()
        except Exception as e:  # one broken scenario must not lose the others
            import traceback

            traceback.print_exc()
            failed.append(name)
            b.res[name + "_error"] = repr(e)
    elapsed = time.monotonic() - t0
    if a.report_from:
        elapsed = b.res.get("_elapsed", elapsed)
    b.res["_elapsed"] = elapsed
    cmd = b.res.get("_cmd") if a.report_from and b.res.get("_cmd") else None
    cmd = cmd or "python bench/run.py" + ("" if argv is None and len(sys.argv) < 2 else " " + " ".join(argv or sys.argv[1:]))
    b.res["_cmd"] = cmd
    if not a.report_from:
        with open(os.path.join(outdir, f"{tag}.json"), "w") as f:
            json.dump(b.res, f, indent=1, default=str)
    text = report(b, elapsed, cmd)
    os.makedirs(os.path.dirname(md), exist_ok=True)
    if chart(b, png):
        text = text.replace("](performance.png)", f"]({os.path.basename(png)})")
    if os.path.exists(md):  # sections other scripts keep here (bench/rest_http.py --write)
        with open(md) as f:
            old = f.read()
        if KEEP_MARK in old:
            text = text.rstrip("\n") + "\n\n" + old[old.index(KEEP_MARK):]
    with open(md, "w") as f:
        f.write(text)
    log(f"wrote {md} in {elapsed:.0f} s" + (f"; scenarios that broke: {failed}" if failed else ""))
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
