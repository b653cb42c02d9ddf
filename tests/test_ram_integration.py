"""RAMOverHTTP end to end on real processes: proxy A's emulated card driven
through A's ``--ram-connect`` by proxy B's ``--ram`` server, while line
clients of B use reader ``RAM alice``; the client against a plain HTTP
server answering 404/504/500; and a headless Chromium page triggering
``--ram-daemon`` (docs/ramoverhttp.md)."""

import base64
import http.client
import http.server
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

from support import HOST, wait_for
from test_vpcd_integration import slot  # noqa: F401  (fixture: vpcd slot 1, no vicc)

from cloudfoxy_proxy.frontends import ramwire as wire

SECRET = "aliceSecret1"
SELECT_MF = "00A4000C023F00"


def readers(proxy):
    with proxy.client() as c:
        [(_, listing)] = c.request(">|\n>1:READERS|\n\n")
    return [base64.b64decode(n).decode() for n in listing.split("|") if n]


def token_file(tmp_path):
    path = tmp_path / "ram-tokens"
    path.write_text(f"# RAM users\nalice {SECRET}\nbob bobSecret2\n")
    return str(path)


def start_server(proxy_factory, tmp_path, *args):
    b = proxy_factory("--ram", f"tcp:0:interface={HOST}", "--ram-token-file", token_file(tmp_path),
                      *args, listeners=2 + sum(a in ("--rest",) for a in args))
    b.ram_port = b.ports["RamSite"][0]
    b.ram_url = f"http://{HOST}:{b.ram_port}/rt/{SECRET}"
    return b


def start_pair(proxy_factory, tmp_path, b_args=(), a_args=()):
    b = start_server(proxy_factory, tmp_path, *b_args)
    a = proxy_factory("--ram-connect", f"{b.ram_url}=Emulated 00", *a_args)
    wait_for(lambda: "RAM alice" in readers(b), what="reader RAM alice on B")
    return a, b


def test_line_client_of_b_drives_a_card_of_a(proxy_factory, tmp_path):
    rest_token = tmp_path / "rest-token"
    rest_token.write_text("resttoken\n")
    a, b = start_pair(proxy_factory, tmp_path,
                      b_args=("--rest", f"tcp:0:interface={HOST}", "--rest-token-file", str(rest_token)))
    with b.client() as c:
        # B's own emulated card is the same kind as A's: its answers are what to expect
        [(_, own_atr), (_, own_fcp)] = c.request(">Emulated 00|\n>1:RESET|\n>2:APDU:00A40000023F00|\n\n")
        results = c.request(f">RAM alice|\n>1:APDU:{SELECT_MF}|\n>2:APDU:0084000008|\n"
                            ">3:APDU:0084000008|\n>4:RESET|\n>5:APDU:00A40000023F00|\n\n")
    assert results[0] == ("1", "9000")
    assert re.fullmatch("[0-9A-F]{16}9000", results[1][1])
    assert re.fullmatch("[0-9A-F]{16}9000", results[2][1]) and results[1] != results[2]
    assert results[3] == ("4", own_atr)
    assert results[4] == ("5", own_fcp) and own_fcp == "610C"  # SELECT with FCP: 12 bytes to GET
    # the REST inventory of B lists the card with the ATR of its E8
    request = urllib.request.Request(f"http://{HOST}:{b.ports['Site'][0]}/api/v1/inventory",
                                     headers={"X-Auth-Token": "resttoken"})
    with urllib.request.urlopen(request, timeout=10) as r:
        assert f"/RAM_alice {own_atr}" in r.read().decode().splitlines()
    # and a REST client of B runs APDUs on it (one AA script of two commands)
    request = urllib.request.Request(
        f"http://{HOST}:{b.ports['Site'][0]}/api/v1/basic?terminal=/RAM_alice&apdu={SELECT_MF}&apdu=0084000008",
        headers={"X-Auth-Token": "resttoken"})
    with urllib.request.urlopen(request, timeout=10) as r:
        lines = r.read().decode().splitlines()
    assert lines[0] == "9000" and re.fullmatch("[0-9A-F]{16}9000", lines[1])
    assert b.log().count("RAM session of alice began") == 1


