#!/usr/bin/env python3
"""What one tcp:// hop costs: client -> A against client -> B -> A.

Starts two ``twistd foxyproxy`` processes on free loopback ports: A with
emulated cards, B with ``--backend tcp://127.0.0.1:<A>?prefix=`` (an empty
prefix rather than A's owner id, so the reader names are the same on both).  Then, for A directly and for B:

1. one client, ``--count`` sequential APDUs (one request each, after
   ``--warmup`` unmeasured ones): per-APDU latency p50/p99 and APDUs/s;
2. ``--clients`` concurrent clients for ``--duration`` seconds with
   bench/loadgen.py (if present): APDUs/s, p50/p99 and proxy CPU per APDU.

Everything is bounded in count and time; both processes are stopped at the
end.  Usage::

    .venv/bin/python bench/tcp_hop.py [--count 2000] [--clients 10] [--duration 5] [--json]
"""

import argparse
import json
import os
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from support import HOST, ProxyProcess  # noqa: E402

try:
    import loadgen  # noqa: E402
except ImportError:  # pragma: no cover - loadgen is optional
    loadgen = None

APDU = "00A4000C023F00"  # SELECT MF -> 9000
CARDS = 10


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[i]


def sequential(port, count, warmup, reader="Emulated 00", deadline_s=120.0):
    """``count`` APDUs one after another on one connection."""
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = f">{reader}|\n>1:APDU:{APDU}|\n\n".encode()
    expect = b">1:9000\n@@\n"
    lat = []
    deadline = time.monotonic() + deadline_s
    t_start = None
    try:
        for i in range(warmup + count):
            if i == warmup:
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            sock.sendall(request)
            buf = b""
            while not buf.endswith(b"@@\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed")
                buf += chunk
            t1 = time.perf_counter()
            if buf != expect:
                raise AssertionError(f"unexpected answer {buf!r}")
            if i >= warmup:
                lat.append(t1 - t0)
            if time.monotonic() > deadline:
                raise TimeoutError("sequential run exceeded its time bound")
        elapsed = time.perf_counter() - t_start
    finally:
        sock.close()
    lat.sort()
    return {
        "apdus": count,
        "apdus_per_s": round(count / elapsed, 1),
        "p50_ms": round(percentile(lat, 50) * 1000, 3),
        "p99_ms": round(percentile(lat, 99) * 1000, 3),
        "mean_ms": round(sum(lat) / len(lat) * 1000, 3),
    }


def concurrent(port, pid, clients, duration):
    if loadgen is None:
        return None
    r = loadgen.run(HOST, port, clients=clients, k=1, duration=duration, warmup=1.0,
                    reader_count=CARDS, apdu=APDU, expect="9000", pid=pid, drain=5.0)
    return {
        "clients": clients,
        "apdus_per_s": round(r["apdus_per_s"], 1),
        "p50_ms": r["latency_ms"]["p50"],
        "p99_ms": r["latency_ms"]["p99"],
        "errors": r["errors"],
        "entry_proxy_cpu_us_per_apdu": (round(r["proxy_cpu_us_per_apdu"], 1)
                                        if r.get("proxy_cpu_us_per_apdu") else None),
    }


def wait_for_readers(port, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(b">*|\n>1:READERS|\n\n")
            buf = b""
            while not buf.endswith(b"@@\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        if buf.count(b"|") >= CARDS - 1:
            return
        time.sleep(0.05)
    raise RuntimeError("B never listed A's readers")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2000, help="sequential APDUs per target (default 2000)")
    p.add_argument("--warmup", type=int, default=200, help="unmeasured sequential APDUs first (default 200)")
    p.add_argument("--clients", type=int, default=10, help="concurrent clients (default 10; 0: skip)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of the concurrent run (default 5)")
    p.add_argument("--connections", type=int, default=4, help="B's pool size (connections=)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not (1 <= args.count <= 1_000_000 and 0 <= args.clients <= 1000 and 0 < args.duration <= 60):
        p.error("--count 1..1000000, --clients 0..1000, --duration up to 60 s")

    quiet = ["--log-level", "warn"]
    a = ProxyProcess("--backend", f"emulated:?cards={CARDS}", *quiet)
    a.start()
    b = None
    try:
        b = ProxyProcess("--backend", f"tcp://{HOST}:{a.port}?connections={args.connections}&prefix=", *quiet)
        b.start()
        wait_for_readers(b.port)
        results = {"sequential": {}, "concurrent": {}}
        for name, proxy in (("direct", a), ("via_b", b)):
            results["sequential"][name] = sequential(proxy.port, args.count, args.warmup)
        if args.clients:
            for name, proxy in (("direct", a), ("via_b", b)):
                results["concurrent"][name] = concurrent(
                    proxy.port, proxy.proc.pid, args.clients, args.duration)
    finally:
        if b is not None:
            b.stop()
        a.stop()

    s = results["sequential"]
    results["hop_p50_ms"] = round(s["via_b"]["p50_ms"] - s["direct"]["p50_ms"], 3)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"sequential, 1 client, {args.count} APDUs each:")
    for name in ("direct", "via_b"):
        r = s[name]
        print(f"  {name:7s} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
              f"mean {r['mean_ms']:.3f} ms  {r['apdus_per_s']:.0f} APDUs/s")
    print(f"  hop cost at p50: {results['hop_p50_ms']:.3f} ms")
    if results["concurrent"]:
        print(f"concurrent, {args.clients} clients, {args.duration:.0f} s (bench/loadgen.py):")
        for name in ("direct", "via_b"):
            r = results["concurrent"][name]
            if r is None:
                print("  (bench/loadgen.py not found)")
                break
            print(f"  {name:7s} p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  "
                  f"{r['apdus_per_s']:.0f} APDUs/s  entry proxy CPU "
                  f"{r['entry_proxy_cpu_us_per_apdu']} us/APDU  errors {r['errors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
