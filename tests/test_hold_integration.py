"""Card sessions held at the owner (docs/protocol.md "HOLD and RELEASE",
docs/tcp.md "Card sessions through a front") with real ``twistd
foxyproxy`` processes on loopback: an owner with emulated cards, fronts
with ``--backend tcp://owner``, line-protocol clients (support.LineClient)
and API / WebSocket clients (support.ApiAgent).  What the owner's card ran
is read from the owner's audit log (one record per request: its results)."""

import base64
import json
import threading
import time

import pytest

from support import HOST, ApiAgent, LineClient, wait_for
from test_tcp_integration import foxyproxy_upstream, listing  # noqa: F401 (FoxyProxy 2.10 fixture)
from test_vpcd_integration import slot  # noqa: F401 (the PC/SC rig fixture)

TOKEN = "hold-integration-token"
SELECT_MF = "00A4000C023F00"
SELECT_EF = "00A4080C0450005001"  # EF 5000/5001: READ BINARY answers 6986 once the selection is gone
READ = "00B0000004"
#: the fronts name the owner's readers with this prefix (docs/tcp.md "Readers")
CARD = "o1-Emulated 00"


def owner(proxy_factory, tmp_path, queue_timeout=1):
    audit = tmp_path / "owner-audit.jsonl"
    p = proxy_factory("--backend", "emulated:?cards=2", "--no-signing",
                      "--queue-timeout", str(queue_timeout), "--audit-log", str(audit))
    p.audit = audit
    return p


def front(proxy_factory, upstream, api=False):
    args = ["--backend", f"tcp://{HOST}:{upstream.port}?prefix=o1-", "--no-signing"]
    if api:
        args += ["--api", f"tcp:0:interface={HOST}"]
    p = proxy_factory(*args, listeners=2 if api else 1, env={"FOXYPROXY_API_TOKEN": TOKEN})
    if api:
        p.base = f"http://{HOST}:{p.ports['ApiSite'][0]}"
    with p.client() as c:
        listed = base64.b64encode(CARD.encode()).decode()
        wait_for(lambda: listed in c.results(">*|\n>1:READERS|\n\n")[0].split("|"),
                 timeout=15, what="the front lists the owner's cards")
    return p


def card_results(proxy):
    """Result -> count over the owner's audited requests on Emulated 00
    ("OK": the card answered; C086: it never ran the command)."""
    counts = {}
    for line in proxy.audit.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "request" and record.get("reader") == "Emulated 00":
            for result, n in record["results"].items():
                counts[result] = counts.get(result, 0) + n
    return counts


def timed(client, text):
    t0 = time.monotonic()
    results = client.results(text)
    return results, time.monotonic() - t0