def test_300_apdus_in_one_request(proxy_factory, tmp_path):
    a, b = start_pair(proxy_factory, tmp_path, b_args=("--log-level", "debug"))
    for count in (20, 300):  # AA/AB with 81 and with 82 lengths
        text = ">RAM alice|\n" + "".join(f">{i}:APDU:{SELECT_MF}|\n" for i in range(count)) + "\n"
        with b.client(timeout=30) as c:
            results = c.request(text)
        assert results == [(str(i), "9000") for i in range(count)]


def test_silent_client_is_kept_alive_45_seconds(proxy_factory, tmp_path):
    a, b = start_pair(proxy_factory, tmp_path, b_args=("--log-level", "debug"))
    before = b.log().count("RAM POST -> 200")
    time.sleep(45)  # no command: the held POST is answered AA 00 (keep-alive) and posted again
    assert b.log().count("RAM POST -> 200") >= before + 1
    with b.client() as c:
        assert c.request(f">RAM alice|\n>1:APDU:{SELECT_MF}|\n\n") == [("1", "9000")]
    assert "ended" not in b.log() and "failed" not in a.log()


def test_killed_client_reader_gone_c080(proxy_factory, tmp_path):
    # no certificate probe: A is killed while it holds a POST, not while it
    # runs a probe's script (that case: test_ram_exactly_once_integration.py)
    a, b = start_pair(proxy_factory, tmp_path, b_args=("--ram-session-timeout", "3", "--no-signing"))
    a.kill()
    # B has seen the held POST's connection go before the request: the
    # client can post again, so its 3 s of silence count from then
    wait_for(lambda: "the connection of the held POST was lost" in b.log(), timeout=10, what="held POST lost")
    with b.client(timeout=20) as c:
        started = time.monotonic()
        got = c.request(f">RAM alice|\n>1:APDU:{SELECT_MF}|\n>2:APDU:{SELECT_MF}|\n\n")
        assert time.monotonic() - started < 10
    assert got == [("1", "C080"), ("2", "C080")]
    wait_for(lambda: "RAM alice" not in readers(b), timeout=10, what="RAM alice removed")
    with b.client() as c:
        assert c.request(f">RAM alice|\n>1:APDU:{SELECT_MF}|\n\n") == [("1", "C083")]


def _post(port, body, cookie=None, conn=None):
    conn = conn or http.client.HTTPConnection(HOST, port, timeout=40)
    headers = {"Content-Type": wire.REQUEST_TYPE.decode()}
    if cookie:
        headers["Cookie"] = f"JSESSIONID={cookie}"
    conn.request("POST", f"/rt/{SECRET}", body=body, headers=headers)
    r = conn.getresponse()
    return conn, r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()


