"""The API (``--api``) on a real ``twistd foxyproxy``: treq and Autobahn
clients (tests/api_client.py through support.ApiAgent), a line-protocol
client sharing a card, emulated PIV cards for SIGN, the PC/SC rig for
reader events, raw sockets for refusals before the body."""

import hashlib
import http.client
import socket
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.hashes import SHA256

import pcsc_rig as rigmod
from support import HOST, ApiAgent, LineClient

TOKEN = "api-integration-token"
ATR = "3B8B8001466F7879456D753738313677"
SELECT_MF = "00A4000C023F00"
GET_CHALLENGE = "0084000008"
ORIGIN = "http://127.0.0.1:9"


def start(proxy_factory, *args, listeners=2):
    p = proxy_factory("--api", f"tcp:0:interface={HOST}", "--api-cors-origin", ORIGIN, *args,
                      listeners=listeners, env={"FOXYPROXY_API_TOKEN": TOKEN})
    p.api_port = p.ports["ApiSite"][0]
    p.base = f"http://{HOST}:{p.api_port}"
    return p


@pytest.fixture
def api_proxy(proxy_factory):
    """Two emulated ISO 7816 cards, two slow ones (answers after 3 s,
    --command-timeout 1) and two emulated PIV cards."""
    return start(proxy_factory, "--backend", "emulated:?cards=2",
                 "--backend", "emulated:?cards=1&prefix=Slow&latency_ms=3000",
                 "--backend", "emulated:?cards=2&type=piv&prefix=PIV", "--command-timeout", "1")


@pytest.fixture
def agent(api_proxy):
    with ApiAgent(api_proxy.base, TOKEN) as a:
        yield a


def test_readers_and_transmit(agent):
    status, body, headers = agent.http("GET", "/api/v1/readers")
    assert status == 200 and headers["content-type"] == "application/json"
    names = [r["name"] for r in body["readers"]]
    assert names == ["Emulated 00", "Emulated 01", "Slow 00", "PIV 00", "PIV 01"]
    assert body["readers"][0] == {"name": "Emulated 00", "aliases": [], "present": True, "atr": ATR,
                                  "backend": "emulated: 2 iso7816 cards", "queued": 0}
    status, body, _ = agent.http("POST", "/api/v1/readers/Emulated%2001/transmit",
                                 {"reset": True, "apdus": [SELECT_MF, GET_CHALLENGE]})
    assert status == 200
    assert body["atr"] == ATR
    assert body["responses"][0] == "9000"
    assert len(body["responses"][1]) == 20 and body["responses"][1].endswith("9000")
    # keep-alive: many requests over the pool's connection
    for _ in range(20):
        assert agent.http("POST", "/api/v1/readers/Emulated%2000/transmit",
                          {"apdus": [SELECT_MF]})[:2] == (200, {"atr": None, "responses": ["9000"]})


