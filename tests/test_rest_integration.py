"""The REST front end and the ``cloudfoxy+http(s)://`` backend for real, on
loopback: proxy A serves emulated cards over ``--rest``; proxy B reaches
them through its REST backend; line-protocol clients talk to B.  Failures
are injected with the scripted CloudFoxy stub (tests/cloudfoxy_stub.py)."""

import base64
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from support import HOST, wait_for
from test_rest_backend import make_tls_files

TOKEN = "rest-integration-token"
ATR = "3B8B8001466F7879456D753738313677"
SELECT_MF = "00A4000C023F00"
STUB = os.path.join(os.path.dirname(__file__), "cloudfoxy_stub.py")


def names(listing):
    return [base64.b64decode(n).decode() for n in listing.split("|")] if listing else []


def readers(proxy):
    with proxy.client() as c:
        return names(c.results(">*|\n>1:READERS|\n\n")[0])


def one(proxy, reader, command):
    """The result of one command on ``reader`` through ``proxy``'s line protocol."""
    with proxy.client(timeout=15) as c:
        return c.results(f">{reader}|\n>1:{command}|\n\n")[0]


class Rest:
    """A blocking REST client with one keep-alive connection."""

    def __init__(self, port, token=TOKEN, host=HOST):
        self.conn = http.client.HTTPConnection(host, port, timeout=10)
        self.token = token

    def get(self, path, **params):
        if params:
            path += "?" + urllib.parse.urlencode(params)
        headers = {"X-Auth-Token": self.token} if self.token is not None else {}
        self.conn.request("GET", path, headers=headers)
        response = self.conn.getresponse()
        return response.status, response.read().decode()

    def close(self):
        self.conn.close()


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest.fixture
def proxy_a(proxy_factory):
    """Proxy A: 4 emulated cards, served over REST too."""
    return proxy_factory("--rest", "tcp:0:interface=127.0.0.1", listeners=2,
                         env={"FOXYPROXY_REST_TOKEN": TOKEN})


def rest_port(proxy):
    return proxy.ports["Site"][0]


def test_b_reaches_a_cards_over_rest(proxy_factory, proxy_a, token_file):
    url = f"cloudfoxy+http://127.0.0.1:{rest_port(proxy_a)}?token_file={token_file}"
    b = proxy_factory("--backend", url, "--command-timeout", "5")
    started = time.monotonic()
    first = wait_for(lambda: one(b, "Emulated_01", f"APDU:{SELECT_MF}") == "9000", timeout=5)
    elapsed = time.monotonic() - started
    assert first and elapsed < 2.0, elapsed
    assert readers(b) == [f"CloudFoxy Emulated_0{i}" for i in range(4)]
    with b.client() as c:
        results = c.results(f">CloudFoxy Emulated_02|\n>1:RESET|\n>2:APDU:{SELECT_MF}|\n"
                            f">3:APDU:0084000008|\n>4:APDU:0084000008|\n\n")
    assert results[:2] == [ATR, "9000"]
    for challenge in results[2:]:
        assert re.fullmatch(r"[0-9A-F]{16}9000", challenge), challenge
    assert results[2] != results[3]
    # native and foxyproxy names of A's cards work on B too
    assert one(b, "/Emulated_03", f"APDU:{SELECT_MF}") == "9000"
    assert one(b, "Foxy USB /Emulated_03", "RESET") == ATR
    assert one(b, "CloudFoxy Nope", "RESET") == "C083"
    assert re.fullmatch(r"[0-9A-F]{4}", one(b, "Emulated_01", "APDU:00D60000004E20" + "AB" * 20000))


def test_token_from_environment_and_wrong_token(proxy_factory, proxy_a):
    url = f"cloudfoxy+http://127.0.0.1:{rest_port(proxy_a)}"
    b = proxy_factory("--backend", url, env={"FOXYPROXY_TOKEN": TOKEN})
    assert wait_for(lambda: len(readers(b)) == 4, timeout=5)
    bad = proxy_factory("--backend", url, env={"FOXYPROXY_TOKEN": "not-the-token"})
    assert wait_for(lambda: "HTTP 401 (is the token right?)" in bad.log(), timeout=5)
    assert readers(bad) == []
    assert "not-the-token" not in bad.log() and TOKEN not in b.log()


def test_120_cards_start_fast(proxy_factory, token_file):
    a = proxy_factory("--backend", "emulated:?cards=120", "--rest", "tcp:0:interface=127.0.0.1",
                      listeners=2, env={"FOXYPROXY_REST_TOKEN": TOKEN})
    url = f"cloudfoxy+http://127.0.0.1:{rest_port(a)}?token_file={token_file}"
    b = proxy_factory("--backend", url)
    started = time.monotonic()
    assert wait_for(lambda: one(b, "CloudFoxy Emulated_119", f"APDU:{SELECT_MF}") == "9000", timeout=5)
    assert time.monotonic() - started < 2.0
    assert len(readers(b)) == 120