def post_and_reset(port, body, cookie, conn):
    """POST ``body`` on ``conn`` and drop the connection at once with a
    reset (SO_LINGER 0): the proxy reads the POST, and its answer cannot be
    written (the connection died before the response was written)."""
    headers = {"Content-Type": wire.REQUEST_TYPE.decode(), "Cookie": f"JSESSIONID={cookie}"}
    conn.request("POST", f"/rt/{SECRET}", body=body, headers=headers)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_duplicate_answer_and_404_on_real_server(proxy_factory, tmp_path):
    b = start_server(proxy_factory, tmp_path, "--no-signing")  # no certificate probe on the card
    # a wrong secret: 404, no cookie, no session
    conn = http.client.HTTPConnection(HOST, b.ram_port, timeout=10)
    conn.request("POST", "/rt/wrong", body=b"\xE8\x00")
    r = conn.getresponse()
    assert r.status == 404 and r.getheader("Set-Cookie") is None
    r.read()
    # a session by hand (OCF's -s ID: the client's JSESSIONID)
    atr = bytes.fromhex("3B8B8001466F7879456D753738313677")
    results = {}

    def line(key, text):
        with b.client(timeout=30) as c:
            results[key] = c.request(text)

    holder = {}

    def first():
        holder["r"] = _post(b.ram_port, wire.encode_initiation(atr), "web-7")

    t = threading.Thread(target=first)
    t.start()
    wait_for(lambda: "RAM alice" in readers(b), what="RAM alice")
    l1 = threading.Thread(target=line, args=("a", f">RAM alice|\n>1:APDU:{SELECT_MF}|\n\n"))
    l1.start()
    t.join(30)
    conn1, status, headers, script1 = holder["r"]
    assert status == 200 and headers["content-length"] == str(len(script1))
    assert "JSESSIONID=web-7" in headers["set-cookie"]
    assert wire.decode_script(wire.template(script1)[1]) == [(wire.APDU, bytes.fromhex(SELECT_MF))]
    # the second command waits behind the first; then the answer to the first
    l2 = threading.Thread(target=line, args=("b", ">RAM alice|\n>1:APDU:0084000008|\n\n"))
    l2.start()
    time.sleep(0.5)
    ab1 = wire.encode_answer([(wire.RESPONSE, b"\x90\x00")])
    # the connection dies before the answer (script 2) is written
    post_and_reset(b.ram_port, ab1, "web-7", conn1)
    l1.join(10)
    assert results["a"] == [("1", "9000")]
    # the identical AB on a new connection: script 2, not taken as its answer
    conn2, status, _, script2 = _post(b.ram_port, ab1, "web-7")
    assert status == 200
    assert wire.decode_script(wire.template(script2)[1]) == [(wire.APDU, bytes.fromhex("0084000008"))]
    assert "the previous answer sent again" in b.log()

    def answer2():
        holder["r2"] = _post(b.ram_port, wire.encode_answer(
            [(wire.RESPONSE, bytes.fromhex("01020304050607089000"))]), "web-7", conn2)

    t2 = threading.Thread(target=answer2)
    t2.start()
    l2.join(10)
    assert results["b"] == [("1", "01020304050607089000")]
    b.stop()  # the held POST is answered 204 when the proxy stops
    t2.join(10)
    assert holder["r2"][1] == 204 and holder["r2"][2]["content-length"] == "0"
    assert b.log().count("RAM session of alice began") == 1


