"""Issue 12 on real processes: a request's commands stay back to back
through a chain (tcp:// and REST), one bad card on a tcp:// upstream never
hurts its neighbour, answers without SW1 SW2 are C086, upstream reader
lists are bounded, and every HOST takes an IPv6 literal (on ::1)."""

import base64
import socket
import threading
import time

import pytest
from support import LineClient
from test_rest_integration import TOKEN, Rest, readers, rest_port, token_file, wait_for  # noqa: F401

SELECT_MF = "00A4000C023F00"
SELECT_EF = "00A4000C022F02"  # EF 2F02 under the MF: the card's serial in a 5A TLV
READ_BINARY = "00B000000A"
SERIAL_00 = "5A080000000000000000" + "9000"  # Emulated 00's serial number


def compete(port, stop, host="127.0.0.1"):
    """A client of proxy A that selects the MF of Emulated 00 in a loop
    (bounded: at most 60 s or 100,000 requests)."""
    count = [0]

    def run():
        with LineClient(host, port, timeout=10) as c:
            end = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < end and count[0] < 100000:
                assert c.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
                count[0] += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, count


def interleavings(client, reader, n=200):
    """How many of ``n`` SELECT EF + READ BINARY requests saw anything but
    the EF's content (another client's command slipped in between)."""
    bad = 0
    for _ in range(n):
        got = client.results(f">{reader}|\n>1:APDU:{SELECT_EF}|\n>2:APDU:{READ_BINARY}|\n\n")
        bad += got != ["9000", SERIAL_00]
    return bad


@pytest.fixture
def proxy_a(proxy_factory):
    """Proxy A: emulated cards whose commands take 2 ms (so that another
    client's command could slip in between), also served over REST."""
    return proxy_factory("--backend", "emulated:?cards=2&latency_ms=2", "--rest",
                         "tcp:0:interface=127.0.0.1", listeners=2,
                         env={"FOXYPROXY_REST_TOKEN": TOKEN})


def run_scenario(a, front, reader):
    stop = threading.Event()
    thread, count = compete(a.port, stop)
    try:
        assert wait_for(lambda: count[0] > 10, timeout=10)
        with front.client(timeout=30) as c:
            bad = interleavings(c, reader)
    finally:
        stop.set()
        thread.join(15)
    assert count[0] > 200  # the competitor really ran alongside
    return bad


def test_no_interleaving_through_b_over_tcp(proxy_factory, proxy_a):
    b = proxy_factory("--backend", f"tcp://127.0.0.1:{proxy_a.port}?prefix=A-", "--no-signing")
    assert wait_for(lambda: "A-Emulated 00" in readers(b), timeout=10)
    # B sends a request's commands as one upstream request once it knows
    # that A keeps connections (foxyproxy 2.10 does not, and cannot take them).
    assert wait_for(lambda: "keeps connections open" in b.log(), timeout=10)
    assert run_scenario(proxy_a, b, "A-Emulated 00") == 0


def test_no_interleaving_through_b_over_rest(proxy_factory, proxy_a, token_file):  # noqa: F811
    url = f"cloudfoxy+http://127.0.0.1:{rest_port(proxy_a)}?token_file={token_file}&prefix=R"
    b = proxy_factory("--backend", url, "--no-signing")
    assert wait_for(lambda: "R Emulated_00" in readers(b), timeout=10)
    assert run_scenario(proxy_a, b, "R Emulated_00") == 0


def test_no_interleaving_through_the_rest_front_end(proxy_a):
    stop = threading.Event()
    thread, count = compete(proxy_a.port, stop)
    rest = Rest(rest_port(proxy_a))
    bad = 0
    try:
        assert wait_for(lambda: count[0] > 10, timeout=10)
        query = f"/api/v1/basic?terminal=/Emulated_00&apdu={SELECT_EF}&apdu={READ_BINARY}"
        for _ in range(200):
            bad += rest.get(query) != (200, f"9000\n{SERIAL_00}\n")
    finally:
        stop.set()
        thread.join(15)
        rest.close()
    assert count[0] > 200
    assert bad == 0


# -- a scripted tcp:// upstream -----------------------------------------------

JUNK = [">{id}:XYZ", ">99999999:9000", ">{id}:" + "9" * 300000, ">{id}:90", ">{id}:", "garbage"]


class ScriptedUpstream:
    """A line-protocol endpoint on loopback: readers "Good" and "Bad" and
    ``names`` more; Good answers every APDU ``CAFE9000``, Bad answers with
    the next of JUNK (wrong ids, no hex, an over-long line, no SW1 SW2...)."""

    def __init__(self, extra_names=()):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        names = ["Good", "Bad"] + list(extra_names)
        self.listing = "|".join(base64.b64encode(n.encode()).decode() for n in names)
        self.junk = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        reader, out = None, []
        try:
            for raw in conn.makefile("rb"):
                line = raw.decode().strip()
                if not line:
                    if out:
                        conn.sendall(("\n".join(out) + "\n@@\n").encode())
                    out = []
                    continue
                body = line[1:].rstrip("|")
                cid, _, command = body.partition(":")
                if not command:
                    reader = body.split(":")[0]
                    reader = base64.b64decode(reader).decode() if reader != "*" and "=" in reader else reader
                    continue
                if command.startswith("READERS"):
                    out.append(f">{cid}:{self.listing}")
                elif command.startswith("OWNER"):
                    out.append(f">{cid}:C081")  # no owner id: its readers keep their names
                elif reader == "Bad":
                    out.append(JUNK[self.junk % len(JUNK)].format(id=cid))
                    self.junk += 1
                else:
                    out.append(f">{cid}:CAFE9000")
        except OSError:
            pass

    def close(self):
        self.listener.close()


