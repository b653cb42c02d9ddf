"""--queue-timeout on a real ``twistd foxyproxy``: an API card session (HTTP)
and a WebSocket hold keep their cards while a line client and a REST client
waiting for them each get C086 within the bound; the holder's commands
keep working, the card never runs the waiters' commands, and the holder
shows in /status.json and /metrics."""

import http.client
import json
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import HOST, ApiAgent

API_TOKEN = "queue-api-token"
REST_TOKEN = "queue-rest-token"
QUEUE = 2.0
SELECT_EF = "00A4080C0450005001"  # SELECT EF 5000/5001 by path
READ = "00B0000004"
MINE, THEIRS = "11223344", "DEADBEEF"

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(proxy_factory):
    p = proxy_factory("--command-timeout", "5", "--queue-timeout", str(QUEUE),
                      "--api", f"tcp:0:interface={HOST}", "--rest", f"tcp:0:interface={HOST}",
                      "--metrics", f"tcp:0:interface={HOST}", listeners=4,
                      env={"FOXYPROXY_API_TOKEN": API_TOKEN, "FOXYPROXY_REST_TOKEN": REST_TOKEN})
    p.api = f"http://{HOST}:{p.ports['ApiSite'][0]}"
    p.rest_port = p.ports["Site"][0]
    p.metrics_port = p.ports["StatusSite"][0]
    return p


def get(port, path, headers=None):
    c = http.client.HTTPConnection(HOST, port, timeout=QUEUE + 10)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def timed(fn):
    started = time.monotonic()
    out = fn()
    return out, time.monotonic() - started


def waiters_time_out(proxy, reader, terminal):
    """A line client and a REST client (at once) on ``reader``: each gets
    C086 after about --queue-timeout."""
    got = {}

    def line():
        with proxy.client(timeout=QUEUE + 10) as c:
            got["line"] = timed(lambda: c.results(
                f">{reader}|\n>1:APDU:{SELECT_EF}|\n>2:APDU:00D6000004{THEIRS}|\n\n"))
            # the connection goes on: another card answers at once
            got["after"] = c.results(">Emulated 02|\n>3:APDU:00A4000C023F00|\n\n")

    def rest():
        got["rest"] = timed(lambda: get(proxy.rest_port, f"/api/v1/basic?terminal={terminal}&reset=0"
                                        f"&apdu={SELECT_EF}&apdu=00D6000004{THEIRS}",
                                        {"X-Auth-Token": REST_TOKEN}))

    threads = [threading.Thread(target=line), threading.Thread(target=rest)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(QUEUE + 15)
    results, waited = got["line"]
    assert results == ["C086", "C086"]
    assert QUEUE - 0.1 <= waited < QUEUE + 1.5, waited
    (status, body), waited = got["rest"]
    assert "C086" in body and "9000" not in body, (status, body)
    assert QUEUE - 0.1 <= waited < QUEUE + 1.5, waited
    assert got["after"] == ["9000"]


def samples(proxy):
    _, text = get(proxy.metrics_port, "/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_api_session_holds_while_line_and_rest_waiters_get_c086(proxy):
    with ApiAgent(proxy.api, API_TOKEN) as agent:
        status, body, _ = agent.http("POST", "/api/v1/sessions", {"reader": "Emulated 00", "idle_timeout": 60})
        assert status == 200
        sid = body["session"]
        tx = "/api/v1/readers/Emulated%2000/transmit"
        status, body, _ = agent.http("POST", tx, {"session": sid, "apdus": [SELECT_EF, "00D6000004" + MINE]})
        assert (status, body["responses"]) == (200, ["9000", "9000"])

        waiters_time_out(proxy, "Emulated 00", "/Emulated_00")

        # the holder goes on: its selection and data are untouched
        status, body, _ = agent.http("POST", tx, {"session": sid, "apdus": [READ]})
        assert (status, body["responses"]) == (200, [MINE + "9000"])
        _, page = get(proxy.metrics_port, "/status.json")
        page = json.loads(page)
        [held] = page["holders"]
        assert (held["reader"], held["frontend"], held["identity"], held["waiting"]) == (
            "Emulated 00", "api", "api", 0), held
        assert held["held_seconds"] >= QUEUE and held["since"] <= time.time()
        [row] = [r for r in page["readers"] if r["name"] == "Emulated 00"]
        assert (row["queue"], row["queue_timeouts"]) == (0, 2)
        got = samples(proxy)
        assert got[("foxyproxy_reader_queue_timeouts_total", (("reader", "Emulated 00"),))] == 2
        assert got[("foxyproxy_reader_held", (("frontend", "api"), ("identity", "api"),
                                              ("reader", "Emulated 00")))] == 1
        assert agent.http("DELETE", f"/api/v1/sessions/{sid}")[0] == 200
    # the waiters' UPDATE BINARY never ran, not even once the card was free
    with proxy.client() as c:
        assert c.results(f">Emulated 00|\n>1:APDU:{SELECT_EF}|\n>2:APDU:{READ}|\n\n") == ["9000", MINE + "9000"]
    assert json.loads(get(proxy.metrics_port, "/status.json")[1])["holders"] == []


def test_websocket_hold_while_line_and_rest_waiters_get_c086(proxy):
    with ApiAgent(proxy.api, API_TOKEN) as agent:
        agent.ws_open()
        agent.ws_send({"id": "h", "hold": "Emulated 01", "idle_timeout": 60})
        assert agent.ws_recv()["msg"] == {"id": "h", "held": "Emulated 01"}
        agent.ws_send({"id": "w", "reader": "Emulated 01", "apdus": [SELECT_EF, "00D6000004" + MINE]})
        assert agent.ws_recv()["msg"]["responses"] == ["9000", "9000"]

        waiters_time_out(proxy, "Emulated 01", "/Emulated_01")

        agent.ws_send({"id": "r", "reader": "Emulated 01", "apdus": [READ]})
        assert agent.ws_recv()["msg"] == {"id": "r", "atr": None, "responses": [MINE + "9000"]}
        [held] = json.loads(get(proxy.metrics_port, "/status.json")[1])["holders"]
        assert (held["reader"], held["frontend"]) == ("Emulated 01", "api")
    with proxy.client() as c:  # the WebSocket closed: the card is free, the waiters' write never ran
        assert c.results(f">Emulated 01|\n>1:APDU:{SELECT_EF}|\n>2:APDU:{READ}|\n\n") == ["9000", MINE + "9000"]
