"""Gone clients hold nothing, on a real ``twistd foxyproxy``: a request
whose client went away while it waited for a busy card leaves the card's
queue at once (line protocol, REST, vpcd bridge), so live clients are never
refused with C086 because of it (docs/protocol.md, "Concurrency")."""

import http.client
import socket
import struct
import threading
import time

from support import HOST, LineClient, free_port

REQUEST = ">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n"
SLOW = "emulated:?cards=1&latency_ms=1500"


def abort(sock):
    """Close with a TCP reset: the client is gone for good."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def hold_card(proxy):
    """A client whose APDU keeps the card busy for the emulated latency;
    returns a thread whose ``answer`` is that client's result."""
    def run():
        with LineClient(HOST, proxy.port, timeout=20) as c:
            run.answer = c.results(REQUEST)

    run.answer = None
    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    return thread, run


def ask_live(proxy):
    t0 = time.monotonic()
    with LineClient(HOST, proxy.port, timeout=20) as c:
        answer = c.results(REQUEST)
    return answer, time.monotonic() - t0


def test_line_clients_gone_while_queued(proxy_factory):
    proxy = proxy_factory("--backend", SLOW, "--max-queue", "3", "--no-signing")
    thread, holder = hold_card(proxy)
    quitters = []
    for _ in range(3):
        s = socket.create_connection((HOST, proxy.port))
        s.sendall(REQUEST.encode())
        quitters.append(s)
    time.sleep(0.3)
    for s in quitters:
        abort(s)
    time.sleep(0.2)
    answer, took = ask_live(proxy)
    thread.join(20)
    assert holder.answer == ["9000"]
    assert answer == ["9000"]  # queued behind the holder only, not refused
    assert took < 3.0  # the quitters' APDUs (1.5 s each) never ran


def test_rest_clients_gone_while_queued(proxy_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    proxy = proxy_factory("--backend", SLOW, "--max-queue", "3", "--no-signing",
                          "--rest", f"tcp:0:interface={HOST}", "--rest-token-file", str(token), listeners=2)
    rest = proxy.ports["Site"][0]
    get = (b"GET /api/v1/basic?terminal=/Emulated%2000&apdu=00A4000C023F00 HTTP/1.1\r\n"
           b"Host: proxy\r\nX-Auth-Token: t0ken\r\n\r\n")
    thread, holder = hold_card(proxy)
    quitters = []
    for _ in range(3):
        s = socket.create_connection((HOST, rest))
        s.sendall(get)
        quitters.append(s)
    time.sleep(0.3)
    for s in quitters:
        s.close()  # an HTTP client that gives up: FIN, no answer read
    time.sleep(0.2)
    answer, took = ask_live(proxy)
    live = http.client.HTTPConnection(HOST, rest, timeout=20)  # and a live REST client
    live.request("GET", "/api/v1/basic?terminal=/Emulated%2000&apdu=00A4000C023F00",
                 headers={"X-Auth-Token": "t0ken"})
    response = live.getresponse()
    reply = (response.status, response.read())
    live.close()
    thread.join(20)
    assert holder.answer == ["9000"]
    assert answer == ["9000"]
    assert took < 3.0
    assert reply == (200, b"9000\n")


def test_vpcd_bridge_gone_while_queued(proxy_factory):
    # A scripted vpcd on loopback (docs/vpcd.md): the bridge
    # connects to it as the virtual card; its APDU then waits for the busy
    # card, and the vpcd connection drops.
    listener = socket.socket()
    listener.bind((HOST, free_port()))
    listener.listen(4)
    listener.settimeout(20)
    port = listener.getsockname()[1]
    proxy = proxy_factory("--backend", SLOW, "--max-queue", "1", "--no-signing",
                          "--vpcd", f"{HOST}:{port}=Emulated 00")
    try:
        vpcd, _ = listener.accept()  # after the bridge's reset of the card
        thread, holder = hold_card(proxy)
        apdu = bytes.fromhex("00A4000C023F00")
        vpcd.sendall(len(apdu).to_bytes(2, "big") + apdu)
        time.sleep(0.3)  # queued: the queue (--max-queue 1) is full now
        abort(vpcd)
        time.sleep(0.05)  # well before the bridge's first reconnection attempt (0.25 s)
        answer, took = ask_live(proxy)
        thread.join(20)
    finally:
        listener.close()
    assert holder.answer == ["9000"]
    assert answer == ["9000"], proxy.log()
    assert took < 3.0
