"""The line protocol refuses HTTP (docs/protocol.md "HTTP requests are
refused"): a web page's ``fetch``/form POST to the line port carries
line-protocol lines in its body; the connection is closed at its request
line (or any browser header line) and nothing of it runs on a card.

In memory with StringTransport and the emulated cards, then against a real
``twistd foxyproxy`` process, then from headless chromium's page."""

import functools
import http.server
import shutil
import socket
import threading
import time

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from cloudfoxy_proxy.frontends.line import http_line
from support import HOST, browser_dom, chromium_path, wait_for
from test_server import ATR, Harness, take
from test_telnet import PLINK, SUBNEGOTIATION

#: The line-protocol requests a hostile page puts in its POST body: select
#: the emulated card's EF 5001 and write DEADBEEF into it.
BODY = b">Emulated 00|\n>1:APDU:00A4080C0450005001|\n>2:APDU:00D6000004DEADBEEF|\n\n"
READ_EF = ">Emulated 00|\n>1:APDU:00A4080C0450005001|\n>2:APDU:00B0000004|\n\n"


def browser_post(port=4001, body=BODY):
    """What chromium sends for ``fetch('http://127.0.0.1:PORT/', {method:
    'POST', mode: 'no-cors', body})`` from another origin's page."""
    return (b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: keep-alive\r\n"
            b"Content-Length: %d\r\nsec-ch-ua-platform: \"Linux\"\r\n"
            b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0.0.0 Safari/537.36\r\n"
            b"Content-Type: text/plain;charset=UTF-8\r\nAccept: */*\r\n"
            b"Origin: https://evil.example\r\nSec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: no-cors\r\n"
            b"Sec-Fetch-Dest: empty\r\nReferer: https://evil.example/\r\n"
            b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n\r\n"
            % (port, len(body))) + body


def ef_5001(card):
    """The content of the emulated card's writable EF 5001."""
    return bytes(card.mf.children[0x5000].children[0x5001].data)


class CrossProtocolTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness(max_line_length=1024)
        self.calls = []  # (card number, APDU or "RESET") of everything that reached an emulated card
        for n, card in enumerate(self.h.emulated.cards):
            self._spy(n, card)
        self.before = [ef_5001(card) for card in self.h.emulated.cards]

    def _spy(self, n, card):
        transmit, reset = card.transmit, card.reset

        def spied_transmit(apdu):
            self.calls.append((n, bytes(apdu).hex().upper()))
            return transmit(apdu)

        def spied_reset():
            self.calls.append((n, "RESET"))
            return reset()

        card.transmit, card.reset = spied_transmit, spied_reset

    def assertClosedUnanswered(self, transport):
        self.assertEqual(transport.value(), b"")  # no answer, not even @@
        self.assertTrue(transport.disconnecting)

    def assertNothingRan(self):
        self.assertEqual(self.calls, [])
        self.assertEqual([ef_5001(card) for card in self.h.emulated.cards], self.before)
        self.assertEqual(self.h.factory.requests, 0)

    def assertOpen(self, transport):
        self.assertFalse(transport.disconnecting)

    def test_browser_post_runs_nothing_on_the_card(self):
        proto, t = self.h.connect()
        proto.dataReceived(browser_post())
        self.assertClosedUnanswered(t)
        self.assertTrue(t.disconnected)  # aborted, not waiting for the peer
        self.assertNothingRan()
        self.assertEqual(self.h.factory.cross_protocol, 1)
        # the card still holds what it held: a normal client reads zeros
        proto2, t2 = self.h.connect()
        proto2.dataReceived(READ_EF.encode())
        self.assertEqual(take(t2), ">1:9000\n>2:000000009000\n@@\n")

    def test_browser_post_arriving_a_byte_at_a_time(self):
        proto, t = self.h.connect()
        for byte in browser_post():
            proto.dataReceived(bytes([byte]))
        self.assertClosedUnanswered(t)
        self.assertNothingRan()

    def test_head_and_body_in_separate_reads(self):
        data = browser_post()
        head, _, body = data.partition(b"\r\n\r\n")
        proto, t = self.h.connect()
        proto.dataReceived(head + b"\r\n\r\n")
        proto.dataReceived(body)
        self.assertClosedUnanswered(t)
        self.assertNothingRan()

    def test_every_request_line_closes(self):
        for line in (b"GET / HTTP/1.1", b"POST / HTTP/1.1", b"PUT /x HTTP/1.1", b"HEAD / HTTP/1.0",
                     b"OPTIONS * HTTP/1.1", b"OPTIONS / HTTP/1.1", b"DELETE /a?b=c HTTP/1.1",
                     b"PATCH / HTTP/1.1", b"CONNECT 127.0.0.1:4001 HTTP/1.1", b"TRACE / HTTP/1.1",
                     b"PRI * HTTP/2.0", b"GET http://127.0.0.1:4001/ HTTP/1.1", b"get / http/1.1",
                     b"M-SEARCH * HTTP/1.1", b"FOO /bar HTTP/1.1", b"GET  /  HTTP/1.1  "):
            for ending in (b"\r\n", b"\n"):
                proto, t = self.h.connect()
                proto.dataReceived(line + ending + BODY)
                self.assertClosedUnanswered(t)
        self.assertNothingRan()

    def test_browser_header_lines_close(self):
        for line in (b"Host: 127.0.0.1:4001", b"host:127.0.0.1", b"HOST : x", b"Origin: null",
                     b"User-Agent: Mozilla/5.0", b"Content-Type: text/plain", b"Sec-Fetch-Mode: no-cors",
                     b"sec-fetch-site: cross-site", b"Referer: https://evil.example/",
                     b"Content-Length: 60", b"Upgrade: websocket", b"Sec-WebSocket-Key: x"):
            # a header line inside the request it would belong to: that request never runs
            proto, t = self.h.connect()
            proto.dataReceived(b">Emulated 00|\n>1:APDU:00A4080C0450005001|\n" + line
                               + b"\r\n>2:APDU:00D6000004DEADBEEF|\n\n")
            self.assertClosedUnanswered(t)
        self.assertNothingRan()

    def test_over_long_request_line_then_headers(self):
        # a page can make its request line longer than --max-line-length
        # (here 1024): its start, then its Host: line, close the connection
        target = b"/" + b"a" * 5000
        for data in (b"POST " + target + b" HTTP/1.1\r\n" + BODY,
                     b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1:4001\r\n\r\n" + BODY):
            proto, t = self.h.connect()
            proto.dataReceived(data)
            self.assertClosedUnanswered(t)
        self.assertNothingRan()
        # an over-long line that is not HTTP is dropped as before
        proto, t = self.h.connect()
        proto.dataReceived(b"x" * 5000 + b"\n" + READ_EF.encode())
        self.assertEqual(take(t), ">1:9000\n>2:000000009000\n@@\n")
        self.assertOpen(t)

    def test_later_http_line_stops_what_follows(self):
        proto, t = self.h.connect()
        proto.dataReceived(b">Emulated 00|\n>1:APDU:00A4080C0450005001|\n\n")
        self.assertEqual(take(t), ">1:9000\n@@\n")
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n>Emulated 00|\n>2:APDU:00D6000004DEADBEEF|\n\n")
        self.assertClosedUnanswered(t)
        self.assertEqual(self.calls, [(0, "00A4080C0450005001")])
        self.assertEqual(ef_5001(self.h.emulated.cards[0]), self.before[0])

    def test_http_line_queued_behind_a_running_request(self):
        # the request before it waits on a card; the HTTP line and the
        # request after it are read meanwhile, and the later one never runs
        proto, t = self.h.connect()
        proto.dataReceived(b">Slow A|\n>1:APDU:00A4000C023F00|\n\nPOST / HTTP/1.1\r\nHost: x\r\n\r\n"
                           b">Slow A|\n>2:APDU:00D6000004DEADBEEF|\n\n")
        [(key, apdu, d)] = self.h.manual.calls
        self.assertEqual(apdu, "00A4000C023F00")
        d.callback(b"\x90\x00")
        self.assertTrue(t.disconnecting)
        self.assertNotIn(b">2:", t.value())
        self.assertEqual(len(self.h.manual.calls), 1)

    def test_one_rate_limited_line_naming_the_peer(self):
        with capturedLogs() as events:
            proto, t = self.h.connect()
            proto.dataReceived(browser_post())  # many HTTP lines: one log line
        lines = [formatEvent(e) for e in events if "cross-protocol" in (e.get("log_format") or "")]
        self.assertEqual(lines, ["client 127.0.0.1:40000: closed: an HTTP request line on the line-protocol "
                                 "port (cross-protocol request, e.g. from a web page)"])
        with capturedLogs() as events:
            for _ in range(30):  # a page retrying in a loop
                proto, t = self.h.connect()
                proto.dataReceived(browser_post())
            self.h.clock.advance(11)
        text = [formatEvent(e) for e in events]
        self.assertEqual(sum("cross-protocol" in line for line in text), 9)  # 10 per 10 s in all
        self.assertIn("21 more client log lines suppressed in the last 10 s", text)
        self.assertEqual(self.h.factory.cross_protocol, 31)

    def test_peer_of_another_address_is_named(self):
        proto = self.h.factory.buildProtocol(None)
        t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5678))
        proto.makeConnection(t)
        with capturedLogs() as events:
            proto.dataReceived(b"Host: 127.0.0.1:4001\r\n")
        self.assertIn("client 192.0.2.7:5678: closed: an HTTP header line on the line-protocol port",
                      "\n".join(formatEvent(e) for e in events))

    def test_ordinary_sessions_still_work(self):
        proto, t = self.h.connect()
        # stray lines that are not HTTP, blank lines, CRLF, a # signal that
        # mentions HTTP, lower-case commands
        proto.dataReceived(b"hello\r\n\r\n\n# GET / HTTP/1.1\nHTTP/1.1 200 OK\nGET\nHosting: x\n"
                           b"Host\n   \n>Emulated 00|\r\n>1:reset|\r\n>2:apdu:00a4080c0450005001|\r\n"
                           b">3:APDU:00D6000004CAFEBABE|\r\n>4:APDU:00B0000004|\r\n\r\n")
        self.assertEqual(take(t), f">1:{ATR}\n>2:9000\n>3:9000\n>4:CAFEBABE9000\n@@\n")
        proto.dataReceived(b"\n\n  >5:APDU:00B0000004|\n")  # sticky reader, leading white space
        self.assertEqual(take(t), ">5:CAFEBABE9000\n@@\n")
        self.assertOpen(t)
        self.assertEqual(self.h.factory.cross_protocol, 0)

    def test_telnet_client_still_works(self):
        proto, t = self.h.connect()
        proto.dataReceived(PLINK + b">Emulated 01|\r\n" + SUBNEGOTIATION + b">1:RESET|\r\n\r\n")
        self.assertEqual(take(t), f">1:{ATR}\n@@\n")
        for byte in b">2:APDU:00A4000C023F00|\r\n\r\n":
            proto.dataReceived(bytes([byte]))
        self.assertEqual(take(t), ">2:9000\n@@\n")
        self.assertOpen(t)

    def test_http_typed_in_telnet_closes(self):
        proto, t = self.h.connect()
        proto.dataReceived(PLINK + b"GET / HTTP/1.0\r\n")
        self.assertClosedUnanswered(t)


