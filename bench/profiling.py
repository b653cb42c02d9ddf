#!/usr/bin/env python3
"""Profile the proxy under the 50-client K=1 emulated load with py-spy.

    .venv/bin/python bench/profiling.py [--seconds 8]     # or: bench/run.py --profile-only

Starts ``twistd -n foxyproxy`` (tests/support.py ProxyProcess), drives it
with bench/loadgen.py, and samples it twice with ``py-spy record
--nonblocking`` (no ptrace stops): once as collapsed stacks
(bench/results/profile.txt, summarised here) and once as a flame graph
(bench/results/profile.svg).  Prints the top costs as shares of the
proxy's busy CPU: py-spy does not sample a thread idle in epoll.
"""

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

from support import HOST, ProxyProcess  # noqa: E402

from bench import loadgen  # noqa: E402
from bench.helpers import fake_cloudfoxy, rest_args  # noqa: E402

#: (substring of a frame's file, area) — first match wins.
AREAS = [
    ("cloudfoxy_proxy/frontends/line.py", "frontends/line.py: framing, flow control, response writing"),
    ("cloudfoxy_proxy/parser.py", "parser.py: request parsing"),
    ("cloudfoxy_proxy/dispatch.py", "dispatch.py: request execution"),
    ("cloudfoxy_proxy/registry.py", "registry.py: reader resolution, card queue"),
    ("cloudfoxy_proxy/backends/", "backends/ (the backend in use)"),
    ("cloudfoxy_proxy/cards/", "emulated card model (ISO 7816)"),
    ("cloudfoxy_proxy/logs.py", "logging"),
    ("twisted/internet/defer.py", "Twisted Deferreds"),
    ("twisted/logger/", "logging"),
    ("twisted/python/log.py", "Twisted reactor loop (callWithLogger/context)"),
    ("twisted/python/context.py", "Twisted reactor loop (callWithLogger/context)"),
    ("untilConcludes (twisted/python/util.py", "send() syscall (untilConcludes in writeSomeData)"),
    ("twisted/internet/tcp.py", "Twisted TCP transport (incl. send/recv syscalls)"),
    ("twisted/internet/abstract.py", "Twisted TCP transport (incl. send/recv syscalls)"),
    ("twisted/internet/_newtls.py", "Twisted TCP transport (incl. send/recv syscalls)"),
    ("twisted/internet/", "Twisted reactor loop (epoll, dispatch)"),
    ("twisted/web/", "twisted.web (HTTP client)"),
    ("twisted/protocols/", "twisted.protocols (HTTP parsing)"),
    ("treq/", "treq"),
    ("urllib/", "urllib (URL building)"),
    ("hyperlink/", "hyperlink (URL objects)"),
    ("attr", "attrs"),
    ("zope/interface", "zope.interface"),
]


def area(frame):
    for needle, name in AREAS:
        if needle in frame:
            return name
    return "other"


def parse_collapsed(path):
    """[(frames, count)] from py-spy's raw (collapsed) output."""
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            frames, _, count = line.rpartition(" ")
            try:
                n = int(count)
            except ValueError:
                continue
            stacks.append((frames.split(";"), n))
    return stacks


def summarise(stacks, top=15):
    total = sum(n for _, n in stacks) or 1
    self_t = collections.Counter()
    incl = collections.Counter()
    areas = collections.Counter()
    for frames, n in stacks:
        frames = [f or "(unnamed frame)" for f in frames]
        leaf = frames[-1]
        self_t[leaf] += n
        areas[area(leaf)] += n
        for fr in set(frames):
            incl[fr] += n
    skip = ("<module> (twistd", "run (twisted/scripts", "run (twisted/application", "runApp",
            "ApplicationRunner", "UnixApplicationRunner", "runReactorWithLogging", "ReactorBase.run ",
            "ReactorBase.mainLoop")
    inclusive = [(f, n / total) for f, n in incl.most_common() if not f.startswith(skip)]
    return {
        "samples": total,
        "self": [(f, n / total) for f, n in self_t.most_common(top)],
        "inclusive": inclusive[:top],
        "areas": [(a, n / total) for a, n in areas.most_common()],
    }


#: What each profile runs: proxy arguments, clients, readers to use.
#: The load generator's clients all come from 127.0.0.1 (240 of them for
#: ``latency``): without this, --max-connections-per-peer closes most.
ONE_PEER = ("--max-connections-per-peer", "1000000")

