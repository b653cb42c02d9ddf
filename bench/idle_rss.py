#!/usr/bin/env python3
"""Idle memory and start-up: our proxy next to FoxyProxy 2.10 and a bare
twistd, in one run, taking turns (``--rounds``).

Each round starts, one at a time, on loopback:

* ``bare twistd``: ``twistd -n -y`` of a ten-line Twisted LineReceiver
  answering ``9000`` (what any twistd line server costs: Python, Twisted,
  the reactor, pyOpenSSL which Twisted's TCP transport imports);
* ``ours, emulated``: ``twistd -n foxyproxy`` with the default options
  (4 emulated cards);
* ``ours, REST``: ``twistd -n foxyproxy --backend cloudfoxy+http://FAKE``
  on bench/fake_cloudfoxy.py with ``--cards`` cards;
* ``FoxyProxy 2.10``: the original (``.venv-foxyproxy``, see
  tests/provision.py) with ``-s http://FAKE`` on the same fake.

For each: seconds from launching the process to the first correct answer
to SELECT MF (``9000``; polled every 5 ms on a port chosen beforehand),
then, after that one request and, for the REST paths, once every card is
listed, ``--settle`` s of quiet (default 2: the proxy hands start-up's
freed heap back to the system 1 s after it is ready) and the process's VmRSS (/proc/PID/status; MB =
10^6 bytes).  A process of FoxyProxy is its main process (it forks no
worker while idle).  Every process is stopped by its PID (FoxyProxy by its
process group).  Bounded: at most ``--timeout`` s per start.

    .venv/bin/python bench/idle_rss.py [--rounds 3] [--cards 120] [--settle 2]
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

from support import HOST, TWISTD, FoxyProxy, foxyproxy_check, free_port  # noqa: E402

from bench.helpers import TOKEN, fake_cloudfoxy  # noqa: E402
from bench.loadgen import list_readers, proc_status  # noqa: E402

MB = 1e6
SELECT_MF = "00A4000C023F00"

#: The bare twistd line server (the floor): answers every ``>ID:...`` line
#: ``>ID:9000`` and an empty line ``@@``.
BARE_TAC = '''
import os
from twisted.application import service, strports
from twisted.internet import protocol
from twisted.protocols.basic import LineReceiver


class Bare(LineReceiver):
    delimiter = b"\\n"

    def lineReceived(self, line):
        if line.startswith(b">") and b":" in line:
            self.sendLine(line.split(b":", 1)[0] + b":9000")
        elif not line.strip():
            self.sendLine(b"@@")


application = service.Application("bare")
strports.service(os.environ["BARE_PORT"], protocol.Factory.forProtocol(Bare)).setServiceParent(application)
'''


def ask(port, reader, timeout=2.0):
    """The result of SELECT MF on ``reader`` (None: use the first listed)
    on a new connection, or None when the server is not answering yet."""
    try:
        if reader is None:
            names = list_readers(HOST, port, timeout)
            if not names:
                return None
            reader = names[0]
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(f">{reader}|\n>1:APDU:{SELECT_MF}|\n\n".encode())
            buf = b""
            while b"@@" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except (OSError, RuntimeError, ValueError):
        return None
    for line in buf.decode("utf-8", "replace").splitlines():
        if line.startswith(">1:"):
            return line[3:].strip()
    return None


class Launched:
    """A process started by ``start()``; ``stop()`` ends it by its PID (or
    its process group with ``group``)."""

    def __init__(self, argv, env=None, cwd=None, group=False):
        self.home = tempfile.mkdtemp(prefix="idle-rss-")
        self.out = open(os.path.join(self.home, "out"), "wb")
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})), cwd=cwd or self.home,
                                     start_new_session=group)
        self.group = group

    @property
    def pid(self):
        return self.proc.pid

    def output(self):
        with open(os.path.join(self.home, "out"), encoding="utf-8", errors="replace") as f:
            return f.read()[-2000:]

    def stop(self):
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                if self.group:
                    try:
                        os.killpg(self.proc.pid, sig)
                    except ProcessLookupError:
                        break
                else:
                    self.proc.send_signal(sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.out.close()


def measure(launch, port, reader, cards=None, timeout=20.0, settle=2.0):
    """``{"start_s", "rss"}`` of the process ``launch()`` starts."""
    t0 = time.monotonic()
    p = launch()
    try:
        deadline = t0 + timeout
        first = None
        while first is None and time.monotonic() < deadline:
            if p.proc.poll() is not None:
                raise RuntimeError(f"exited with {p.proc.returncode}: {p.output()}")
            if ask(port, reader, 0.5) == "9000":
                first = time.monotonic() - t0
                break
            time.sleep(0.005)
        if first is None:
            raise RuntimeError(f"no correct answer within {timeout}s: {p.output()}")
        while cards and time.monotonic() < deadline:
            try:
                if len(list_readers(HOST, port)) >= cards:
                    break
            except (OSError, RuntimeError):
                pass
            time.sleep(0.05)
        time.sleep(settle)
        rss = proc_status(p.pid, "VmRSS")
        return {"start_s": first, "rss": rss}
    finally:
        p.stop()


def proxy_launcher(port, *args, env=None):
    def launch():
        logdir = tempfile.mkdtemp(prefix="idle-rss-")
        return Launched([TWISTD, "-n", "--pidfile=", "--logfile", os.path.join(logdir, "twistd.log"),
                         "foxyproxy", "-p", f"tcp:{port}:interface={HOST}", *args], env=env)
    return launch


def bare_launcher(port, tac):
    def launch():
        return Launched([TWISTD, "-n", "--pidfile=", "--logfile", os.path.join(os.path.dirname(tac), "bare.log"),
                         "-y", tac], env={"BARE_PORT": f"tcp:{port}:interface={HOST}"})
    return launch


def median(values):
    return statistics.median(values)


def cell(values, fmt):
    return f"{fmt(median(values))} [{', '.join(fmt(v) for v in values)}]"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cards", type=int, default=120, help="cards of the fake CloudFoxy server")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of quiet before VmRSS is read")
    ap.add_argument("--no-foxyproxy", action="store_true")
    args = ap.parse_args(argv)
    foxy = not args.no_foxyproxy
    if foxy and foxyproxy_check():
        sys.exit(f"FoxyProxy 2.10 is not provisioned ({foxyproxy_check()}): .venv/bin/python "
                 "tests/provision.py, or --no-foxyproxy")
    tac = os.path.join(tempfile.mkdtemp(prefix="idle-rss-bare-"), "bare.tac")
    with open(tac, "w") as f:
        f.write(BARE_TAC)
    res = {k: [] for k in ("bare", "emulated", "rest", "foxyproxy")}
    with fake_cloudfoxy(cards=args.cards) as fake:
        upstream = f"http://{HOST}:{fake.port}"
        for r in range(args.rounds):
            port = free_port()
            res["bare"].append(measure(bare_launcher(port, tac), port, "any", timeout=args.timeout, settle=args.settle))
            port = free_port()
            res["emulated"].append(measure(proxy_launcher(port), port, "Emulated 00", timeout=args.timeout,
                                           settle=args.settle))
            port = free_port()
            res["rest"].append(measure(proxy_launcher(port, "--backend", f"cloudfoxy+{upstream}",
                                                      env={"FOXYPROXY_TOKEN": TOKEN}),
                                       port, None, cards=args.cards, timeout=args.timeout, settle=args.settle))
            if foxy:
                res["foxyproxy"].append(measure_foxyproxy(upstream, args.cards, args.timeout, args.settle))
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {v[-1]['rss'] / MB:.1f} MB in {v[-1]['start_s']:.3f} s" for k, v in res.items() if v),
                file=sys.stderr, flush=True)
    mb = lambda v: f"{v / MB:.1f}"  # noqa: E731
    ms = lambda v: f"{v * 1000:.0f}"  # noqa: E731
    x = lambda v: f"{v:.2f}×"  # noqa: E731
    rss = {k: [m["rss"] for m in v] for k, v in res.items()}
    start = {k: [m["start_s"] for m in v] for k, v in res.items()}
    print(f"Idle VmRSS {args.settle:g} s after start-up and one SELECT MF (MB = 10^6 bytes), medians of {args.rounds} rounds "
          f"[every round]; REST: fake CloudFoxy with {args.cards} cards, all listed\n")
    if foxy:
        print("| path | ours | floor | ratio |")
        print("|---|---|---|---|")
        for key, name in (("emulated", "idle RSS, emulated (defaults)"), ("rest", "idle RSS, REST backend")):
            ratios = [a / b for a, b in zip(rss[key], rss["foxyproxy"])]
            print(f"| {name} vs FoxyProxy 2.10 (-s same fake) | {cell(rss[key], mb)} MB | "
                  f"{cell(rss['foxyproxy'], mb)} MB | {cell(ratios, x)} |")
        for key, name in (("emulated", "start-up to first 9000, emulated"), ("rest", "start-up to first 9000, REST")):
            ratios = [a / b for a, b in zip(start[key], start["foxyproxy"])]
            print(f"| {name} vs FoxyProxy 2.10 | {cell(start[key], ms)} ms | "
                  f"{cell(start['foxyproxy'], ms)} ms | {cell(ratios, x)} |")
        print()
    print("| path | ours | floor: bare twistd line server | ratio | ours − floor |")
    print("|---|---|---|---|---|")
    for key, name in (("emulated", "idle RSS, emulated (defaults)"), ("rest", "idle RSS, REST backend")):
        ratios = [a / b for a, b in zip(rss[key], rss["bare"])]
        diffs = [a - b for a, b in zip(rss[key], rss["bare"])]
        print(f"| {name} | {cell(rss[key], mb)} MB | {cell(rss['bare'], mb)} MB | {cell(ratios, x)} | "
              f"{cell(diffs, mb)} MB |")
    for key, name in (("emulated", "start-up to first 9000, emulated"), ("rest", "start-up to first 9000, REST")):
        ratios = [a / b for a, b in zip(start[key], start["bare"])]
        diffs = [a - b for a, b in zip(start[key], start["bare"])]
        print(f"| {name} | {cell(start[key], ms)} ms | {cell(start['bare'], ms)} ms | {cell(ratios, x)} | "
              f"{cell(diffs, ms)} ms |")


def measure_foxyproxy(upstream, cards, timeout, settle):
    """measure() for FoxyProxy 2.10 (support.FoxyProxy: its own process
    group, a port it is given)."""
    t0 = time.monotonic()
    fp = FoxyProxy(upstream, TOKEN, tempfile.mkdtemp(prefix="idle-rss-fp-"))
    try:
        deadline = t0 + max(timeout, 60)
        first = None
        while time.monotonic() < deadline:
            if fp.proc.poll() is not None:
                raise RuntimeError(f"FoxyProxy exited: {fp.output()[-2000:]}")
            if ask(fp.port, None, 0.5) == "9000":
                first = time.monotonic() - t0
                break
            time.sleep(0.005)
        if first is None:
            raise RuntimeError(f"FoxyProxy: no correct answer: {fp.output()[-2000:]}")
        while time.monotonic() < deadline:
            try:
                if len(list_readers(HOST, fp.port)) >= cards:
                    break
            except (OSError, RuntimeError):
                pass
            time.sleep(0.05)
        time.sleep(settle)
        return {"start_s": first, "rss": proc_status(fp.proc.pid, "VmRSS")}
    finally:
        fp.stop()


if __name__ == "__main__":
    main()