class _Answers(http.server.BaseHTTPRequestHandler):
    """Answers POST /<status> with that status and records what came."""

    seen = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, dict(self.headers), body))
        code = int(self.path.strip("/").split("/")[0])
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_client_follows_404_504_500(proxy_factory):
    server = http.server.ThreadingHTTPServer((HOST, 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        a = proxy_factory(*[arg for code in (404, 504, 500)
                            for arg in ("--ram-connect", f"http://{HOST}:{port}/{code}/rt/x=Emulated 00")])
        wait_for(lambda: len(_Answers.seen) >= 3 and a.log().count("failed:") >= 3, what="three sessions")
        log = a.log()
        assert "404 (not a RAM URL, or a wrong secret)" in log
        assert "504 (the server aborted the session)" in log
        assert "HTTP status 500" in log
        for path, headers, body in _Answers.seen:
            assert headers["Content-Type"] == wire.REQUEST_TYPE.decode()
            assert headers["X-Admin-Protocol"] == wire.ADMIN_PROTOCOL.decode()
            tag, items = wire.template(body)
            assert tag == wire.INITIATE and items[0][0] == wire.ATR
        assert len(_Answers.seen) == 3  # each answer ended its session: nothing re-sent
        with a.client() as c:  # every session let the card go
            assert c.request(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == [("1", "9000")]
    finally:
        server.shutdown()
        server.server_close()


PAGE = """<!doctype html><html><body><p id="result">pending</p>
<img id="ram" src="{src}"
 onload="document.getElementById('result').textContent = this.naturalWidth == 24 ? 'passed' : 'failed'"
 onerror="document.getElementById('result').textContent = 'error'">
</body></html>"""


def test_browser_triggers_daemon_session(proxy_factory, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "install Debian's chromium (tests/debian-packages.txt)"
    b = start_server(proxy_factory, tmp_path, "--ram-done-after", "5")
    approved = tmp_path / "approved"
    approved.write_text(f"# card update servers\nhttp://{HOST}:{b.ram_port}/rt/\n")
    a = proxy_factory("--ram-daemon", f"tcp:0:interface={HOST}", "--ram-approved-urls", str(approved),
                      "--ram-reader", "Emulated 00", listeners=2)
    daemon = a.ports["RamDaemonSite"][0]
    src = f"http://{HOST}:{daemon}/update.png?url={b.ram_url}&sessionId=browser-1"
    page = PAGE.format(src=src)

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((HOST, 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = tempfile.mkdtemp(prefix="ram-chromium-")
    try:
        browser = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
             "--no-first-run", "--dump-dom", f"http://{HOST}:{server.server_address[1]}/page.html"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        # while the page waits for its image, a line client of B uses the browser user's card
        wait_for(lambda: "RAM alice" in readers(b), timeout=60, what="the daemon's session on B")
        with b.client() as c:
            assert c.request(f">RAM alice|\n>1:APDU:{SELECT_MF}|\n\n") == [("1", "9000")]
        out, _ = browser.communicate(timeout=90)
        assert '<p id="result">passed</p>' in out.decode(), out.decode()[-2000:]
        assert "JSESSIONID=browser-1" not in b.log()  # the id is not logged
        # an unapproved URL starts nothing and answers the failed image
        with urllib.request.urlopen(f"http://{HOST}:{daemon}/x.png?url=http://{HOST}:1/rt/x&sessionId=s",
                                    timeout=10) as r:
            body = r.read()
            assert r.headers["Content-Type"] == "image/png"
            assert r.headers["Cache-Control"] == "no-store"
            assert int.from_bytes(body[16:20], "big") == 12  # the failed image
        with urllib.request.urlopen(f"http://{HOST}:{daemon}/x.png?url={b.ram_url}&sessionId=s&pinrequired=1",
                                    timeout=10) as r:
            assert int.from_bytes(r.read()[16:20], "big") == 12
            assert "pinrequired" in r.headers["X-Ram-Result"]
        assert b.log().count("RAM session of alice began") == 1
    finally:
        if browser.poll() is None:
            browser.kill()
            browser.wait(10)
        server.shutdown()
        server.server_close()
        shutil.rmtree(profile, ignore_errors=True)


def test_ram_reader_bridged_into_pcsc(proxy_factory, tmp_path, slot):
    """B's reader RAM alice (A's card) as a local PC/SC card through --vpcd."""
    from test_vpcd_integration import EMULATED_ATR, SLOT, close, connect

    b = start_server(proxy_factory, tmp_path, "--no-signing",
                     "--vpcd", f"127.0.0.1:{slot.port(SLOT)}=RAM alice")
    a = proxy_factory("--ram-connect", f"{b.ram_url}=Emulated 00")
    try:
        slot.wait_card(SLOT, True, 30)
        conn = connect()
        try:
            assert bytes(conn.getATR()) == EMULATED_ATR
            data, sw1, sw2 = conn.transmit(list(bytes.fromhex(SELECT_MF)))
            assert (data, sw1, sw2) == ([], 0x90, 0x00)
            data, sw1, sw2 = conn.transmit(list(bytes.fromhex("0084000008")))
            assert (len(data), sw1, sw2) == (8, 0x90, 0x00)
        finally:
            close(conn)
    finally:
        a.stop()
        b.stop()