def test_rest_front_end_directly(proxy_a):
    rest = Rest(rest_port(proxy_a))
    try:
        status, hello = rest.get("/api/v1/hello")
        assert status == 200 and int(hello.splitlines()[1].split()[1]) >= 0
        assert rest.get("/api/v1/inventory") == (200, "".join(f"/Emulated_0{i} {ATR}\n" for i in range(4)))
        assert rest.get("/api/v1/basic", terminal="/Emulated 00", reset=1) == (200, ATR + "\n")
        assert rest.get("/api/v1/basic", terminal="/Emulated 00", reset=0, apdu=SELECT_MF) == (200, "9000\n")
        assert rest.get("/api/v1/basic", terminal="/Nope", reset=0, apdu=SELECT_MF) == (
            404, "C083 terminal not found: /Nope\n")
        assert rest.get("/api/v1/basic", terminal="/Emulated 00", apdu="XYZ")[0] == 400
        # an extended APDU of 20 000 data bytes: a 40 KB request line is accepted
        status, body = rest.get("/api/v1/basic", terminal="/Emulated 00", apdu="00D60000004E20" + "AB" * 20000)
        assert status == 200 and re.fullmatch(r"[0-9A-F]{4}\n", body), (status, body)
        rest.token = "wrong"
        assert rest.get("/api/v1/hello")[0] == 401
    finally:
        rest.close()
    assert "Site starting on" in proxy_a.log()
    assert "/api/v1/" not in proxy_a.log()  # the access log stays quiet at info level


