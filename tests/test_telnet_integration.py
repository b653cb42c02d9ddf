"""Real telnet clients against a real ``twistd foxyproxy``: PuTTY's plink in
telnet mode and inetutils telnet, both negotiating options (RFC 854), each
get an ATR and ``9000``."""

import os
import selectors
import subprocess
import time

import pytest

import pcsc_rig
from support import HOST

ATR = "3B8B8001466F7879456D753738313677"
EXPECTED = [f">1:{ATR}", ">2:9000"]


@pytest.fixture(scope="module", autouse=True)
def telnet_clients():
    pcsc_rig.ensure_packages(["putty-tools", "inetutils-telnet"])


def drive(cmd, script, expect=2, timeout=15.0):
    """Run ``cmd``, type ``script`` ((bytes, pause) pairs) on its stdin, and
    return its stdout once ``expect`` answers (``@@``) came, or at the
    timeout; the client is then killed."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        for data, pause in script:
            proc.stdin.write(data)
            proc.stdin.flush()
            time.sleep(pause)
        out = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while out.count(b"@@") < expect and time.monotonic() < deadline:
                if sel.select(max(0.01, deadline - time.monotonic())):
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    if not chunk:
                        break
                    out += chunk
        return out.decode("utf-8", "replace")
    finally:
        proc.kill()
        proc.wait(5)


def results(text):
    return [line.strip() for line in text.splitlines() if line.startswith(">")]


def test_plink_telnet(proxy):
    # plink sends IAC WILL NAWS, TSPEED, TTYPE, NEW-ENVIRON, DO ECHO, WILL/DO
    # SGA as it connects, before the reader line; it types one line at a time.
    out = drive(["plink", "-telnet", "-batch", "-P", str(proxy.port), HOST],
                [(b">Emulated 00|\n", 0.2), (b">1:RESET|\n", 0.2),
                 (b">2:APDU:00A4000C023F00|\n", 0.2), (b"\n", 0.0)])
    assert results(out) == EXPECTED, out


def test_inetutils_telnet_negotiating(proxy):
    # "open HOST -PORT" makes telnet negotiate (IAC DO/WILL ...) as it would
    # on port 23; the escape character then sends IAC AYT between two lines.
    out = drive(["telnet"],
                [(b"open %s -%d\n" % (HOST.encode(), proxy.port), 0.5),
                 (b">Emulated 00|\n", 0.2), (b">1:RESET|\n", 0.2),
                 (b"\x1dsend ayt\n", 0.3),
                 (b">2:APDU:00A4000C023F00|\n", 0.2), (b"\n", 0.0)])
    assert "Connected to" in out, out
    assert results(out) == EXPECTED, out


def test_inetutils_telnet_plain(proxy):
    out = drive(["telnet", HOST, str(proxy.port)],
                [(b">Emulated 00|\n>1:RESET|\n>2:APDU:00A4000C023F00|\n\n", 0.0)], expect=1)
    assert results(out) == EXPECTED, out
