#!/usr/bin/env python3
"""What the RAMOverHTTP path costs per APDU: a line client of B on reader
``RAM bench`` (A's emulated card driven through A's ``--ram-connect`` by
B's ``--ram`` server) against a line client of A's own card directly.

Starts two ``twistd foxyproxy`` processes on free loopback ports: B with
``--ram`` and A with ``--ram-connect http://127.0.0.1:<B>/rt/<secret>=Emulated 00``.
Then ``--count`` sequential one-APDU requests (after ``--warmup``
unmeasured ones) on B's ``RAM bench`` and on A's ``Emulated 01``
(A's ``Emulated 00`` is held by the RAM session): p50/p99 per APDU; and
one request of ``--batch`` APDUs on ``RAM bench`` (one AA script):
milliseconds per APDU.  Everything is bounded in count and time; both
processes are stopped at the end.  Usage::

    .venv/bin/python bench/ram_hop.py [--count 500] [--batch 300] [--json]
"""

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, HERE)

from support import HOST, LineClient, ProxyProcess  # noqa: E402
from tcp_hop import APDU, sequential  # noqa: E402

SECRET = "benchSecret"


def wait_for_reader(proxy, name, timeout=20.0):
    import base64

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with proxy.client() as c:
            [(_, listing)] = c.request(">|\n>1:READERS|\n\n")
        if name in [base64.b64decode(n).decode() for n in listing.split("|") if n]:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{name} never appeared")


def batch(port, reader, count, deadline_s=60.0):
    text = f">{reader}|\n" + "".join(f">{i}:APDU:{APDU}|\n" for i in range(count)) + "\n"
    with LineClient(HOST, port, timeout=deadline_s) as c:
        t0 = time.perf_counter()
        results = c.request(text)
        elapsed = time.perf_counter() - t0
    if results != [(str(i), "9000") for i in range(count)]:
        raise AssertionError("wrong answers in the batch")
    return {"apdus": count, "ms_total": round(elapsed * 1000, 3),
            "ms_per_apdu": round(elapsed * 1000 / count, 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=500, help="sequential APDUs per target (default 500)")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured sequential APDUs first (default 50)")
    p.add_argument("--batch", type=int, default=300, help="APDUs in the one-request run (default 300)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not (1 <= args.count <= 100_000 and 2 <= args.batch <= 1000):
        p.error("--count 1..100000, --batch 2..1000")
    tokens = os.path.join(tempfile.mkdtemp(prefix="ram-bench-"), "tokens")
    with open(tokens, "w") as f:
        f.write(f"bench {SECRET}\n")
    quiet = ["--log-level", "warn", "--no-signing"]
    b = ProxyProcess("--ram", f"tcp:0:interface={HOST}", "--ram-token-file", tokens, *quiet, listeners=2)
    b.start()
    a = None
    try:
        ram_port = b.ports["RamSite"][0]
        a = ProxyProcess("--ram-connect", f"http://{HOST}:{ram_port}/rt/{SECRET}=Emulated 00", *quiet)
        a.start()
        wait_for_reader(b, "RAM bench")
        results = {
            "direct": sequential(a.port, args.count, args.warmup, reader="Emulated 01"),
            "ram": sequential(b.port, args.count, args.warmup, reader="RAM bench"),
            "ram_batch": batch(b.port, "RAM bench", args.batch),
        }
    finally:
        if a is not None:
            a.stop()
        b.stop()
    results["ram_cost_p50_ms"] = round(results["ram"]["p50_ms"] - results["direct"]["p50_ms"], 3)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"sequential, 1 client, {args.count} one-APDU requests each:")
    for name in ("direct", "ram"):
        r = results[name]
        print(f"  {name:7s} p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
              f"mean {r['mean_ms']:.3f} ms  {r['apdus_per_s']:.0f} APDUs/s")
    print(f"  RAM path cost at p50: {results['ram_cost_p50_ms']:.3f} ms per APDU")
    r = results["ram_batch"]
    print(f"one request of {r['apdus']} APDUs on the RAM reader (one AA script): "
          f"{r['ms_total']:.1f} ms, {r['ms_per_apdu']:.3f} ms per APDU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