def test_every_error_status(agent, api_proxy):
    tx = "/api/v1/readers/{}/transmit"
    cases = [
        ("POST", tx.format("Nobody"), {"apdus": [SELECT_MF]}, 404, "C083"),
        ("POST", tx.format("Emulated"), {"apdus": [SELECT_MF]}, 400, "C082"),
        ("POST", tx.format("Emulated%2000"), {"apdus": ["0"]}, 400, "C084"),
        ("POST", tx.format("Slow%2000"), {"apdus": [SELECT_MF]}, 502, "C086"),
        ("GET", "/api/v1/certificates/Nobody/chain", None, 404, "C083"),
        ("POST", "/api/v1/certificates/PIV%2000/sign",
         {"digest": hashlib.sha256(b"x").hexdigest(), "pin": "999999"}, 403, "C085"),
        ("DELETE", "/api/v1/sessions/nope", None, 404, "C083"),
        ("GET", "/api/v1/nowhere", None, 404, "C083"),
    ]
    for method, path, body, status, code in cases:
        got, answer, _ = agent.http(method, path, body)
        assert (got, answer["error"]["code"]) == (status, code), (path, answer)
    # 401 with WWW-Authenticate, counted, nothing read
    status, body, headers = agent.http("GET", "/api/v1/readers", token="wrong")
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="cloudfoxy-proxy"'
    assert body["error"]["code"] == "C085"
    # 409: a session of one card used on another
    sid = agent.http("POST", "/api/v1/sessions", {"reader": "Emulated 00", "idle_timeout": 5})[1]["session"]
    status, body, _ = agent.http("POST", tx.format("Emulated%2001"), {"session": sid, "apdus": [SELECT_MF]})
    assert (status, body["error"]["code"]) == (409, "C086")
    # 413 and 411 are answered before any body byte is read
    for head in (b"Content-Length: 99999999\r\n", b"Transfer-Encoding: chunked\r\n"):
        with socket.create_connection((HOST, api_proxy.api_port), timeout=5) as s:
            s.sendall(b"POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      + TOKEN.encode() + b"\r\n" + head + b"\r\n")
            answer = s.recv(4096)
        assert answer.split(b" ")[1] in (b"413", b"411"), answer


def test_session_holds_the_card_while_a_line_client_waits(agent, api_proxy):
    status, body, _ = agent.http("POST", "/api/v1/sessions", {"reader": "Emulated 00", "idle_timeout": 10})
    assert status == 200
    sid = body["session"]
    answers = []
    with api_proxy.client(timeout=15) as line:
        t = threading.Thread(target=lambda: answers.append(line.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n")))
        t.start()
        time.sleep(0.5)
        assert answers == []  # waits in the card's queue
        assert agent.http("GET", "/api/v1/readers")[1]["readers"][0]["queued"] == 1
        status, body, _ = agent.http("POST", "/api/v1/readers/Emulated%2000/transmit",
                                     {"session": sid, "apdus": [SELECT_MF]})
        assert (status, body["responses"]) == (200, ["9000"])
        assert answers == []
        assert agent.http("DELETE", f"/api/v1/sessions/{sid}")[0] == 200
        t.join(5)
        assert answers == [["9000"]]


def test_sign_on_an_emulated_piv_card(agent):
    status, body, _ = agent.http("GET", "/api/v1/certificates")
    assert status == 200
    assert {"alias": "PIV PIV 00 Signing", "reader": "PIV 00"} in body["certificates"]
    status, body, _ = agent.http("GET", "/api/v1/certificates/PIV%20PIV%2000%20Signing/chain")
    assert status == 200
    cert = x509.load_der_x509_certificate(bytes.fromhex(body["chain"][0]))
    digest = hashlib.sha256(b"signed over the API").digest()
    status, body, _ = agent.http("POST", "/api/v1/certificates/PIV%20PIV%2000%20Signing/sign",
                                 {"digest": digest.hex().upper(), "algorithm": "SHA256", "pin": "123456"})
    assert status == 200, body
    cert.public_key().verify(bytes.fromhex(body["signature"]), digest, ec.ECDSA(Prehashed(SHA256())))


def test_websocket_transmit_hold_and_auth(agent, api_proxy):
    assert agent.ws_open() == {"open": True}
    agent.ws_send({"id": "a", "reader": "Emulated 01", "reset": True, "apdus": [SELECT_MF]})
    assert agent.ws_recv()["msg"] == {"id": "a", "atr": ATR, "responses": ["9000"]}
    agent.ws_send({"id": "b", "reader": "Nobody", "apdus": [SELECT_MF]})
    assert agent.ws_recv()["msg"]["error"]["code"] == "C083"
    # a held card: a line client waits until the WebSocket releases it
    agent.ws_send({"id": "h", "hold": "Emulated 01", "idle_timeout": 10})
    assert agent.ws_recv()["msg"] == {"id": "h", "held": "Emulated 01"}
    answers = []
    with api_proxy.client(timeout=15) as line:
        t = threading.Thread(target=lambda: answers.append(line.results(f">Emulated 01|\n>1:APDU:{SELECT_MF}|\n\n")))
        t.start()
        time.sleep(0.3)
        agent.ws_send({"id": "c", "reader": "Emulated 01", "apdus": [SELECT_MF]})
        assert agent.ws_recv()["msg"] == {"id": "c", "atr": None, "responses": ["9000"]}
        assert answers == []
        agent.ws_send({"id": "r", "release": True})
        got = [agent.ws_recv()["msg"], agent.ws_recv()["msg"]]
        assert {"id": "r", "released": True} in got
        t.join(5)
        assert answers == [["9000"]]
    # no header: the first message must authenticate
    assert agent.ws_open("anon", headers={}) == {"open": True}
    agent.ws_send({"id": 1, "auth": TOKEN}, name="anon")
    assert agent.ws_recv("anon")["msg"] == {"id": 1, "authenticated": True}
    # before authenticating, a message over 4 KiB closes the connection (nothing big is kept)
    assert agent.ws_open("big", headers={}) == {"open": True}
    agent.ws_send({"auth": "x" * 10000}, name="big")
    assert agent.ws_recv("big")["closed"][0] == 1009  # a close frame: message too big (RFC 6455 7.4.1)
    assert agent.ws_open("bad", headers={"Authorization": "Bearer nope"})["error"].count("401") == 1
    assert agent.ws_open("evil", headers={"Origin": "http://evil.test", **agent.auth()})["error"].count("403") == 1
    # the proxy's own origin (a page it served) is allowed beside the --api-cors-origin list
    assert agent.ws_open("own", headers={"Origin": api_proxy.base, **agent.auth()}) == {"open": True}
    agent.ws_send({"id": "o", "reader": "Emulated 00", "apdus": [SELECT_MF]}, name="own")
    assert agent.ws_recv("own")["msg"] == {"id": "o", "atr": None, "responses": ["9000"]}
    # ...but not on another scheme or port
    other = api_proxy.base.rsplit(":", 1)[0] + ":1"
    for origin in (api_proxy.base.replace("http://", "https://"), other):
        assert agent.ws_open("near", headers={"Origin": origin, **agent.auth()})["error"].count("403") == 1
    # a page opened from a file (Origin: null) is refused, as docs/api.md says
    assert "403" in agent.ws_open("file", headers={"Origin": "null", **agent.auth()})["error"]


def test_https_and_wss(proxy_factory, tmp_path):
    from test_rest_backend import make_tls_files

    tls = make_tls_files(str(tmp_path))
    p = proxy_factory("--api", f"ssl:0:interface={HOST}:privateKey={tls['server-key']}:certKey={tls['server-cert']}",
                      listeners=2, env={"FOXYPROXY_API_TOKEN": TOKEN})
    base = f"https://{HOST}:{p.ports['ApiSite'][0]}"
    with ApiAgent(base, TOKEN, env={"SSL_CERT_FILE": tls["ca"]}) as agent:
        assert agent.http("POST", "/api/v1/readers/Emulated%2000/transmit", {"apdus": [SELECT_MF]})[:2] == (
            200, {"atr": None, "responses": ["9000"]})
        assert agent.ws_open() == {"open": True}
        agent.ws_send({"id": 1, "reader": "Emulated 01", "apdus": [SELECT_MF]})
        assert agent.ws_recv()["msg"] == {"id": 1, "atr": None, "responses": ["9000"]}
    assert "Traceback" not in p.log()


def test_cors_preflight_and_headers(agent):
    status, _, headers = agent.http("OPTIONS", "/api/v1/readers", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204
    assert headers["access-control-allow-origin"] == ORIGIN
    assert "Authorization" in headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in headers
    status, _, headers = agent.http("OPTIONS", "/api/v1/readers", headers={"Origin": "http://evil.test"})
    assert status == 403 and "access-control-allow-origin" not in headers
    status, _, headers = agent.http("GET", "/api/v1/readers", headers={"Origin": ORIGIN, **agent.auth()})
    assert status == 200 and headers["access-control-allow-origin"] == ORIGIN


def test_foxyproxy_210_routes(agent):
    assert agent.http("GET", "/api/v1.0/hello")[:2] == (200, {"result": True})
    status, body, _ = agent.http("POST", "/api/v1.0/command", {"data": {"reader": "Emulated 00", "commands": [
        {"nonce": "2", "line": "RESET"}, {"nonce": "3", "line": f"APDU:{SELECT_MF}"}]}})
    assert (status, body) == (200, [{"response": [{"id": "2", "line": ATR}, {"id": "3", "line": "9000"}]}])
    status, body, _ = agent.http("GET", "/api/v1.0/select/PIV%2001")
    assert status == 200
    assert body.splitlines() == ["PIV 01 (CN=PIV PIV 01 Authentication,O=CloudFoxy Emulated)",
                                 "PIV 01 (CN=PIV PIV 01 Signing,O=CloudFoxy Emulated)"]
    assert agent.http("POST", "/api/v1.0/command", {"nodata": 1})[0] == 400


def test_openapi_is_served_and_metrics_count_the_api(proxy_factory):
    p = start(proxy_factory, "--metrics", f"tcp:0:interface={HOST}", listeners=3)
    with ApiAgent(p.base, TOKEN) as agent:
        status, spec, _ = agent.http("GET", "/api/v1/openapi.json")
        assert status == 200 and spec["openapi"].startswith("3.")
        agent.http("GET", "/api/v1/readers", token="wrong")
        assert agent.ws_open() == {"open": True}
        agent.ws_send({"id": 1, "reader": "Emulated 00", "apdus": [SELECT_MF]})
        assert agent.ws_recv()["msg"]["responses"] == ["9000"]
    time.sleep(0.5)  # the agent's connections are closed
    conn = http.client.HTTPConnection(HOST, p.ports["StatusSite"][0], timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    assert 'frontend="api"' in text
    assert any(line.startswith("foxyproxy_frontend_auth_failures_total") and 'frontend="api"' in line
               and line.endswith(" 1.0") for line in text.splitlines()), text
    assert 'foxyproxy_frontend_connections{frontend="api"} 0.0' in text  # the WebSocket was counted out
    requests = [line for line in text.splitlines() if line.startswith('foxyproxy_frontend_requests_total{frontend="api"}')]
    # openapi.json, the refused one (every answer counts), 1 WebSocket message
    assert requests == ['foxyproxy_frontend_requests_total{frontend="api"} 3.0']


def test_pcsc_reader_events_within_2_s(card0, proxy_factory):
    rig = card0
    if rig.card_pid(1) is not None:
        rig.stop_card(1)  # slot 1 empty: a reader without a card
    p = start(proxy_factory, "--backend", "pcsc:", "--command-timeout", "2")
    slot0, slot1 = rigmod.reader_name(0), rigmod.reader_name(1)
    with ApiAgent(p.base, TOKEN) as agent:
        deadline = time.monotonic() + 10
        while True:  # the backend has listed the card
            readers = {r["name"]: r for r in agent.http("GET", "/api/v1/readers")[1]["readers"]}
            if readers.get(slot0, {}).get("present") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert readers[slot0]["present"] and not readers[slot1]["present"]
        # no card in slot 1: 503
        status, body, _ = agent.http("POST", "/api/v1/readers/" + slot1.replace(" ", "%20") + "/transmit",
                                     {"apdus": [SELECT_MF]})
        assert (status, body["error"]["code"]) == (503, "C080")
        assert agent.ws_open() == {"open": True}
        agent.ws_send({"id": 1, "subscribe": True})
        assert agent.ws_recv()["msg"]["subscribed"] is True
        rig.stop_card(0)  # returns once pcscd reports the slot empty
        noticed = time.monotonic()
        got = agent.ws_recv(timeout=5)
        assert got["msg"] == {"event": "ejected", "reader": slot0}
        assert got["t"] - noticed < 2.0
        rig.start_card(0)  # card0 leaves a card in slot 0, as it found it  # returns once pcscd reports a card present
        noticed = time.monotonic()
        got = agent.ws_recv(timeout=5)
        assert got["msg"]["event"] == "inserted" and got["msg"]["reader"] == slot0
        assert got["msg"]["atr"] == rig.atr(0).hex().upper()
        assert got["t"] - noticed < 2.0


def test_start_up_errors_are_one_line(tmp_path, proxy_factory):
    import subprocess

    from support import TWISTD

    def twistd(*args, env=None):
        return subprocess.run([TWISTD, "-n", "--pidfile=", "foxyproxy",
                               "-p", f"tcp:0:interface={HOST}", *args], capture_output=True, text=True,
                              timeout=30, env=env, cwd=tmp_path)

    import os

    env = {k: v for k, v in os.environ.items() if k != "FOXYPROXY_API_TOKEN"}
    out = twistd("--api", "tcp:0", env=env)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "twistd foxyproxy: --api needs a token: --api-token-file FILE, env FOXYPROXY_API_TOKEN, "
        "or client secrets in --credentials FILE"]
    busy = start(proxy_factory)
    out = twistd("--api", f"tcp:{busy.api_port}:interface={HOST}", env=dict(env, FOXYPROXY_API_TOKEN="t"))
    assert out.returncode == 1
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "twistd foxyproxy:" in line]
    assert len(problems) == 1 and f"twistd foxyproxy: cannot listen on tcp:{busy.api_port}" in problems[0]
    assert problems[0].endswith(" (--api): Address already in use")
    assert "Traceback" not in out.stderr + out.stdout


def test_api_works_beside_client_passwords_and_credentials(proxy_factory, tmp_path):
    """The API's clients prove its bearer token; the line protocol's client
    password (simple mode) or --credentials do not lock them out, while a
    line client still needs its own secret (docs/security.md)."""
    password = tmp_path / "client-password"
    password.write_text("line-secret\n")
    secret = "credential-secret-0123456789abcdef"
    credentials = tmp_path / "credentials.toml"
    credentials.write_text('[[client]]\nname = "lineonly"\nsecret_sha256 = "%s"\nreaders = ["Emulated 00"]\n'
                           % hashlib.sha256(secret.encode()).hexdigest())
    for option, path in (("--client-password-file", password), ("--credentials", credentials)):
        p = start(proxy_factory, "--backend", "emulated:?cards=2", option, str(path))
        with ApiAgent(p.base, TOKEN) as a:
            status, body, _ = a.http("POST", "/api/v1/readers/Emulated%2001/transmit", {"apdus": [SELECT_MF]})
            assert (status, body) == (200, {"atr": None, "responses": ["9000"]}), option
            status, body, _ = a.http("POST", "/api/v1/sessions", {"reader": "Emulated 01", "idle_timeout": 5})
            assert status == 200 and body["session"], (option, body)
        client = LineClient(HOST, p.port)
        try:
            assert client.request(">Emulated 00|\n>1:APDU:%s|\n\n" % SELECT_MF) == [("1", "C085")], option
        finally:
            client.close()
