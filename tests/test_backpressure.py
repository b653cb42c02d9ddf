"""Back-pressure on the stream front ends: a client that sends requests
and never reads the answers is no longer read from once its unsent
answers fill the connection's send buffer (the transport pauses the front
end, which pauses reading), is read again once it drains them, and the
proxy's memory stays bounded and is not kept after the close.

Unit tests drive Autobahn and the HTTP base over StringTransport; the
integration tests run a real ``twistd foxyproxy`` with a real WebSocket
client (websocket-client: handshake, framing, reading) and a raw HTTP/1.1
client pipelining REST requests, measuring the proxy's RSS.
"""

import base64
import json
import os
import re
import socket
import threading
import time

import pytest
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from support import HOST, ProxyProcess, free_port, wait_for, accepts
from test_api import TOKEN, ApiCase, client_frame, server_messages

from cloudfoxy_proxy.dispatch import Session
from cloudfoxy_proxy.access import full_access


class WebSocketUnit(ApiCase):
    """ApiWebSocket over StringTransport, as the HTTP base hands it over."""

    def setUp(self):
        super().setUp()
        self.ws = self.resource.ws_factory.buildProtocol(None)
        self.ws.upgrade = Session("127.0.0.1:1", "api", "127.0.0.1", identity=full_access("api"))
        self.transport = StringTransport()
        self.ws.makeConnection(self.transport)
        key = base64.b64encode(b"0123456789abcdef").decode()
        self.ws.dataReceived((f"GET /api/v1/ws HTTP/1.1\r\nHost: proxy.test\r\nUpgrade: websocket\r\n"
                              f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                              f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode())
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 101 "), self.transport.value())
        self.transport.clear()

    def test_the_connection_is_its_transports_producer_and_pauses_reading(self):
        self.assertIs(self.transport.producer, self.ws)
        self.assertTrue(self.transport.streaming)
        self.ws.pauseProducing()  # what the transport does when its send buffer is full
        self.assertEqual(self.transport.producerState, "paused")
        self.ws.resumeProducing()  # drained
        self.assertEqual(self.transport.producerState, "producing")
        msg = json.dumps({"id": 1, "reader": "Emulated 00", "apdus": ["00A4000C023F00"]}).encode()
        self.ws.dataReceived(client_frame(1, msg))
        self.assertEqual(server_messages(self.transport.value()), [{"id": 1, "atr": None, "responses": ["9000"]}])

    def close_code(self):
        data = self.transport.value()
        self.assertEqual(data[0], 0x88, data)  # FIN, close
        return int.from_bytes(data[2:4], "big")

    def test_invalid_utf8_in_a_text_frame_closes_with_1007(self):
        self.ws.dataReceived(client_frame(1, b'{"id": 1, "reader": "\xff\xfe"}'))
        self.assertEqual(self.close_code(), 1007)  # RFC 6455 section 8.1

    def test_a_text_message_ending_inside_a_code_point_closes_with_1007(self):
        self.ws.dataReceived(client_frame(1, b'{"id": 1, "x": "\xc3', fin=False))
        self.assertEqual(self.transport.value(), b"")  # a split code point may go on in the next frame
        self.ws.dataReceived(client_frame(0, b'"}'))
        self.assertEqual(self.close_code(), 1007)

    def test_utf8_split_across_frames_is_fine(self):
        msg = json.dumps({"id": "é", "reader": "Emulated 00", "apdus": ["00A4000C023F00"]},
                         ensure_ascii=False).encode()
        cut = msg.index(b"\xa9")  # inside the two bytes of "é"
        self.ws.dataReceived(client_frame(1, msg[:cut], fin=False) + client_frame(0, msg[cut:]))
        self.assertEqual(server_messages(self.transport.value()), [{"id": "é", "atr": None, "responses": ["9000"]}])

    def test_a_tcp_half_close_without_a_close_frame_closes(self):
        self.ws.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)


# --- integration: a real proxy --------------------------------------------------------------

API_TOKEN = "api-token-backpressure-0123"
REST_TOKEN = "rest-token-backpressure-0123"
#: answers much larger than requests (GET CHALLENGE of 128 bytes): the
#: kernel's socket buffers fill with few requests
TRANSMIT = {"reader": "Emulated 00", "apdus": ["0084000080"] * 8}
MAX_REQUESTS = 200000  # a bound on what a test sends
SEND_FOR = 25.0  # seconds, at most
STALLED = 3.0  # seconds without a byte taken: the proxy stopped reading
BOUND_MIB = 25  # the proxy's growth allowed while a client does not read


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    d = tmp_path_factory.mktemp("backpressure")
    (d / "api").write_text(API_TOKEN + "\n")
    (d / "rest").write_text(REST_TOKEN + "\n")
    api, rest = free_port(), free_port()
    p = ProxyProcess("--no-signing", "--api", f"tcp:{api}:interface={HOST}", "--api-token-file", str(d / "api"),
                     "--rest", f"tcp:{rest}:interface={HOST}", "--rest-token-file", str(d / "rest"))
    p.start()
    try:
        for port in (api, rest):
            wait_for(lambda: accepts(port), timeout=20, what=f"port {port}")
        p.api, p.rest = api, rest
        yield p
    finally:
        p.stop()


