#!/usr/bin/env python3
"""How the proxy's cost grows: three series, each doubling one thing.

* readers in the registry, 1k -> 64k: ``twistd -n foxyproxy --backend
  cloudfoxy+http://FAKE?readers_max=100000 --no-signing`` on
  bench/fake_cloudfoxy.py ``--cards N`` (one fresh pair per step; the step
  starts once READERS lists all N); the load addresses 8 readers spread over
  the list by their exact names;
* idle connections, 1k -> 16k: one emulated proxy (defaults, per-peer
  limit lifted, ``--max-connections 100000``), the bench holding N open
  connections that each had one answered request (RLIMIT_NOFILE raised to
  the hard limit for the bench; the proxy raises its own);
* request size K = 1 -> 256 commands per request: one emulated proxy.

Each step: a fixed small load (bench/loadgen.py, 4 closed-loop clients,
SELECT MF, every answer checked, ``--duration`` s after 0.5 s warm-up)
and, at the same time, a probe client sending one SELECT MF every 5 ms
on its own connection.  Reported: proxy CPU per APDU (utime+stime of the
proxy during the window / APDUs answered), VmRSS at the end, and the
longest reactor stall seen from the client side: the longest gap between
two answers of the probe minus its 5 ms pause.  Every process is stopped
by its PID; bounded (the whole run is about 3-5 minutes).

    .venv/bin/python bench/growth.py [--duration 2] [--max-readers 65536] [--max-connections 16384] [--max-k 256]
"""

import argparse
import resource
import socket
import sys
import threading
import time
import os

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

from support import HOST, ProxyProcess  # noqa: E402

from bench import loadgen  # noqa: E402
from bench.helpers import TOKEN, fake_cloudfoxy  # noqa: E402

MB = 1e6
ONE_PEER = ("--max-connections-per-peer", "1000000", "--max-connections", "100000")
PROBE_PAUSE = 0.005


class Probe(threading.Thread):
    """SELECT MF on ``reader`` every 5 ms on one connection; ``worst`` is the
    longest gap between two answers minus the pause (seconds)."""

    def __init__(self, port, reader):
        super().__init__(daemon=True)
        self.port, self.reader = port, reader
        self.stop_at = None
        self.gaps = []
        self.errors = 0
        self.running = True

    def run(self):
        req = f">{self.reader}|\n>1:APDU:00A4000C023F00|\n\n".encode()
        with socket.create_connection((HOST, self.port), timeout=10) as s:
            last = None
            while self.running:
                s.sendall(req)
                buf = b""
                while b"@@\n" not in buf:
                    chunk = s.recv(65536)
                    if not chunk:
                        self.errors += 1
                        return
                    buf += chunk
                if b">1:9000" not in buf:
                    self.errors += 1
                now = time.perf_counter()
                if last is not None:
                    self.gaps.append(now - last - PROBE_PAUSE)
                last = now
                time.sleep(PROBE_PAUSE)

    def finish(self):
        self.running = False
        self.join(15)
        return max(self.gaps) if self.gaps else None


def step(port, pid, readers, k, duration):
    probe = Probe(port, readers[0])
    probe.start()
    time.sleep(0.2)
    r = loadgen.LoadGenerator(HOST, port, clients=4, k=k, duration=duration, warmup=0.5,
                              readers=readers, pid=pid, linger_reset=False).run()
    stall = probe.finish()
    return {"cpu_us": r.get("proxy_cpu_us_per_apdu"), "apdus_s": r["apdus_per_s"],
            "rss": loadgen.proc_status(pid, "VmRSS"), "stall_s": stall,
            "errors": r["errors"] + probe.errors}


def doubling(first, last):
    n = first
    while n <= last:
        yield n
        n *= 2


def wait_listed(port, n, timeout):
    deadline = time.monotonic() + timeout
    names = []
    while time.monotonic() < deadline:
        try:
            names = loadgen.list_readers(HOST, port, timeout=30)
        except (OSError, RuntimeError):
            names = []
        if len(names) >= n:
            return names
        time.sleep(0.2)
    raise RuntimeError(f"only {len(names)} of {n} readers listed after {timeout}s")


