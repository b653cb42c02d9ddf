"""Helper server processes for the bench (trivial responder, fake CloudFoxy):
each runs in its own process, prints ``port N`` first, and is stopped by
its PID."""

import json
import os
import select
import subprocess
import sys
import tempfile

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
HOST = "127.0.0.1"
TOKEN = "bench-token"


class Helper:
    """``python ARGV...`` in its own process; ``port`` is what it printed."""

    def __init__(self, *argv):
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE,
                                     stderr=self.err, cwd=REPO)
        self.port = None
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("port "):
            self.proc.kill()
            self.proc.wait(5)
            self.err.seek(0)
            why = self.err.read()[-2000:]
            self.stop()
            raise RuntimeError(f"{argv[0]} did not start: {line!r} {why!r}")
        self.port = int(line.split()[1])

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()
        self.err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def trivial_responder():
    return Helper(os.path.join(BENCH, "trivial_responder.py"), "--port", "0", "--stop-after", "900")


def fake_cloudfoxy(cards=120, latency_ms=0.0):
    """The fake CloudFoxy server (token ``TOKEN``) in its own process."""
    return Helper(os.path.join(BENCH, "fake_cloudfoxy.py"), "--port", "0", "--cards", str(cards),
                  "--latency-ms", str(latency_ms), "--token", TOKEN, "--stop-after", "900")


def fake_stats(port):
    """The fake server's counters (``/_fake/stats``)."""
    import http.client

    c = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        c.request("GET", "/_fake/stats", headers={"X-Auth-Token": TOKEN})
        return json.loads(c.getresponse().read())
    finally:
        c.close()


def rest_args(port):
    """Proxy arguments and environment for a REST backend on the fake at ``port``."""
    return ["--backend", f"cloudfoxy+http://{HOST}:{port}"], {"FOXYPROXY_TOKEN": TOKEN}
