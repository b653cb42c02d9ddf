#!/usr/bin/env python3
"""Per-APDU time a PC/SC application sees through the vpcd bridge.

Starts the PC/SC test rig (tests/pcsc_rig.py: pcscd + vpcd, machine lock),
a vicc card in slot 0 and ``twistd foxyproxy --vpcd 127.0.0.1:<slot 1>=Emulated 00``
(the bridge), then times N sequential ``SELECT MF`` (00A4000C023F00) with
pyscard on each reader and prints p50/p90/p99/max.  Also timed:

* the bridge with TCP_QUICKACK off (``--no-quickack-run``), to show the
  delayed-ACK stall it avoids;
* with ``--loop``, the whole loop a line-protocol client sees: a second
  proxy with ``--backend pcsc:`` reading the bridged card (needs
  ``cloudfoxy_proxy.backends.pcsc``).

Usage (as root, like the rig)::

    .venv/bin/python bench/vpcd_latency.py [-n 500] [--loop] [--json]

Every run is bounded: N APDUs per reader, at most ``--timeout`` seconds each.
"""

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import pcsc_rig as rigmod  # noqa: E402
from support import LineClient, ProxyProcess  # noqa: E402

SELECT_MF = bytes.fromhex("00A4000C023F00")
BRIDGE_SLOT = 1
VICC_SLOT = 0

#: A sitecustomize that switches the bridge's TCP_QUICKACK off in the
#: proxy process (a benchmark knob only; the product always sets it where
#: the OS has it).
NO_QUICKACK = "import cloudfoxy_proxy.frontends.vpcd as v\nv.QUICKACK = False\n"


def percentiles(samples):
    s = sorted(samples)
    n = len(s)

    def at(q):
        return s[min(n - 1, int(q * n))] * 1000.0

    return {"n": n, "p50_ms": at(0.50), "p90_ms": at(0.90), "p99_ms": at(0.99),
            "max_ms": s[-1] * 1000.0, "mean_ms": sum(s) / n * 1000.0}


def time_pyscard(reader_name, n, timeout):
    """Seconds per SELECT MF over one pyscard connection."""
    from smartcard.System import readers

    reader = [r for r in readers() if str(r) == reader_name][0]
    conn = reader.createConnection()
    conn.connect()
    apdu = list(SELECT_MF)
    samples = []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(20):  # warm up
            conn.transmit(apdu)
        for _ in range(n):
            t = time.perf_counter()
            data, sw1, sw2 = conn.transmit(apdu)
            samples.append(time.perf_counter() - t)
            if (sw1, sw2) != (0x90, 0x00):
                raise RuntimeError(f"{reader_name}: SELECT MF gave {sw1:02X}{sw2:02X}")
            if time.monotonic() > deadline:
                break
    finally:
        conn.disconnect()
        conn.release()
    return samples


def time_line(port, reader, n, timeout):
    """Seconds per one-APDU request over the line protocol."""
    samples = []
    deadline = time.monotonic() + timeout
    with LineClient("127.0.0.1", port) as c:
        for _ in range(20):
            c.request(f">{reader}|\n>1:APDU:00A4000C023F00|\n\n")
        for _ in range(n):
            t = time.perf_counter()
            got = c.request(">1:APDU:00A4000C023F00|\n\n")
            samples.append(time.perf_counter() - t)
            if got != [("1", "9000")]:
                raise RuntimeError(f"line protocol: {got}")
            if time.monotonic() > deadline:
                break
    return samples


def bridge_run(rig, n, timeout, quickack=True):
    env = None
    if not quickack:
        site = tempfile.mkdtemp(prefix="vpcd-bench-site-")
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(NO_QUICKACK)
        env = {"PYTHONPATH": site + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proxy = ProxyProcess("--vpcd", f"127.0.0.1:{rig.port(BRIDGE_SLOT)}=Emulated 00", env=env).start()
    try:
        rig.wait_card(BRIDGE_SLOT, True, 10)
        return time_pyscard(rig.reader_name(BRIDGE_SLOT), n, timeout), proxy
    except BaseException:
        proxy.stop()
        raise


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=500, help="APDUs per measurement (default 500)")
    p.add_argument("--timeout", type=float, default=120.0, help="bound per measurement, seconds")
    p.add_argument("--loop", action="store_true",
                   help="also time line client -> proxy B (pcsc:) -> pcscd -> bridge -> emulated")
    p.add_argument("--no-quickack-run", action="store_true",
                   help="also time the bridge with TCP_QUICKACK off")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    n = max(1, min(args.n, 100000))

    rigmod.ensure_packages()
    rig = rigmod.PcscRig(log_dir=tempfile.mkdtemp(prefix="vpcd-bench-"))
    results = {}
    try:
        rig.start()
        rig.start_card(VICC_SLOT)
        results["vicc (rig, TCP_QUICKACK)"] = percentiles(
            time_pyscard(rig.reader_name(VICC_SLOT), n, args.timeout))
        rig.stop_card(VICC_SLOT)

        samples, proxy = bridge_run(rig, n, args.timeout)
        try:
            results["bridge: pyscard -> pcscd -> vpcd -> proxy -> emulated"] = percentiles(samples)
            if args.loop:
                b = ProxyProcess("--backend", "pcsc:?readers=" + rig.reader_name(BRIDGE_SLOT)).start()
                try:
                    time.sleep(1.0)
                    results["loop: line client -> proxy B (pcsc:) -> pcscd -> vpcd -> proxy A"] = \
                        percentiles(time_line(b.port, rig.reader_name(BRIDGE_SLOT), n, args.timeout))
                finally:
                    b.stop()
        finally:
            proxy.stop()
            rig.wait_card(BRIDGE_SLOT, False, 10)

        if args.no_quickack_run:
            samples, proxy = bridge_run(rig, min(n, 200), args.timeout, quickack=False)
            try:
                results["bridge without TCP_QUICKACK"] = percentiles(samples)
            finally:
                proxy.stop()
                rig.wait_card(BRIDGE_SLOT, False, 10)
    finally:
        rig.stop()

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'path':68} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for name, r in results.items():
            print(f"{name:68} {r['n']:5d} {r['p50_ms']:8.3f} {r['p90_ms']:8.3f} "
                  f"{r['p99_ms']:8.3f} {r['max_ms']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