def send_until_stalled(sock, make):
    """Send ``make(n)`` for n = 0, 1... without reading, until the proxy has
    taken no byte for STALLED seconds (or the bounds): returns (requests
    begun, bytes of the last one still unsent, whether it stalled)."""
    sock.setblocking(False)
    sent, pending, since, t0 = 0, b"", None, time.monotonic()
    while time.monotonic() - t0 < SEND_FOR and sent < MAX_REQUESTS:
        if not pending:
            pending = make(sent)
            sent += 1
        try:
            pending = pending[sock.send(pending):]
            since = None
        except BlockingIOError:
            since = since or time.monotonic()
            if time.monotonic() - since > STALLED:
                return sent, pending, True
            time.sleep(0.01)
    return sent, pending, False


def warm_up(proxy):
    """A few requests of each kind read normally, so the baseline RSS
    includes what any first request allocates."""
    import websocket

    ws = websocket.create_connection(f"ws://{HOST}:{proxy.api}/api/v1/ws", timeout=10,
                                     header=[f"Authorization: Bearer {API_TOKEN}"])
    for n in range(200):
        ws.send(json.dumps(dict(TRANSMIT, id=n)))
        assert json.loads(ws.recv())["id"] == n
    ws.close()


@pytest.mark.integration
def test_a_websocket_client_that_never_reads_is_not_read_from(proxy):
    import websocket

    warm_up(proxy)
    base = rss_kib(proxy.proc.pid)
    ws = websocket.create_connection(f"ws://{HOST}:{proxy.api}/api/v1/ws", timeout=10,
                                     header=[f"Authorization: Bearer {API_TOKEN}"])
    try:
        def frame(n):
            return websocket.ABNF.create_frame(json.dumps(dict(TRANSMIT, id=n)), websocket.ABNF.OPCODE_TEXT).format()

        sent, pending, stalled = send_until_stalled(ws.sock, frame)
        grown = (rss_kib(proxy.proc.pid) - base) / 1024
        print(f"websocket: {sent} requests sent unread, proxy RSS {base / 1024:.1f} MiB +{grown:.1f} MiB, "
              f"stalled={stalled}")
        assert stalled, f"the proxy read {sent} requests from a client that reads nothing"
        assert grown < BOUND_MIB, f"the proxy grew {grown:.1f} MiB for a client that does not read"
        # Another client is served meanwhile.
        other = websocket.create_connection(f"ws://{HOST}:{proxy.api}/api/v1/ws", timeout=10,
                                            header=[f"Authorization: Bearer {API_TOKEN}"])
        other.send(json.dumps(dict(TRANSMIT, id="other")))
        assert json.loads(other.recv())["responses"][-1].endswith("9000")
        other.close()
        # Now it reads: the proxy resumes and every request is answered, in order.
        ws.sock.setblocking(True)
        ws.sock.settimeout(10)
        ids = []

        def read():
            while len(ids) < sent:
                ids.append(json.loads(ws.recv())["id"])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        ws.sock.sendall(pending)  # the rest of the last frame, once the proxy reads again
        reader.join(60)
        assert len(ids) == sent, f"{len(ids)} of {sent} answered after the client began reading"
        assert ids == list(range(sent)), "answers out of order"
    finally:
        ws.close()
    after = rss_kib(proxy.proc.pid)
    print(f"websocket: RSS after the close {after / 1024:.1f} MiB ({(after - base) / 1024:+.1f} MiB)")
    assert (after - base) / 1024 < BOUND_MIB


@pytest.mark.integration
def test_a_rest_client_that_pipelines_and_never_reads_is_not_read_from(proxy):
    request = (f"GET /api/v1/basic?terminal=/Emulated_01&apdu=0084000080 HTTP/1.1\r\nHost: {HOST}\r\n"
               f"X-Auth-Token: {REST_TOKEN}\r\n\r\n").encode()
    s = socket.create_connection((HOST, proxy.rest), 10)
    for _ in range(3):  # warm up on this connection, read normally
        s.sendall(request)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    base = rss_kib(proxy.proc.pid)
    try:
        sent, pending, stalled = send_until_stalled(s, lambda n: request)
        grown = (rss_kib(proxy.proc.pid) - base) / 1024
        print(f"rest: {sent} pipelined requests sent unread, proxy RSS {base / 1024:.1f} MiB +{grown:.1f} MiB, "
              f"stalled={stalled}")
        assert stalled, f"the proxy read {sent} requests from a client that reads nothing"
        assert grown < BOUND_MIB
        s.setblocking(True)
        s.settimeout(10)
        mark, answered = b"HTTP/1.1 200 ", [0]

        def read():
            tail = b""
            while answered[0] < sent:
                data = s.recv(1 << 20)
                if not data:
                    return
                data = tail + data
                answered[0] += data.count(mark)
                tail = data[-(len(mark) - 1):]

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        s.sendall(pending)  # the rest of the last request, once the proxy reads again
        reader.join(60)
        assert answered[0] == sent  # every request answered 200
    finally:
        s.close()