def test_an_api_session_on_a_front_excludes_every_other_client(proxy_factory, tmp_path):
    o = owner(proxy_factory, tmp_path)
    f1 = front(proxy_factory, o, api=True)
    f2 = front(proxy_factory, o)
    with ApiAgent(f1.base, TOKEN) as agent, o.client(timeout=20) as direct, f2.client(timeout=20) as other:
        status, body, _ = agent.http("POST", "/api/v1/sessions", {"reader": CARD, "idle_timeout": 20})
        assert status == 200, body
        sid = body["session"]
        path = "/api/v1/readers/o1-Emulated%2000/transmit"
        assert agent.http("POST", path, {"session": sid, "apdus": [SELECT_EF]})[1]["responses"] == ["9000"]
        # the owner's own client and a second front's client wait, then C086 (owner: --queue-timeout 1)
        results, waited = timed(direct, f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n")
        assert results == ["C086"] and 0.9 < waited < 5
        results, waited = timed(other, f">{CARD}|\n>1:APDU:{SELECT_MF}|\n\n")
        assert results == ["C086"] and 0.9 < waited < 5
        # the session's selection survived: neither SELECT ran
        status, body, _ = agent.http("POST", path, {"session": sid, "apdus": [READ]})
        assert status == 200 and body["responses"][0].endswith("9000"), body
        assert agent.http("DELETE", f"/api/v1/sessions/{sid}")[0] == 200
        assert direct.results(f">2:APDU:{SELECT_MF}|\n\n") == ["9000"]
        assert other.results(f">2:APDU:{SELECT_MF}|\n\n") == ["9000"]
    # the card ran the session's 2 commands and the 2 after it, never the 2 refused ones
    wait_for(lambda: card_results(o) == {"OK": 4, "C086": 2}, timeout=5,
             what=f"the owner's audit: {card_results(o)}")
    # the session's requests at the owner name the API client they ran for (CLIENT before HOLD)
    held = [r for r in map(json.loads, o.audit.read_text().splitlines())
            if r.get("event") == "request" and r.get("reader") == "Emulated 00" and "OK" in r["results"]
            and r.get("on_behalf_of", {}).get("frontend") == "api"]
    assert len(held) == 2, o.audit.read_text()
    assert all(r["on_behalf_of"]["peer"].startswith(f"{HOST}:") for r in held)


def test_losing_the_front_releases_the_owners_hold(proxy_factory, tmp_path):
    o = owner(proxy_factory, tmp_path, queue_timeout=10)
    f1 = front(proxy_factory, o, api=True)
    with ApiAgent(f1.base, TOKEN) as agent, o.client(timeout=20) as direct:
        status, body, _ = agent.http("POST", "/api/v1/sessions", {"reader": CARD, "idle_timeout": 60})
        assert status == 200, body
        answers = []
        t = threading.Thread(target=lambda: answers.append(timed(direct, f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n")))
        t.start()
        time.sleep(0.5)
        assert answers == []  # held at the owner for the front's session
        t0 = time.monotonic()
        f1.kill()  # the front dies with the session open: its connection to the owner is lost
        t.join(12)
        assert answers and answers[0][0] == ["9000"], answers
        assert time.monotonic() - t0 < 2.0  # released at once, not after the 60 s idle timeout


def test_websocket_hold_through_a_front(proxy_factory, tmp_path):
    o = owner(proxy_factory, tmp_path)
    f1 = front(proxy_factory, o, api=True)
    with ApiAgent(f1.base, TOKEN) as agent, o.client(timeout=20) as direct:
        assert agent.ws_open() == {"open": True}
        agent.ws_send({"id": "h", "hold": CARD, "idle_timeout": 10})
        assert agent.ws_recv()["msg"] == {"id": "h", "held": CARD}
        agent.ws_send({"id": "a", "reader": CARD, "apdus": [SELECT_EF]})
        assert agent.ws_recv()["msg"]["responses"] == ["9000"]
        assert direct.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["C086"]
        agent.ws_send({"id": "b", "reader": CARD, "apdus": [READ]})
        assert agent.ws_recv()["msg"]["responses"][0].endswith("9000")
        agent.ws_send({"id": "r", "release": True})
        assert {"id": "r", "released": True} in [agent.ws_recv()["msg"], agent.ws_recv()["msg"]]
        assert direct.results(f">2:APDU:{SELECT_MF}|\n\n") == ["9000"]
    wait_for(lambda: card_results(o) == {"OK": 3, "C086": 1}, timeout=5,
             what=f"the owner's audit: {card_results(o)}")


def test_line_hold_through_a_front_and_at_the_owner(proxy_factory, tmp_path):
    o = owner(proxy_factory, tmp_path)
    f1 = front(proxy_factory, o)
    with o.client(timeout=20) as direct:
        holder = LineClient(HOST, f1.port, timeout=20)
        assert holder.results(f">{CARD}|\n>1:HOLD:30|\n>2:APDU:{SELECT_EF}|\n\n") == ["OK", "9000"]
        assert direct.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["C086"]
        assert holder.results(f">3:APDU:{READ}|\n\n")[0].endswith("9000")
        holder.close()  # the front's client goes: the front releases, the owner lets go
        wait_for(lambda: direct.results(f">2:APDU:{SELECT_MF}|\n\n") == ["9000"], timeout=5,
                 what="the owner's card free again")
        # HOLD straight at the owner: a second direct client waits, RELEASE lets it in
        with o.client(timeout=20) as second:
            assert direct.results(">3:HOLD:30|\n\n") == ["OK"]
            assert second.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["C086"]
            assert direct.results(">4:RELEASE|\n\n") == ["OK"]
            assert second.results(f">2:APDU:{SELECT_MF}|\n\n") == ["9000"]


def test_vpcd_exclusive_bridge_through_a_front(proxy_factory, tmp_path, slot):
    """The PC/SC rig: a front bridges the owner's card to vpcd with
    exclusive=1; the owner's own clients wait (C086) while a PC/SC program
    uses the card through the front; the bridge stopped, the owner's
    clients get the card again."""
    from test_vpcd_integration import SLOT, close, connect, send

    o = owner(proxy_factory, tmp_path)
    f1 = proxy_factory("--backend", f"tcp://{HOST}:{o.port}?prefix=o1-", "--no-signing",
                       "--vpcd", f"127.0.0.1:{slot.port(SLOT)}={CARD}?exclusive=1")
    try:
        slot.wait_card(SLOT, True, 15)
        with o.client(timeout=20) as direct:
            assert direct.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["C086"]
            conn = connect()
            try:
                assert send(conn, SELECT_EF) == (b"", 0x9000)  # EF 5000/5001 by path
                assert send(conn, READ)[1] == 0x9000  # its selection kept: nobody else ran
            finally:
                close(conn)
            f1.stop()
            slot.wait_card(SLOT, False, 10)
            assert direct.results(f">2:APDU:{SELECT_MF}|\n\n") == ["9000"]
    finally:
        f1.stop()
    counts = card_results(o)
    assert counts.get("C086") == 1, counts


def test_ram_session_through_a_front(proxy_factory, tmp_path):
    """--ram-connect on a front holds the owner's card for the RAM session:
    the owner's own clients wait (C086) while the RAM server's client uses it."""
    from test_ram_integration import readers, start_server

    o = owner(proxy_factory, tmp_path)
    b = start_server(proxy_factory, tmp_path)
    a = proxy_factory("--backend", f"tcp://{HOST}:{o.port}?prefix=o1-", "--no-signing",
                      "--ram-connect", f"{b.ram_url}={CARD}")
    wait_for(lambda: "RAM alice" in readers(b), timeout=20, what="reader RAM alice on the RAM server")
    with o.client(timeout=20) as direct, b.client(timeout=20) as remote:
        assert remote.results(f">RAM alice|\n>1:APDU:{SELECT_EF}|\n\n") == ["9000"]
        assert direct.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["C086"]
        assert remote.results(f">2:APDU:{READ}|\n\n")[0].endswith("9000")  # selection kept
        t0 = time.monotonic()
        a.kill()
        wait_for(lambda: direct.results(f">2:APDU:{SELECT_MF}|\n\n") == ["9000"], timeout=5,
                 what="the owner's card free once the front is gone")
        assert time.monotonic() - t0 < 5


def test_foxyproxy_210_owner_sessions_held_on_the_front_only(proxy_factory, foxyproxy_upstream):
    """FoxyProxy 2.10 cannot hold cards (it answers one request per
    connection): an API session on its reader is held on the front only,
    said once in the front's log, and its commands still run."""
    f1 = proxy_factory("--backend", f"tcp://{HOST}:{foxyproxy_upstream}?prefix=F%20", "--no-signing",
                       "--api", f"tcp:0:interface={HOST}", listeners=2, env={"FOXYPROXY_API_TOKEN": TOKEN})
    wait_for(lambda: len(listing(f1)) >= 2, timeout=30, what="FoxyProxy's readers on the front")
    name = listing(f1)[0]
    base = f"http://{HOST}:{f1.ports['ApiSite'][0]}"
    path = "/api/v1/readers/" + name.replace(" ", "%20") + "/transmit"
    with ApiAgent(base, TOKEN) as agent:
        for _ in range(2):
            status, body, _ = agent.http("POST", "/api/v1/sessions", {"reader": name, "idle_timeout": 10})
            assert status == 200, body
            sid = body["session"]
            status, body, _ = agent.http("POST", path, {"session": sid, "apdus": [SELECT_MF, SELECT_MF]})
            assert (status, body["responses"]) == (200, ["9000", "9000"]), body
            assert agent.http("DELETE", f"/api/v1/sessions/{sid}")[0] == 200
    assert f1.log().count("does not know HOLD") == 1, f1.log()
