"""RAMOverHTTP exactly once and session liveness on a real ``twistd
foxyproxy --ram``: a RAM client on Python's http.client (the card it
drives counts every APDU it runs and answers 9000, so every answer to a
one-APDU script is the same bytes) reconnects after every POST, once
mid-session, or loses an answer; line clients of the proxy send the
commands.  Each test asserts what every line client got and how many
times the card ran each APDU."""

import http.client
import threading
import time
from collections import Counter

import pytest

from support import HOST, LineClient, wait_for
from test_ram_integration import SECRET, post_and_reset, readers, start_server

from cloudfoxy_proxy.frontends import ramwire as wire

pytestmark = pytest.mark.integration

ATR = bytes.fromhex("3B8B8001466F7879456D753738313677")
HEADERS = {"Content-Type": wire.REQUEST_TYPE.decode()}


class CardClient(threading.Thread):
    """The RAM client: ``reconnect(n)`` says whether the n-th script's
    answer goes on a new connection; ``lose(n)`` whether that answer's POST
    is dropped with a reset before its own answer could be written (and
    then sent again, identical, on a new connection).  ``seconds`` is how
    long the card needs per script."""

    def __init__(self, port, reconnect=lambda n: False, lose=lambda n: False, seconds=0.0, die=0):
        super().__init__(daemon=True)
        self.die = die  # after receiving this script, close the connection and never post again
        self.port, self.reconnect, self.lose, self.seconds = port, reconnect, lose, seconds
        self.ran = Counter()
        self.scripts = 0
        self.got_script = threading.Event()
        self.statuses = []
        self.error = None

    def connection(self):
        return http.client.HTTPConnection(HOST, self.port, timeout=40)

    def run(self):
        try:
            self.headers = dict(HEADERS)
            conn = self.connection()
            conn.request("POST", f"/rt/{SECRET}", body=wire.encode_initiation(ATR), headers=self.headers)
            r = conn.getresponse()
            self.headers["Cookie"] = r.getheader("Set-Cookie").split(";")[0]
            status, body = r.status, r.read()
            while status == 200:
                steps = wire.decode_script(wire.template(body)[1])
                items = []
                for kind, apdu in steps:
                    self.ran[apdu.hex().upper() if kind == wire.APDU else "RESET"] += 1
                    items.append((wire.RESPONSE, b"\x90\x00") if kind == wire.APDU else (wire.RESET, ATR))
                answer = wire.encode_answer(items)
                if steps:
                    self.scripts += 1
                    self.got_script.set()
                    if self.scripts == self.die:
                        conn.close()
                        return
                    time.sleep(self.seconds)
                    if self.lose(self.scripts):
                        post_and_reset(self.port, answer, self.headers["Cookie"].split("=", 1)[1], conn)
                        conn = self.connection()  # the client's one re-send, on a new connection
                    elif self.reconnect(self.scripts):
                        conn.close()
                        conn = self.connection()
                conn.request("POST", f"/rt/{SECRET}", body=answer, headers=self.headers)
                r = conn.getresponse()
                status, body = r.status, r.read()
            self.statuses.append(status)
        except Exception as e:  # reported by the test
            self.error = e


def session(proxy_factory, tmp_path, *args, **client_kw):
    b = start_server(proxy_factory, tmp_path, "--no-signing", *args)  # no certificate probe on the card
    client = CardClient(b.ram_port, **client_kw)
    client.start()
    wait_for(lambda: "RAM alice" in readers(b), what="reader RAM alice")
    return b, client


def line(proxy, apdu):
    with LineClient(port=proxy.port, timeout=30) as c:
        return c.request(f">RAM alice|\n>1:APDU:{apdu}|\n\n")


APDUS = ["00A4000C023F00", "00D6000001AA", "00B0000001", "00D6000001BB", "0084000008"]


def finish(b, client):
    b.stop()  # the held POST is answered 204
    client.join(10)
    assert client.error is None
    assert client.statuses[-1] == 204


@pytest.mark.parametrize("reconnect", [lambda n: True, lambda n: n == 2], ids=["every-post", "once"])
def test_reconnecting_client_runs_each_apdu_once(proxy_factory, tmp_path, reconnect):
    b, client = session(proxy_factory, tmp_path, reconnect=reconnect)
    got = [line(b, apdu) for apdu in APDUS]
    assert got == [[("1", "9000")]] * len(APDUS)
    finish(b, client)
    assert client.ran == Counter(APDUS)
    assert "sent again" not in b.log()


def test_lost_answer_is_sent_again_and_runs_once(proxy_factory, tmp_path):
    """Two line clients: the second one's script is the answer to the POST
    that answers the first; that POST's connection is reset, so the second
    script is never written; the client re-sends its AB on a new connection
    and gets the second script."""
    b, client = session(proxy_factory, tmp_path, lose=lambda n: n == 1, seconds=1.0)
    results = {}

    def ask(key, apdu):
        results[key] = line(b, apdu)

    first = threading.Thread(target=ask, args=("first", "00D6000001AA"))
    first.start()
    assert client.got_script.wait(20)
    second = threading.Thread(target=ask, args=("second", "00D6000001BB"))
    second.start()
    time.sleep(0.5)  # queued behind the first (the card needs 1 s for it)
    first.join(30)
    second.join(30)
    assert results == {"first": [("1", "9000")], "second": [("1", "9000")]}
    finish(b, client)
    assert client.ran == Counter(["00D6000001AA", "00D6000001BB"])
    assert b.log().count("the previous answer sent again") == 1


def test_script_longer_than_the_session_timeout(proxy_factory, tmp_path):
    """--ram-session-timeout 2, a card that needs 3 s per script: the
    session lives, every command runs once and is answered."""
    b, client = session(proxy_factory, tmp_path, "--ram-session-timeout", "2", seconds=3.0)
    got = [line(b, apdu) for apdu in APDUS[:2]]
    assert got == [[("1", "9000")]] * 2
    finish(b, client)
    assert client.ran == Counter(APDUS[:2])
    assert b.log().count("RAM session of alice ended") == 1  # when the proxy stopped
    assert "RAM session of alice ended: the proxy stops" in b.log()


def test_client_gone_mid_script(proxy_factory, tmp_path):
    """--command-timeout 2, --ram-session-timeout 2: the client takes a
    script and is gone.  Its requester gets C086 after 2 s; a request
    queued behind gets C080 when the session ends, 2 s later."""
    b, client = session(proxy_factory, tmp_path, "--command-timeout", "2", "--ram-session-timeout", "2", die=1)
    results = {}

    def ask(key, apdu):
        results[key] = (line(b, apdu), time.monotonic())

    started = time.monotonic()
    first = threading.Thread(target=ask, args=("first", "00D6000001AA"))
    first.start()
    assert client.got_script.wait(20)
    second = threading.Thread(target=ask, args=("second", "00B0000001"))
    second.start()
    first.join(30)
    second.join(30)
    assert results["first"][0] == [("1", "C086")]
    assert results["second"][0] == [("1", "C080")]
    assert 1.5 < results["first"][1] - started < 8
    assert 3.5 < results["second"][1] - started < 12
    wait_for(lambda: "RAM alice" not in readers(b), timeout=10, what="RAM alice removed")
    assert client.ran == Counter(["00D6000001AA"])
