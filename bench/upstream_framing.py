#!/usr/bin/env python3
"""The tcp:// upstream framer against twisted's LineOnlyReceiver, in process.

Feeds the same answer bytes to ``tcp_upstream._UpstreamProtocol.dataReceived``
(its answer handling replaced by a no-op, so only framing is timed) and to a
``LineOnlyReceiver`` with a no-op ``lineReceived``:

* ``answers``: ``--count`` one-command answers (``>ID:<RESULT>\\n@@\\n``),
  one read each (the usual case);
* ``listing``: one READERS answer line of ``--readers`` names arriving in
  64 KiB reads (the largest line the upstream accepts).

Prints microseconds per read for each.  Bounded in count; no I/O.  Usage::

    .venv/bin/python bench/upstream_framing.py [--count 200000] [--readers 10000]
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from twisted.protocols.basic import LineOnlyReceiver  # noqa: E402

from cloudfoxy_proxy.backends import tcp_upstream  # noqa: E402


class _Backend:
    listing_limit = 10 ** 9
    where = "bench"


class Ours(tcp_upstream._UpstreamProtocol):
    def _line(self, line):
        pass


class Theirs(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = tcp_upstream.MAX_LINE

    def lineReceived(self, line):
        line.strip()


class _Transport:
    disconnecting = False


def run(proto, reads):
    start = time.perf_counter()
    for data in reads:
        proto.dataReceived(data)
    return (time.perf_counter() - start) / len(reads) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200000)
    p.add_argument("--readers", type=int, default=10000)
    a = p.parse_args()
    answers = [b">%d:6F1A8407A0000000031010A50F500A4D6173746572436172649000\n@@\n" % i
               for i in range(a.count)]
    names = b"|".join(b"UmVhZGVyIG51bWJlciAwMDAwMDAwMDAw" for _ in range(a.readers)) + b"\n@@\n"
    listing = [names[i:i + 65536] for i in range(0, len(names), 65536)]
    for name, reads in (("answers", answers), ("listing", listing * 20)):
        ours = Ours(_Backend(), False)
        theirs = Theirs()
        theirs.MAX_LENGTH = 10 ** 9
        theirs.transport = _Transport()
        t_ours = min(run(ours, reads) for _ in range(3))
        t_theirs = min(run(theirs, reads) for _ in range(3))
        print(f"{name}: {len(reads)} reads; current framer {t_ours:.2f} us/read, "
              f"LineOnlyReceiver {t_theirs:.2f} us/read")


if __name__ == "__main__":
    main()