class HttpLineTests(SynchronousTestCase):
    def test_what_is_http(self):
        for line, what in ((b"POST / HTTP/1.1\r", "request line"), (b"PRI * HTTP/2.0", "request line"),
                           (b"GET /?a=b%20c HTTP/1.1", "request line"), (b"Origin: x", "header line"),
                           (b"sec-fetch-dest: empty", "header line"), (b"  Host: x", "header line"),
                           (b"hello world", None), (b"GET /", None), (b"GET / HTTP", None),
                           (b"# note HTTP/1.1", None), (b"#X / HTTP/1.1", None), (b"", None), (b"\r", None),
                           (b"Hosts: x", None), (b"X-Host: x", None), (b"Emulated 00: GET / HTTP/1.1:", None)):
            self.assertEqual(http_line(line), what, line)

    def test_start_of_an_over_long_line(self):
        self.assertEqual(http_line(b"POST /aaaaaaaaaaaaa", overlong=True), "request line")
        self.assertEqual(http_line(b"GET http://127.0.0.1:4001/aaaa", overlong=True), "request line")
        self.assertEqual(http_line(b"OPTIONS * HTTP", overlong=True), "request line")
        self.assertIsNone(http_line(b"aaaaaaaaaaaaaaaaaaaa", overlong=True))


# -- a real proxy process -------------------------------------------------------------

def send_and_read_all(port, data, timeout=5.0):
    """Send ``data``, then read until the proxy closes (b"" for a reset)."""
    s = socket.create_connection((HOST, port), timeout=timeout)
    got = b""
    try:
        s.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                return got, "closed"
            got += chunk
        return got, "still open"
    except ConnectionResetError:
        return got, "closed"
    finally:
        s.close()


def test_browser_shaped_post_is_closed_unanswered(proxy):
    got, state = send_and_read_all(proxy.port, browser_post(proxy.port))
    assert (got, state) == (b"", "closed")
    # a normal client after it reads the file unchanged
    with proxy.client() as c:
        assert c.request(READ_EF) == [("1", "9000"), ("2", "000000009000")]
    log = wait_for(lambda: "cross-protocol" in proxy.log() and proxy.log(), what="the log line")
    assert log.count("cross-protocol request") == 1
    assert f"client {HOST}:" in log and "closed: an HTTP request line on the line-protocol port" in log


PAGE = """<!doctype html><html><body><p id="status">starting</p><script>
fetch("http://{host}:{port}/", {{method: "POST", mode: "no-cors", body: {body}}})
  .then(() => {{ document.getElementById("status").textContent = "answered"; }},
        (e) => {{ document.getElementById("status").textContent = "failed: " + e; }});
</script></body></html>"""


def test_browser_fetch_post_to_the_line_port_changes_nothing(proxy, tmp_path):
    assert shutil.which("chromium"), "Debian chromium missing: tests/run.sh installs it (tests/debian-packages.txt)"
    import json

    body = json.dumps(BODY.decode())
    (tmp_path / "page.html").write_text(PAGE.format(host=HOST, port=proxy.port, body=body))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert chromium_path()
        # the page's origin is another port: a cross-origin no-cors POST, no preflight
        dom = browser_dom(f"http://{HOST}:{server.server_address[1]}/page.html",
                          "document.getElementById('status').textContent != 'starting'", timeout=60)
    finally:
        server.shutdown()
        server.server_close()
    assert 'id="status">failed' in dom, dom[-1000:]  # the connection closed: a network error
    with proxy.client() as c:  # the body did not write DEADBEEF
        assert c.request(READ_EF) == [("1", "9000"), ("2", "000000009000")]
    # the request did reach the line port, and was closed there
    wait_for(lambda: "cross-protocol request" in proxy.log(), what="the cross-protocol log line")