SETUPS = {
    "emulated": ([], 50, None),
    "latency": (["--backend", "emulated:?cards=120&latency_ms=5"], 240, 120),
    "rest": (None, 50, 120),  # the REST backend on the fake CloudFoxy server
}
TITLES = {
    "emulated": "emulated, 4 cards, no card latency, 50 clients, K=1",
    "latency": "120 emulated cards with 5 ms latency, 240 clients, K=1 (the Deferred path)",
    "rest": "CloudFoxy REST backend against the fake server, 120 cards, 50 clients, K=1",
}


def profile(spy, seconds=8.0, outdir=None, log=print, clients=None, rate=500, backend="emulated"):
    """Run the load of ``SETUPS[backend]`` (``emulated``: 4 emulated cards;
    ``latency``: 120 cards with 5 ms latency; ``rest``: the REST backend on
    the fake CloudFoxy server with 120 cards), sample it, return the summary
    dict (also written as JSON)."""
    args, default_clients, nreaders = SETUPS[backend]
    clients = clients or default_clients
    outdir = outdir or os.path.join(BENCH, "results")
    os.makedirs(outdir, exist_ok=True)
    name = "profile" if backend == "emulated" else f"profile-{backend}"
    raw = os.path.join(outdir, f"{name}.txt")
    svg = os.path.join(outdir, f"{name}.svg")
    fake = None
    readers = None
    if backend == "rest":
        fake = fake_cloudfoxy(cards=120)
        args, env = rest_args(fake.port)
        p = ProxyProcess(*ONE_PEER, *args, env=env)
    else:
        p = ProxyProcess(*ONE_PEER, *args)
    errors = []
    try:
        p.start()
        pid = p.proc.pid
        if nreaders:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                readers = loadgen.list_readers(HOST, p.port)[:nreaders]
                if len(readers) >= nreaders:
                    break
                time.sleep(0.05)

        def sample():
            time.sleep(1.0)  # after the warm-up
            for fmt_, out in (("raw", raw), ("flamegraph", svg)):
                cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate",
                       str(rate), "--nonblocking", "--function", "--format", fmt_, "-o", out]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
                    if done.returncode:
                        errors.append(done.stderr[-2000:])
                except subprocess.TimeoutExpired as e:
                    errors.append(f"py-spy timed out: {e}")

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        r = loadgen.run(HOST, p.port, clients=clients, k=1, duration=2 * int(seconds) + 1.5,
                        warmup=0.8, pid=pid, readers=readers)
        th.join(seconds * 2 + 60)
    finally:
        p.stop()
        if fake is not None:
            fake.stop()
    if errors or not os.path.exists(raw):
        raise RuntimeError(f"py-spy failed: {errors}")
    s = summarise(parse_collapsed(raw))
    s.update({"rate": rate, "seconds": int(seconds), "svg": svg, "raw": raw, "load": r,
              "backend": backend, "title": TITLES[backend]})
    log(f"  profiled {s['samples']} samples while serving {r['apdus_per_s']:.0f} APDUs/s "
        f"({r.get('proxy_cpu_us_per_apdu', 0):.1f} us/APDU, {r['errors']} errors)")
    with open(os.path.join(outdir, f"{name}.json"), "w") as f:
        json.dump(s, f, indent=1)
    return s


def main(argv=None):
    p = argparse.ArgumentParser(description="py-spy profile of the proxy under load")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per py-spy recording")
    p.add_argument("--clients", type=int, default=None, help="default: 50 (240 for latency)")
    p.add_argument("--rate", type=int, default=500, help="samples per second")
    p.add_argument("--backend", choices=sorted(SETUPS), default="emulated",
                   help="emulated (4 cards), latency (120 cards, 5 ms), rest (REST backend on "
                        "bench/fake_cloudfoxy.py)")
    a = p.parse_args(argv)
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    s = profile(spy, a.seconds, clients=a.clients, rate=a.rate, backend=a.backend)
    print(f"\n{s['samples']} samples; shares of the proxy's busy CPU\n\nby area:")
    for name, share in s["areas"]:
        print(f"  {100 * share:5.1f}%  {name}")
    print("\nself time:")
    for name, share in s["self"]:
        print(f"  {100 * share:5.1f}%  {name}")
    print("\ninclusive time:")
    for name, share in s["inclusive"]:
        print(f"  {100 * share:5.1f}%  {name}")
    print(f"\nflame graph: {s['svg']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
