"""The foundation against a real ``twistd foxyproxy`` process over TCP."""

import base64
import re
import socket
import threading
import time

import pytest

from support import HOST, LineClient

ATR = "3B8B8001466F7879456D753738313677"


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def test_readme_examples(proxy):
    with proxy.client() as c:
        [(cid, listing)] = c.request(">*|\n>1:READERS|\n\n")
        assert cid == "1"
        assert [base64.b64decode(x).decode() for x in listing.split("|")] == [
            "Emulated 00", "Emulated 01", "Emulated 02", "Emulated 03"]
        assert c.request(">Emulated 00|\n>1:RESET|\n>2:APDU:00A4040C0AF0434C4F5544464F5859|\n"
                         ">3:APDU:00A4020C025001|\n>4:APDU:00D6000004CAFEBABE|\n>5:APDU:00B0000004|\n\n") == [
            ("1", ATR), ("2", "9000"), ("3", "9000"), ("4", "9000"), ("5", "CAFEBABE9000")]


def test_apduplay_style_client(proxy):
    """One write with reader and command, no empty line, persistent socket."""
    with proxy.client() as c:
        for i in range(20):
            c.send(f">Emulated 02|\n>{i}:APDU:0084000008|\n")
            [(cid, result)] = c.read_response()
            assert cid == str(i)
            assert re.fullmatch(r"[0-9A-F]{16}9000", result)


def test_thousand_requests_on_one_connection_in_order(proxy):
    with proxy.client() as c:
        c.send("".join(f">Emulated 01|\n>{i}:APDU:00A4000C023F00|\n\n" for i in range(1000)))
        for i in range(1000):
            assert c.read_response() == [(str(i), "9000")]


def test_fifty_concurrent_clients_on_four_cards(proxy):
    errors = []

    def client(n):
        try:
            with proxy.client() as c:
                reader = f"Emulated 0{n % 4}"
                for i in range(40):
                    got = c.request(f">{reader}|\n>{n}-{i}a:APDU:00A4080C0450005001|\n"
                                    f">{n}-{i}b:APDU:0084000004|\n\n")
                    assert [cid for cid, _ in got] == [f"{n}-{i}a", f"{n}-{i}b"], got
                    assert got[0][1] == "9000" and re.fullmatch(r"[0-9A-F]{8}9000", got[1][1]), got
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []


def test_bad_input_never_hurts_anyone(proxy):
    good = proxy.client()
    assert good.request(">Emulated 00|\n>0:APDU:00A4000C023F00|\n\n") == [("0", "9000")]
    with proxy.client() as c:
        # invalid UTF-8 and binary garbage, a thousand junk lines
        c.send(bytes(range(256)) * 8 + b"\n" + b"junk line\n" * 1000 + b"\xff\xfe\xfd\n")
        # a reader line with no command, unknown commands, malformed APDUs
        assert c.request(">Emulated 00|\n\n>0:RESET|\n>1:FROB|\n>2:APDU:0A4|\n>3:APDU:zz00|\n>4:APDU:00|\n\n") == [
            ("0", ATR), ("1", "C081"), ("2", "C084"), ("3", "C084"), ("4", "C084")]
        too_long = "00" * 65545
        assert c.request(f">5:APDU:{too_long}|\n>6:APDU:00A4000C023F00|\n\n") == [("5", "C084"), ("6", "9000")]
        assert c.request(">Missing|\n>7:RESET|\n\n>Emulated|\n>8:RESET|\n\n".split("\n\n")[0] + "\n\n") == [
            ("7", "C083")]
        assert c.request(">Emulated|\n>8:RESET|\n\n") == [("8", "C082")]
    with proxy.client() as c:
        assert c.request(">9:APDU:00A4000C023F00|\n\n") == [("9", "C083")]  # a command with no reader
    with proxy.client() as c:  # an over-long line (default limit 256 KiB) is refused, the session goes on
        c.send(">Emulated 00|\n>10:APDU:" + "00" * 200000)
        c.send("00" * 100000 + "|\n>11:APDU:00A4000C023F00|\n\n")
        assert c.read_response() == [("10", "C084"), ("11", "9000")]
    # a client that sends half a request and vanishes
    s = socket.create_connection((HOST, proxy.port))
    s.sendall(b">Emulated 00|\n>12:EMPTYLINE|\n>13:APDU:00A4")
    s.close()
    # c's RESET (line 0 above) reset the card behind this connection: C080 once, then it runs
    assert good.request(">14:APDU:00A4000C023F00|\n\n") == [("14", "C080")]
    assert good.request(">15:APDU:00A4000C023F00|\n\n") == [("15", "9000")]
    good.close()
    assert "Traceback" not in proxy.log()
    assert "#error" not in proxy.log() and "#critical" not in proxy.log()