def test_rest_and_line_clients_share_a_card(proxy_factory):
    a = proxy_factory("--backend", "emulated:?cards=2&latency_ms=2", "--rest", "tcp:0:interface=127.0.0.1",
                      listeners=2, env={"FOXYPROXY_REST_TOKEN": TOKEN})
    failures = []

    def rest_worker():
        rest = Rest(rest_port(a))
        try:
            for _ in range(30):
                got = rest.get("/api/v1/basic", terminal="/Emulated 00", apdu="0084000008")
                if got[0] != 200 or not re.fullmatch(r"[0-9A-F]{16}9000\n", got[1]):
                    failures.append(got)
        finally:
            rest.close()

    def line_worker():
        with a.client() as c:
            for _ in range(30):
                got = c.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n>2:APDU:0084000008|\n\n")
                if got[0] != "9000" or not re.fullmatch(r"[0-9A-F]{16}9000", got[1]):
                    failures.append(got)

    threads = [threading.Thread(target=w) for w in [rest_worker] * 4 + [line_worker] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []


def ssl_port(proxy, timeout=20):
    found = wait_for(lambda: re.findall(r"Site \(TLS\) starting on (\d+)", proxy.log()), timeout=timeout)
    assert found, proxy.log()
    return int(found[0])


def test_https_with_private_ca_and_client_certificate(proxy_factory, tmp_path, token_file):
    paths = make_tls_files(str(tmp_path))
    a = proxy_factory("--rest", f"ssl:0:interface=127.0.0.1:privateKey={paths['server-key']}"
                                f":certKey={paths['server-cert']}",
                      env={"FOXYPROXY_REST_TOKEN": TOKEN})
    port = ssl_port(a)
    url = (f"cloudfoxy+https://localhost:{port}?token_file={token_file}&ca={paths['ca']}"
           f"&cert={paths['client-cert']}&key={paths['client-key']}")
    b = proxy_factory("--backend", url)
    assert wait_for(lambda: one(b, "CloudFoxy Emulated_00", f"APDU:{SELECT_MF}") == "9000", timeout=5)
    # by IP address too (the certificate names 127.0.0.1)
    b_ip = proxy_factory("--backend", url.replace("localhost", "127.0.0.1"))
    assert wait_for(lambda: len(readers(b_ip)) == 4, timeout=5)
    # a server whose certificate the CA does not vouch for is refused
    other = proxy_factory("--backend", f"cloudfoxy+https://localhost:{port}?token_file={token_file}"
                                       f"&ca={paths['other-ca']}")
    assert wait_for(lambda: "cannot read hello/inventory" in other.log(), timeout=5), other.log()
    assert "certificate verify failed" in other.log()
    assert readers(other) == []


class StubServer:
    """tests/cloudfoxy_stub.py in its own process."""

    def __init__(self, token=TOKEN, cards=4):
        self.proc = subprocess.Popen([sys.executable, STUB, "--port", "0", "--token", token,
                                      "--cards", str(cards), "--stop-after", "120"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        match = re.match(r"port (\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"stub did not start: {line}{self.proc.stdout.read()}")
        self.port = int(match.group(1))

    def _get(self, path):
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("GET", path)
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def control(self, **params):
        assert self._get("/_stub/control?" + urllib.parse.urlencode(params)).strip() == "OK"

    def stats(self):
        return json.loads(self._get("/_stub/stats"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()


@pytest.fixture
def stub():
    server = StubServer()
    yield server
    server.stop()


@pytest.fixture
def proxy_b(proxy_factory, stub, token_file):
    url = f"cloudfoxy+http://127.0.0.1:{stub.port}?token_file={token_file}&poll=0.3"
    # --no-signing: no certificate probes of arriving cards, whose /basic
    # calls would run into the stub's failure modes and its counters
    b = proxy_factory("--backend", url, "--command-timeout", "1", "--no-signing")
    assert wait_for(lambda: len(readers(b)) == 4, timeout=5)
    return b


def card(n):
    return f"CloudFoxy 127.0.0.1@{n}"


def test_http_errors_and_hardware_errors(proxy_b, stub):
    b = proxy_b
    assert one(b, card(1), f"APDU:{SELECT_MF}") == "9000"
    stub.control(status=500)
    before = stub.stats()["basic"]
    assert one(b, card(1), f"APDU:{SELECT_MF}") == "C086"
    assert stub.stats()["basic"] == before + 1  # never retried
    assert wait_for(lambda: "APDU on /127.0.0.1@1 failed: HTTP 500" in b.log(), timeout=2)
    stub.control(status=200)
    assert one(b, card(1), f"APDU:{SELECT_MF}") == "9000"  # recovers

    before = stub.stats()["basic"]
    stub.control(hw=2)
    assert one(b, card(2), f"APDU:{SELECT_MF}") == "9000"  # third try succeeds
    assert stub.stats()["basic"] == before + 3
    stub.control(hw=5)
    assert one(b, card(2), f"APDU:{SELECT_MF}") == "C000"  # returned after three tries
    assert stub.stats()["basic"] == before + 6
    stub.control(hw=0)
    assert one(b, card(2), "RESET") == ATR


def test_slow_body_times_out_and_is_aborted(proxy_b, stub):
    b = proxy_b
    stub.control(slow=8)
    started = time.monotonic()
    assert one(b, card(3), f"APDU:{SELECT_MF}") == "C086"
    assert time.monotonic() - started < 5  # --command-timeout 1, not the 8 s body
    assert wait_for(lambda: stub.stats()["aborted"] == 1, timeout=5), stub.stats()  # the HTTP request was really cut
    assert "command timed out after 1.0s" in b.log()
    stub.control(slow=0)
    assert one(b, card(3), f"APDU:{SELECT_MF}") == "9000"
    # other cards were never blocked by the slow one
    stub.control(slow=8)
    with b.client(timeout=15) as slow_client:
        before = stub.stats()["basic"]
        slow_client.send(f">{card(3)}|\n>1:APDU:{SELECT_MF}|\n\n")
        assert wait_for(lambda: stub.stats()["basic"] > before, timeout=5)  # at the server, slowly
        stub.control(slow=0)
        assert one(b, card(4), f"APDU:{SELECT_MF}") == "9000"
        assert slow_client.read_response() == [("1", "C086")]


def test_connection_refused_then_recovery(proxy_b, stub):
    b = proxy_b
    stub.control(down=4)
    time.sleep(0.3)
    started = time.monotonic()
    assert one(b, card(1), f"APDU:{SELECT_MF}") == "C086"
    assert time.monotonic() - started < 1.0 + 2.0  # refused at once, not a timeout
    assert "connection refused" in b.log()
    assert wait_for(lambda: one(b, card(1), f"APDU:{SELECT_MF}") == "9000", timeout=12)
    assert readers(b) == [card(n) for n in (1, 2, 3, 4)]  # cards stay listed while the server is away


def test_restart_with_a_new_inventory(proxy_b, stub):
    b = proxy_b
    time.sleep(1.1)  # let the stub's uptime grow past 0, so a restart shows
    stub.control(restart=1, cards="2,3,5")
    assert wait_for(lambda: readers(b) == [card(2), card(3), card(5)], timeout=5), readers(b)
    assert "restarted" in b.log()
    assert one(b, card(1), f"APDU:{SELECT_MF}") == "C083"
    assert one(b, card(5), f"APDU:{SELECT_MF}") == "9000"
    assert one(b, card(5), "RESET") == ATR