def test_junk_card_never_hurts_its_neighbour(proxy_factory):
    up = ScriptedUpstream()
    try:
        b = proxy_factory("--backend", f"tcp://127.0.0.1:{up.port}?connections=1", "--no-signing")
        assert wait_for(lambda: readers(b) == ["Good", "Bad"], timeout=10)
        time.sleep(1.0)  # B learns that the upstream keeps connections: one shared connection
        stop = threading.Event()
        bad_results = []

        def bad_card():
            with b.client(timeout=10) as c:
                end = time.monotonic() + 60
                while not stop.is_set() and time.monotonic() < end:
                    bad_results.extend(c.results(f">Bad|\n>1:APDU:{SELECT_MF}|\n\n"))
                    time.sleep(0.05)  # 20 a second

        thread = threading.Thread(target=bad_card, daemon=True)
        thread.start()
        good = []
        started = time.monotonic()
        try:
            with b.client(timeout=10) as c:
                while len(good) < 300:
                    good.extend(c.results(f">Good|\n>1:APDU:{SELECT_MF}|\n\n"))
                    if len(good) % 100 == 0 and time.monotonic() - started < 1.0:
                        time.sleep(0.2)  # spread over enough time to meet plenty of junk
        finally:
            stop.set()
            thread.join(15)
        assert good == ["CAFE9000"] * 300
        assert len(bad_results) >= 5 and set(bad_results) == {"C086"}, bad_results
        assert "lost a connection" not in b.log() and "broke the protocol" not in b.log()
    finally:
        up.close()


def test_upstream_reader_list_is_bounded(proxy_factory):
    up = ScriptedUpstream(["L" * 300] + [f"N{i}" for i in range(12000)])
    try:
        b = proxy_factory("--backend", f"tcp://127.0.0.1:{up.port}?readers_max=5000", "--no-signing")
        assert wait_for(lambda: len(readers(b)) == 5000, timeout=10)
        assert "dropped 7002 over readers_max=5000 and 1 with a name over 256 bytes" in b.log()
        assert "5000 readers added: Good, Bad, N0," in b.log() and "and 4990 more" in b.log()
        with b.client() as c:
            assert c.results(f">Good|\n>1:APDU:{SELECT_MF}|\n\n") == ["CAFE9000"]
    finally:
        up.close()


# -- IPv6 ------------------------------------------------------------------------

def fake_vpcd():
    """A vpcd stand-in on ::1: asks the bridged card for its ATR and sends
    one APDU; ``result`` gets (ATR, answer)."""
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    listener.listen(1)
    result = []

    def frame(sock):
        head = sock.recv(2, socket.MSG_WAITALL)
        return sock.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)

    def run():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(b"\x00\x01\x04")
            atr = frame(conn)
            apdu = bytes.fromhex(SELECT_MF)
            conn.sendall(len(apdu).to_bytes(2, "big") + apdu)
            result.append((atr.hex().upper(), frame(conn).hex().upper()))
        listener.close()

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1], result


def test_ipv6_literals_everywhere(proxy_factory, token_file):  # noqa: F811
    a = proxy_factory("--rest", "tcp6:0:interface=\\:\\:1", "--no-signing", listeners=2,
                      port="tcp6:0:interface=\\:\\:1", env={"FOXYPROXY_REST_TOKEN": TOKEN})
    with LineClient("::1", a.port) as c:
        assert c.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
    vpcd_port, vpcd = fake_vpcd()
    b = proxy_factory(
        "--backend", f"tcp://[::1]:{a.port}?prefix=T-",
        "--backend", f"cloudfoxy+http://[::1]:{a.ports['Site'][0]}?token_file={token_file}&prefix=R",
        "--vpcd", f"[::1]:{vpcd_port}=T-Emulated 01", "--no-signing")
    assert wait_for(lambda: {"T-Emulated 00", "R Emulated_00"} <= set(readers(b)), timeout=10), \
        b.log()
    with b.client() as c:
        assert c.results(f">T-Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
        assert c.results(f">R Emulated_00|\n>1:APDU:{SELECT_MF}|\n>2:APDU:{SELECT_EF}|\n"
                         f">3:APDU:{READ_BINARY}|\n\n") == ["9000", "9000", SERIAL_00]
    assert wait_for(lambda: vpcd, timeout=10), b.log()
    atr, answer = vpcd[0]
    assert atr.startswith("3B") and answer == "9000"
    assert "Traceback" not in b.log() and "critical" not in b.log()