def test_longest_extended_apdu_is_accepted(proxy):
    data = "AB" * 65535
    apdu = "00D60000" + "00FFFF" + data + "0000"  # extended case 4: 65544 bytes
    with proxy.client() as c:
        c.request(">Emulated 00|\n>1:APDU:00A4080C0450005002|\n\n")
        [(cid, result)] = c.request(f">2:APDU:{apdu}|\n\n")
        assert (cid, result) == ("2", "6700")  # the card sees it: too long for EF 5002


def test_client_that_never_reads(proxy):
    """Back-pressure: the proxy stops reading instead of buffering without bound."""
    before = rss_kb(proxy.proc.pid)
    hog = socket.create_connection((HOST, proxy.port))
    hog.settimeout(3.0)
    request = b">*|\n>1:READERS|\n\n" * 1000
    sent = 0
    try:
        for _ in range(2000):  # up to ~17 MB of requests, ~120 MB of answers
            hog.sendall(request)
            sent += len(request)
    except socket.timeout:
        pass
    assert sent < 2000 * len(request), "the proxy kept reading from a client that never reads"
    with proxy.client(timeout=5) as c:  # everyone else is still served
        assert c.request(">Emulated 03|\n>1:APDU:00A4000C023F00|\n\n") == [("1", "9000")]
    assert rss_kb(proxy.proc.pid) - before < 30000
    hog.close()


def test_thousand_idle_connections(proxy_factory):
    proxy = proxy_factory("--max-connections-per-peer", "1100")  # all from 127.0.0.1
    before = rss_kb(proxy.proc.pid)
    idle = [socket.create_connection((HOST, proxy.port)) for _ in range(1000)]
    try:
        time.sleep(0.5)
        with proxy.client() as c:
            assert c.request(">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n") == [("1", "9000")]
        grown = rss_kb(proxy.proc.pid) - before
        assert grown < 20000, f"1000 idle connections cost {grown} kB"
        idle[0].sendall(b">Emulated 00|\n>2:RESET|\n\n")
        idle[0].settimeout(5)
        assert idle[0].recv(1000) == f">2:{ATR}\n@@\n".encode()
    finally:
        for s in idle:
            s.close()


def test_card_queue_with_latency_and_timeout(proxy_factory):
    p = proxy_factory("--backend", "emulated:?cards=2&latency_ms=1500", "--command-timeout", "1")
    with p.client() as c:
        assert c.request(">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n") == [("1", "C086")]
    p2 = proxy_factory("--backend", "emulated:?cards=1&latency_ms=50")
    results = {}

    def one(n):
        with p2.client() as c:
            results[n] = c.request(f">Emulated 00|\n>{n}:APDU:00A4000C023F00|\n\n")

    threads = [threading.Thread(target=one, args=(n,)) for n in range(10)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - start
    assert results == {n: [(str(n), "9000")] for n in range(10)}
    assert elapsed >= 0.45  # one command at a time on the card: 10 x 50 ms


@pytest.mark.parametrize("max_conn", [3])
def test_max_connections_closes_extra(proxy_factory, max_conn):
    p = proxy_factory("--max-connections", str(max_conn))
    keep = [p.client() for _ in range(max_conn)]
    for c in keep:
        assert c.request(">Emulated 00|\n>1:RESET|\n\n") == [("1", ATR)]
    extra = LineClient(HOST, p.port, timeout=5)
    with pytest.raises((ConnectionError, OSError)):
        extra.request(">Emulated 00|\n>1:RESET|\n\n")
    for c in keep:
        c.close()


def test_log_level(proxy_factory):
    quiet = proxy_factory("--log-level", "warn")
    chatty = proxy_factory("--log-level", "debug")
    for p in (quiet, chatty):
        with p.client() as c:
            assert c.request(">Emulated 00|\n#a client signal\n>1:PERSONALIZE:tester|\n\n") == [("1", "OK")]
    time.sleep(0.3)
    assert "reader added" not in quiet.log() and "personalized" not in quiet.log()
    assert "reader added: Emulated 00" in chatty.log()
    assert "client signal '#a client signal'" in chatty.log()
