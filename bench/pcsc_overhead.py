#!/usr/bin/env python3
"""What the proxy adds to an APDU on a local PC/SC reader.

Starts the PC/SC test rig (tests/pcsc_rig.py: pcscd + vpcd + a vicc card in
slot 0; takes the rig's machine lock) and ``twistd foxyproxy --backend
pcsc:``, then times N sequential ``SELECT MF`` (00A4000C023F00) three ways,
interleaved in rounds so drift hits all three alike:

* ``direct``        pyscard ``SCardTransmit`` on a connected handle;
* ``direct+txn``    the same inside ``SCardBeginTransaction`` /
                    ``SCardEndTransaction``: the PC/SC work the proxy does in
                    ``mode=shared``;
* ``proxy``         a line-protocol client on loopback: one request
                    (reader line + command + empty line) per APDU, answer
                    read to ``@@``;
* ``emulated``      for scale, the same client against a second proxy on
                    the built-in emulated card (no PC/SC, no threads): the
                    cost of loopback TCP, the client and the line protocol.

Prints p50/p90/p99/max per way and the proxy's overhead over
``direct+txn`` (same PC/SC calls; the rest is TCP loopback, the line
protocol, the reactor and one thread hop each way).

Usage (as root, like the rig)::

    .venv/bin/python bench/pcsc_overhead.py [-n 500] [--rounds 5] [--json]
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import pcsc_rig as rigmod  # noqa: E402
from support import ProxyProcess  # noqa: E402

SELECT_MF = bytes.fromhex("00A4000C023F00")
READER = rigmod.reader_name(0)


def percentiles(samples):
    s = sorted(samples)

    def p(q):
        return s[min(len(s) - 1, int(q * len(s)))]

    return {"n": len(s), "p50": p(0.50), "p90": p(0.90), "p99": p(0.99), "max": s[-1],
            "mean": statistics.fmean(s)}


class Direct:
    def __init__(self, transactions):
        from smartcard import scard

        self.s = scard
        self.transactions = transactions
        hr, self.ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        assert hr == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(hr)
        hr, self.handle, self.proto = scard.SCardConnect(
            self.ctx, READER, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_ANY)
        assert hr == scard.SCARD_S_SUCCESS, scard.SCardGetErrorMessage(hr)
        self.apdu = list(SELECT_MF)

    def one(self):
        s = self.s
        t0 = time.perf_counter()
        if self.transactions:
            s.SCardBeginTransaction(self.handle)
        hr, response = s.SCardTransmit(self.handle, self.proto, self.apdu)
        if self.transactions:
            s.SCardEndTransaction(self.handle, s.SCARD_LEAVE_CARD)
        took = time.perf_counter() - t0
        assert hr == s.SCARD_S_SUCCESS and response == [0x90, 0x00], (hr, response)
        return took

    def close(self):
        self.s.SCardDisconnect(self.handle, self.s.SCARD_LEAVE_CARD)
        self.s.SCardReleaseContext(self.ctx)


class ViaProxy:
    def __init__(self, proxy, reader=READER):
        self.client = proxy.client(timeout=10)
        self.request = f">{reader}|\n>1:APDU:{SELECT_MF.hex().upper()}|\n\n".encode()

    def one(self):
        t0 = time.perf_counter()
        self.client.send(self.request)
        got = self.client.read_response()
        took = time.perf_counter() - t0
        assert got == [("1", "9000")], got
        return took

    def close(self):
        self.client.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=500, help="APDUs per way (default 500)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument("--deadline", type=float, default=300.0, help="give up after this many seconds")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= 100000 or not 1 <= args.rounds <= args.n:
        ap.error("need 1 <= rounds <= n <= 100000")

    rigmod.ensure_packages()
    rig = rigmod.PcscRig(pcscd_debug=False, vicc_verbosity=0)
    proxy = emulated = None
    ways = {}
    deadline = time.monotonic() + args.deadline
    try:
        rig.start()
        rig.start_card(0)
        proxy = ProxyProcess("--backend", "pcsc:", "--log-level", "warn").start()
        emulated = ProxyProcess("--backend", "emulated:?cards=1", "--log-level", "warn").start()
        ways = {"direct": Direct(False), "direct+txn": Direct(True), "proxy": ViaProxy(proxy),
                "emulated": ViaProxy(emulated, "Emulated 00")}
        # the proxy sees the card within a poll; wait for it (bounded)
        client = ways["proxy"].client
        while True:
            got = client.request(f">{READER}|\n>1:APDU:{SELECT_MF.hex()}|\n\n")
            if got == [("1", "9000")]:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"proxy never served {READER}: {got}")
            time.sleep(0.1)
        for way in ways.values():
            for _ in range(args.warmup):
                way.one()
        samples = {name: [] for name in ways}
        per_round = args.n // args.rounds
        for r in range(args.rounds):
            count = per_round if r < args.rounds - 1 else args.n - per_round * (args.rounds - 1)
            for name, way in ways.items():
                for _ in range(count):
                    samples[name].append(way.one())
                if time.monotonic() > deadline:
                    raise SystemExit("deadline reached")
    finally:
        for way in ways.values():
            way.close()
        for p in (proxy, emulated):
            if p is not None:
                p.stop()
        rig.stop()

    stats = {name: percentiles(s) for name, s in samples.items()}
    overhead = {k: stats["proxy"][k] - stats["direct+txn"][k] for k in ("p50", "p90", "p99", "mean")}
    if args.json:
        print(json.dumps({"stats": stats, "overhead_vs_direct_txn": overhead}, indent=2))
        return 0
    print(f"{args.n} sequential SELECT MF on {READER!r} (vicc via vpcd), microseconds")
    print(f"{'way':<12} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'mean':>8}")
    for name, st in stats.items():
        print(f"{name:<12} " + " ".join(f"{st[k] * 1e6:8.0f}" for k in ("p50", "p90", "p99", "max", "mean")))
    print("proxy - direct+txn: " + ", ".join(f"{k} {v * 1e6:+.0f}" for k, v in overhead.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
