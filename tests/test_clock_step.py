"""Wall-clock steps do not move timeouts: a real ``twistd foxyproxy``
whose ``time.time`` is stepped by one hour (a ``sitecustomize`` module on
its PYTHONPATH adds an offset read from a file, as an NTP or VM clock
step would; CLOCK_MONOTONIC is untouched), with a card that never answers
(an upstream proxy that lists "Hung 00" and answers no APDU) and an
emulated one.

* a step back: the hung card's C086 still comes at --command-timeout;
* a step forward: idle connections are not closed (--idle-timeout), the
  hung card's C086 does not come early, and log lines carry the stepped
  wall-clock time (timestamps stay wall-clock).
"""

import base64
import datetime
import re
import socket
import threading
import time

import pytest

from support import HOST, ProxyProcess

pytestmark = pytest.mark.integration

COMMAND_TIMEOUT = 3.0
SITECUSTOMIZE = '''
import os, time
_file = os.environ["CLOCK_OFFSET_FILE"]
_real = time.time
_state = [0.0, 0.0]
def _time():
    now = _real()
    if now - _state[0] > 0.05:
        _state[0] = now
        try:
            _state[1] = float(open(_file).read() or 0)
        except (OSError, ValueError):
            pass
    return now + _state[1]
time.time = _time
'''


def hung_upstream(listener):
    """Answers READERS with one reader "Hung 00"; never answers an APDU."""
    def serve(c):
        buf = b""
        with c:
            while True:
                try:
                    data = c.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n\n" in buf:
                    request, buf = buf.split(b"\n\n", 1)
                    lines = [line for line in request.split(b"\n") if line.startswith(b">")]
                    if any(b"READERS" in line.upper() for line in lines):
                        c.sendall(b"".join(b">%s:%s\n" % (line[1:].split(b":")[0], base64.b64encode(b"Hung 00"))
                                           for line in lines[1:]) + b"@@\n")

    while True:
        try:
            c, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(c,), daemon=True).start()


@pytest.fixture
def stepped(tmp_path):
    """(proxy, step(seconds)): a proxy whose wall clock starts one hour
    ahead; ``step(offset)`` sets its offset from the true time."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    offset = tmp_path / "offset"
    offset.write_text("3600")
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(8)
    threading.Thread(target=hung_upstream, args=(listener,), daemon=True).start()
    proxy = ProxyProcess("--backend", f"tcp://{HOST}:{listener.getsockname()[1]}", "--backend", "emulated:",
                         "--no-signing", "--command-timeout", str(COMMAND_TIMEOUT), "--idle-timeout", "20",
                         env={"PYTHONPATH": str(tmp_path), "CLOCK_OFFSET_FILE": str(offset)})
    proxy.start()

    def step(seconds):
        offset.write_text(str(seconds))
        time.sleep(0.2)  # the proxy rereads the offset every 50 ms

    try:
        deadline = time.monotonic() + 10
        while b"Hung 00" not in _readers(proxy) and time.monotonic() < deadline:
            time.sleep(0.1)
        yield proxy, step
    finally:
        proxy.stop()
        listener.close()


def _readers(proxy):
    with proxy.client() as c:
        listing = c.results(">|\n>1:READERS|\n\n")[0]
    return [base64.b64decode(n) for n in listing.split("|") if n]


def hung_command(proxy, step_to=None, step_after=0.5, timeout=15.0):
    """Send one APDU to the hung card (stepping the clock ``step_after``
    seconds later); returns (answer, seconds it took)."""
    s = socket.create_connection((HOST, proxy.port), 5)
    with s:
        s.sendall(b">Hung 00|\n>1:APDU:00A4000C023F00|\n\n")
        t0 = time.monotonic()
        if step_to is not None:
            time.sleep(step_after)
            step_to()
        s.settimeout(timeout)
        got = b""
        try:
            while b"@@\n" not in got:
                data = s.recv(1000)
                if not data:
                    break
                got += data
        except socket.timeout:
            pass
        return got, time.monotonic() - t0


def test_a_step_back_does_not_postpone_the_command_timeout(stepped):
    proxy, step = stepped
    got, took = hung_command(proxy, lambda: step(0))  # the wall clock steps back one hour
    assert got == b">1:C086\n@@\n", f"after a -1 h step: {got!r} in {took:.1f} s"
    assert COMMAND_TIMEOUT - 0.5 <= took <= COMMAND_TIMEOUT + 2, took


def test_a_step_forward_closes_no_idle_connection_and_fires_no_timeout_early(stepped):
    proxy, step = stepped
    step(0)
    idle = [socket.create_connection((HOST, proxy.port), 5) for _ in range(5)]
    try:
        time.sleep(0.5)
        got, took = hung_command(proxy, lambda: step(3600 * 2), step_after=0.5)  # +1 h on the start offset
        assert got == b">1:C086\n@@\n", got
        assert took >= COMMAND_TIMEOUT - 0.5, f"C086 came {took:.1f} s after the command: fired early by the step"
        for s in idle:  # every idle connection is still served
            s.settimeout(5)
            s.sendall(b">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n")
            assert s.recv(100) == b">1:9000\n@@\n"
    finally:
        for s in idle:
            s.close()
    # Log lines keep the (stepped) wall-clock time.
    stamps = re.findall(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)([+-]\d{4}) ", proxy.log(), re.M)
    assert stamps
    last = datetime.datetime.strptime("".join(stamps[-1]), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    assert abs(last - (time.time() + 7200)) < 120, (stamps[-1], "log timestamps are not wall-clock")