def readers_series(args):
    rows = []
    for n in doubling(1024, args.max_readers):
        t0 = time.monotonic()
        with fake_cloudfoxy(cards=n) as fake:
            p = ProxyProcess(*ONE_PEER, "--no-signing", "--backend",
                             f"cloudfoxy+http://{HOST}:{fake.port}?readers_max=100000",
                             env={"FOXYPROXY_TOKEN": TOKEN}).start()
            try:
                names = wait_listed(p.port, n, 120)
                listed = time.monotonic() - t0
                spread = [names[i * (n - 1) // 7] for i in range(8)]
                r = step(p.port, p.proc.pid, spread, 1, args.duration)
                r["listed_s"] = listed
            finally:
                p.stop()
        rows.append((n, r))
        log(f"readers {n}: {fmt_row(r)}, all listed {listed:.1f} s after start")
    return rows


def connections_series(args):
    rows = []
    p = ProxyProcess(*ONE_PEER).start()
    held = []
    try:
        have = 0
        for n in doubling(1024, args.max_connections):
            b = loadgen.open_connections(HOST, p.port, n - have, "Emulated 01")
            held.append(b)
            if b.result["errors"]:
                log(f"  ! opening connections: {b.result['errors']} errors {b.result.get('error_samples')}")
            have = n
            time.sleep(0.5)
            r = step(p.port, p.proc.pid, ["Emulated 00", "Emulated 02", "Emulated 03"], 1, args.duration)
            r["held"] = sum(x.result["ok"] for x in held)
            rows.append((n, r))
            log(f"idle connections {n}: {fmt_row(r)}, {r['held']} held")
    finally:
        for b in held:
            b.close()
        p.stop()
    return rows


def k_series(args):
    rows = []
    p = ProxyProcess(*ONE_PEER).start()
    try:
        for k in doubling(1, args.max_k):
            r = step(p.port, p.proc.pid, ["Emulated 00", "Emulated 01", "Emulated 02", "Emulated 03"], k,
                     args.duration)
            rows.append((k, r))
            log(f"K={k}: {fmt_row(r)}")
    finally:
        p.stop()
    return rows


def fmt_row(r):
    cpu = f"{r['cpu_us']:.1f} µs/APDU" if r["cpu_us"] else "–"
    stall = f"{r['stall_s'] * 1000:.1f} ms" if r["stall_s"] is not None else "–"
    return f"{cpu}, {r['apdus_s']:,.0f} APDUs/s, RSS {r['rss'] / MB:.1f} MB, longest stall {stall}, {r['errors']} errors"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def table(title, what, rows, first_cpu, extra=None):
    print(f"\n{title}\n")
    head = f"| {what} | CPU µs/APDU | × first step | APDUs/s | RSS MB | longest stall ms | errors |"
    if extra:
        head += f" {extra[0]} |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for n, r in rows:
        cpu = r["cpu_us"]
        line = (f"| {n:,} | {cpu:.1f} | {cpu / first_cpu:.2f}× | {r['apdus_s']:,.0f} | {r['rss'] / MB:.1f} | "
                f"{r['stall_s'] * 1000:.1f} | {r['errors']} |")
        if extra:
            line += f" {extra[1](r)} |"
        print(line)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--max-readers", type=int, default=65536)
    ap.add_argument("--max-connections", type=int, default=16384)
    ap.add_argument("--max-k", type=int, default=256)
    ap.add_argument("--only", default="readers,connections,k")
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    only = set(args.only.split(","))
    t0 = time.monotonic()
    out = {}
    if "k" in only:
        out["k"] = k_series(args)
    if "connections" in only:
        out["connections"] = connections_series(args)
    if "readers" in only:
        out["readers"] = readers_series(args)
    print(f"Fixed load: 4 closed-loop clients, SELECT MF, {args.duration:g} s a step; probe: one SELECT MF "
          f"every 5 ms on its own connection (stall = longest gap between its answers − 5 ms); "
          f"whole run {time.monotonic() - t0:.0f} s")
    if "readers" in out:
        rows = out["readers"]
        table("Readers in the registry (cloudfoxy+http on the fake, --no-signing)", "readers", rows,
              rows[0][1]["cpu_us"], ("all listed after s", lambda r: f"{r['listed_s']:.1f}"))
    if "connections" in out:
        rows = out["connections"]
        table("Idle connections held open (emulated, defaults)", "idle connections", rows, rows[0][1]["cpu_us"])
    if "k" in out:
        rows = out["k"]
        table("Commands per request K (emulated, defaults)", "K", rows, rows[0][1]["cpu_us"])


if __name__ == "__main__":
    main()
