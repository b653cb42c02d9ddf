"""One door: the same identity matrix through every front end of a real
``twistd foxyproxy`` (docs/security.md: every front end is judged by
``Dispatcher.identify`` against the ``--credentials`` identities), with the
same outcome and the same ``--audit-log`` lines on each.

Identities (``--credentials``): ``alice`` may use reader ``Emulated 00``
only, commands APDU and READERS only, on every front end; ``bob`` may use
every reader and command, on the line protocol only.

Front ends (``FRONTENDS``, one adapter each, same methods):

=============  ===============================================================
``line``       the line protocol (``-p``), secret on the reader line
``rest``       CloudFoxy REST (``--rest``), ``X-Auth-Token``
``api``        the JSON API (``--api``), ``Authorization: Bearer``
``ws``         the API's WebSocket with the bearer header on the upgrade
``ws_msg``     the API's WebSocket authenticated by its first message ``{"auth"}``
``metrics``    ``--metrics``: ``/metrics`` (Bearer), ``/status.json`` (Basic)
``ram``        the RAM server (``--ram``), secret in the path ``/rt/SECRET``
``ram_daemon`` the RAM daemon (``--ram-daemon``): loopback only, no secret
=============  ===============================================================

Cases (one test function each, parametrized over the front ends, so a
failure is named ``test_CASE[FRONTEND]``; a case that has no meaning on a
front end is skipped with ``n/a: why``):

1. ``allowed``: alice's SELECT MF on Emulated 00 answers 9000; one audit
   ``request`` line: alice, the front end, the client's own ``HOST:PORT``.
2. ``forbidden_reader``: Emulated 01 is in no listing alice gets, and
   named, answers as unknown (C083 / 404).
3. ``forbidden_command``: RESET answers C085 (REST/API 403).
4. ``wrong_secret``: 5 guesses on a fresh proxy: all refused, the 4th and
   5th answered at least 0.2 s later, one ``auth_failure`` line each, the
   guess in neither the log nor the audit file.
5. ``no_secret``: refused (C085 / 401 / 4401 / 404); health checks open.
6. ``protected_mode``: from 192.0.2.1 inside a network namespace, a proxy
   without --credentials (tests/one_door_ns_client.py).
7. ``frontend_not_allowed``: bob's secret off the line protocol is refused
   and audited (``front end not allowed``, identity bob).

Each proxy serves one front end (plus the line protocol every proxy has);
the API and both WebSocket adapters share one.
"""

import base64
import contextlib
import hashlib
import http.client
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time

import pytest
from support import HOST, LineClient, ProxyProcess, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ALICE = "alice-0123456789abcdef-door"  # URL path characters: also a RAM path secret
BOB = "bob-0123456789abcdef-door"
SELECT_MF = "00A4000C023F00"
ALLOWED, FORBIDDEN = "Emulated 00", "Emulated 01"
GUESSES = 5
FREE_GUESSES = 3  # docs/security.md: an address's first 3 failures are answered at once
SLOW = 0.2  # the 4th waits 0.25 s, the 5th 0.5 s
ATR = bytes.fromhex("3B8B8001466F7879456D753738313677")


def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()


def b64(text):
    return base64.b64encode(text.encode()).decode()


def basic(secret, user="door"):
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


def credentials(path):
    path.write_text(
        f'[[client]]\nname = "alice"\nsecret_sha256 = "{sha(ALICE)}"\n'
        f'readers = ["{ALLOWED}"]\ncommands = ["APDU", "READERS"]\n'
        f'frontends = ["line", "rest", "api", "ram", "metrics"]\n\n'
        f'[[client]]\nname = "bob"\nsecret_sha256 = "{sha(BOB)}"\nreaders = ["*"]\nfrontends = ["line"]\n')
    return str(path)


def sockname(sock):
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


# -- the audit log


class Audit:
    """The ``--audit-log`` file: ``new()`` gives the records written since
    the last call."""

    def __init__(self, path):
        self.path = path
        self.seen = 0

    def records(self):
        """Every complete line of the file, parsed (a line still being
        written is left for the next call)."""
        lines = self.text().split("\n")[:-1]
        return [json.loads(line) for line in lines if line.strip()]

    def text(self):
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def mark(self):
        self.seen = len(self.records())

    def new(self, at_least=0, settle=0.3, timeout=5.0):
        """The records since the mark, once ``at_least`` came (bounded) and
        ``settle`` seconds passed without more being awaited."""
        wait_for(lambda: len(self.records()) - self.seen >= at_least, timeout=timeout)
        time.sleep(settle)
        got = self.records()[self.seen:]
        self.seen += len(got)
        return got


def summary(record):
    """The fields every front end must agree on."""
    keys = ("event", "identity", "frontend", "peer", "results") if record.get("event") == "request" else (
        "event", "identity", "frontend", "peer", "reason")
    return {k: record.get(k) for k in keys}


# -- proxies


class Proxy:
    """A ProxyProcess with its audit file; ``http(name)`` is the port of the
    HTTP listener whose factory is ``name`` (ProxyProcess.ports)."""

    def __init__(self, process, audit):
        self.process = process
        self.audit = Audit(audit)
        self.extra = {}
        self.log_seen = self.audit_seen = 0

    @property
    def line(self):
        return self.process.port

    def http(self, *names):
        for name in names:
            if name in self.process.ports:
                return self.process.ports[name][0]
        others = [p for n, ps in self.process.ports.items() if n != "LineFactory" for p in ps]
        assert len(others) == 1, f"no listener {names} in {self.process.ports}"
        return others[0]

    def log(self):
        return self.process.log() + self.process.output()

    def mark(self):
        """Start a test: audit records and log lines are judged from here."""
        self.audit.mark()
        self.log_seen = len(self.process.log())
        self.audit_seen = len(self.audit.text())

    def assert_no_secret(self, *secrets):
        """None of ``secrets`` in what the proxy logged since mark(), nor
        in the audit lines written since."""
        text = self.process.log()[self.log_seen:] + self.process.output()
        audit = self.audit.text()[self.audit_seen:]
        found = [f"{where}: {line[:400]}" for where, lines in (("log", text), ("audit", audit))
                 for line in lines.splitlines() if any(secret in line for secret in secrets)]
        assert not found, "a secret was written down:\n" + "\n".join(found)


EP = f"tcp:0:interface={HOST}"


def group_args(group, d):
    """The options and listener count of the proxy of a front-end group."""
    if group == "line":
        return [], 1
    if group == "rest":
        return ["--rest", EP], 2
    if group == "api":
        return ["--api", EP], 2
    if group == "metrics":
        return ["--metrics", EP], 2
    if group == "ram":
        return ["--ram", EP, "--ram-done-after", "1"], 2
    if group == "ram_daemon":
        # the daemon drives one of the proxy's cards for the proxy's own RAM
        # server, where alice's secret (a --credentials client) names the session
        ram = free_port()
        approved = os.path.join(d, "approved-urls")
        with open(approved, "w") as f:
            f.write(f"http://{HOST}:{ram}/rt/ {ALLOWED}\n")
        return ["--ram", f"tcp:{ram}:interface={HOST}", "--ram-done-after", "1",
                "--ram-daemon", EP, "--ram-approved-urls", approved], 3
    raise AssertionError(group)


def start_proxy(group, d):
    d.mkdir(parents=True, exist_ok=True)
    args, listeners = group_args(group, str(d))
    audit = str(d / "audit.jsonl")
    creds = credentials(d / "credentials.toml")
    process = ProxyProcess("--no-signing", "--credentials", creds, "--audit-log", audit, *args,
                           listeners=listeners)
    process.start()
    return Proxy(process, audit)


@pytest.fixture(scope="module")
def proxies(tmp_path_factory):
    """``proxies(group)``: the module's proxy of that front-end group,
    started when first asked for; a proxy that does not start fails the
    tests of its group only."""
    made = {}

    def get(group):
        if group not in made:
            try:
                made[group] = start_proxy(group, tmp_path_factory.mktemp(group))
            except RuntimeError as e:
                made[group] = e
        proxy = made[group]
        if isinstance(proxy, Exception):
            pytest.fail(f"the {group} proxy did not start: {str(proxy)[-1500:]}", pytrace=False)
        proxy.mark()
        return proxy

    yield get
    for proxy in made.values():
        if isinstance(proxy, Proxy):
            proxy.process.stop()


@pytest.fixture
def fresh(tmp_path):
    """``fresh(group)``: a new proxy (failures are counted per peer address
    across front ends, so each guessing test starts from zero)."""
    made = []

    def get(group):
        try:
            proxy = start_proxy(group, tmp_path / group)
        except RuntimeError as e:
            pytest.fail(f"the {group} proxy did not start: {str(e)[-1500:]}", pytrace=False)
        made.append(proxy)
        proxy.mark()
        return proxy

    yield get
    for proxy in made:
        proxy.process.stop()


# -- clients


class Reply:
    def __init__(self, status, headers, body, peer, took):
        self.status, self.headers, self.body, self.peer, self.took = status, headers, body, peer, took

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def code(self):
        """The result code of a JSON error answer."""
        try:
            return self.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


def http_call(port, method, path, headers=None, body=None, declare=None, timeout=10.0):
    """One request on a new connection; ``declare``: a Content-Length to
    declare without sending the body (what a refusal is judged on)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.connect()
        peer = sockname(conn.sock)
        t0 = time.monotonic()
        if declare is None:
            conn.request(method, path, body=body, headers=headers or {})
        else:
            conn.putrequest(method, path)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.putheader("Content-Length", str(declare))
            conn.endheaders()
        r = conn.getresponse()
        data = r.read()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, data, peer, time.monotonic() - t0)
    finally:
        conn.close()


class Closed:
    """A WebSocket closed by the server: ``code`` of its close frame (None: no frame)."""

    def __init__(self, code, reason=""):
        self.code, self.reason = code, reason

    def __repr__(self):
        return f"<closed {self.code} {self.reason!r}>"


class Ws:
    """A websocket-client connection to ``/api/v1/ws``."""

    def __init__(self, port, bearer=None):
        import websocket

        headers = [f"Authorization: Bearer {bearer}"] if bearer is not None else []
        self.ws = websocket.create_connection(f"ws://{HOST}:{port}/api/v1/ws", timeout=10, header=headers,
                                              suppress_origin=True)
        self.peer = sockname(self.ws.sock)

    def send(self, msg):
        self.ws.send(json.dumps(msg))

    def next(self):
        """The next JSON message, or Closed."""
        import websocket

        while True:
            try:
                opcode, frame = self.ws.recv_data_frame(True)
            except websocket.WebSocketConnectionClosedException:
                return Closed(None)
            if opcode == websocket.ABNF.OPCODE_TEXT:
                return json.loads(frame.data)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                data = frame.data or b""
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                return Closed(code, data[2:].decode("utf-8", "replace"))

    def answer(self, mid):
        """The answer to message ``mid`` (events are passed over), or Closed."""
        while True:
            msg = self.next()
            if isinstance(msg, Closed) or msg.get("id") == mid and "event" not in msg:
                return msg

    def close(self):
        with contextlib.suppress(Exception):  # closed by the server already
            self.ws.close(timeout=2)


def ws_upgrade(port, bearer):
    """A WebSocket upgrade request by hand (the refused handshake's status,
    with the client's own port)."""
    return http_call(port, "GET", "/api/v1/ws", headers={
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "Authorization": f"Bearer {bearer}"})


def readers_of(listing):
    """Reader names of a listing: names, or dicts with ``name``."""
    return [r["name"] if isinstance(r, dict) else r for r in listing]


def na(why):
    pytest.skip(f"n/a: {why}")


def applies(fe, method):
    """Skip (n/a) unless the adapter ``fe`` has its own ``method``."""
    if getattr(type(fe), method) is getattr(Frontend, method):
        getattr(fe, method)(None)


# -- the adapters: one per front end, the same methods


class Frontend:
    """What every adapter answers (``na`` where a case has no meaning).

    * ``allowed(proxy)``: alice uses Emulated 00; the request audit
      records expected, as summary() dicts (None: not checked);
    * ``forbidden_reader(proxy)``: the peers of the requests that named
      Emulated 01 (each one audit request line with C083);
    * ``forbidden_command(proxy)``: the peer of the RESET request;
    * ``guess(proxy, secret)``: one refused attempt: its peer;
    * ``no_secret(proxy)``; ``not_allowed(proxy)``: bob's attempt: its
      peer and whether it was refused;
    * ``remote(ns)``: the namespace run's answers (case 6).
    """

    name = audit = group = None
    guess_reason = "wrong password or secret"

    def allowed(self, proxy):
        na(f"{self.name} runs no card commands")

    def forbidden_reader(self, proxy):
        na(f"{self.name} lists no readers")

    def forbidden_command(self, proxy):
        na(f"{self.name} runs no card commands")

    def guess(self, proxy, secret=None):
        na(f"{self.name} takes no secret")

    def no_secret(self, proxy):
        na(f"{self.name} takes no secret")

    def not_allowed(self, proxy):
        na(f"{self.name} takes no identity")

    def remote(self, ns):
        na(f"{self.name} is not in the namespace run")

    def request(self, peer, results, identity="alice"):
        return {"event": "request", "identity": identity, "frontend": self.audit, "peer": peer,
                "results": results}


class Line(Frontend):
    name = audit = group = "line"

    def allowed(self, proxy):
        with LineClient(HOST, proxy.line) as c:
            assert c.results(f">{ALLOWED}:{ALICE}|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
            return [self.request(sockname(c.sock), {"OK": 1})]

    def forbidden_reader(self, proxy):
        with LineClient(HOST, proxy.line) as c:
            assert c.results(f">*:{ALICE}|\n>1:READERS|\n\n") == [b64(ALLOWED)], "READERS"
            assert c.results(f">{FORBIDDEN}:{ALICE}|\n>1:APDU:{SELECT_MF}|\n\n") == ["C083"]
            return [sockname(c.sock)]

    def forbidden_command(self, proxy):
        with LineClient(HOST, proxy.line) as c:
            assert c.results(f">{ALLOWED}:{ALICE}|\n>1:RESET|\n\n") == ["C085"]
            return sockname(c.sock)

    def guess(self, proxy, secret):
        c = proxy.extra.get("guesser")
        if c is None:  # one connection guessing (closed after 10 failures)
            c = proxy.extra["guesser"] = LineClient(HOST, proxy.line, timeout=15)
        assert c.results(f">{ALLOWED}:{secret}|\n>1:APDU:{SELECT_MF}|\n\n") == ["C085"]
        return sockname(c.sock)

    def no_secret(self, proxy):
        with LineClient(HOST, proxy.line) as c:
            assert c.results(f">{ALLOWED}|\n>1:APDU:{SELECT_MF}|\n\n") == ["C085"]

    def not_allowed(self, proxy):
        with LineClient(HOST, proxy.line) as c:  # bob's front end: served (the control)
            assert c.results(f">{ALLOWED}:{BOB}|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
            return sockname(c.sock), False

    def remote(self, ns):
        assert ns["line remote"] == ["C085"] and ns["line remote again"] == ["C085"], ns["line remote"]
        assert ns["line loopback"] == ["9000"]
        told = [line for line in ns["log"].splitlines() if "protected mode serves only loopback" in line]
        assert len(told) == 1 and "192.0.2.1" in told[0], told
        assert "--port" in warned(ns), warned(ns)


class Rest(Frontend):
    name = audit = group = "rest"

    def get(self, proxy, path, token):
        return http_call(proxy.http("Site"), "GET", path, {"X-Auth-Token": token} if token else {})

    def allowed(self, proxy):
        r = self.get(proxy, f"/api/v1/basic?terminal=/Emulated_00&apdu={SELECT_MF}", ALICE)
        assert (r.status, r.text) == (200, "9000\n"), r
        return [self.request(r.peer, {"OK": 1})]

    def forbidden_reader(self, proxy):
        r = self.get(proxy, "/api/v1/inventory", ALICE)
        assert r.status == 200 and [line.split()[0] for line in r.text.splitlines()] == ["/Emulated_00"], r
        r = self.get(proxy, "/api/v1/hello", ALICE)
        assert r.status == 200 and "Cards: 1" in r.text.splitlines(), r
        r = self.get(proxy, f"/api/v1/basic?terminal=/Emulated_01&apdu={SELECT_MF}", ALICE)
        assert r.status == 404 and r.text.startswith("C083"), r
        return [r.peer]

    def forbidden_command(self, proxy):
        r = self.get(proxy, "/api/v1/basic?terminal=/Emulated_00&reset=1", ALICE)
        assert r.status == 403 and r.text.startswith("C085"), r
        return r.peer

    def guess(self, proxy, secret):
        r = self.get(proxy, f"/api/v1/basic?terminal=/Emulated_00&apdu={SELECT_MF}", secret)
        assert r.status == 401, r
        return r.peer

    def no_secret(self, proxy):
        r = self.get(proxy, f"/api/v1/basic?terminal=/Emulated_00&apdu={SELECT_MF}", None)
        assert r.status == 401, r
        r = self.get(proxy, "/api/v1/hello", None)
        assert r.status == 401, r

    def not_allowed(self, proxy):
        r = self.get(proxy, "/api/v1/hello", BOB)
        assert r.status == 401, r
        return r.peer, True

    def remote(self, ns):
        assert ns["rest remote"].get("status") == 401, ns["rest remote"]
        assert ns["rest remote token"].get("status") == 200, ns["rest remote token"]
        assert "--rest" not in warned(ns), warned(ns)


class Api(Frontend):
    name = "api"
    audit = group = "api"

    def call(self, proxy, method, path, token, body=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return http_call(proxy.http("ApiSite"), method, path, headers, data)

    def transmit(self, proxy, reader, body, token=ALICE):
        return self.call(proxy, "POST", f"/api/v1/readers/{reader.replace(' ', '%20')}/transmit", token, body)

    def allowed(self, proxy):
        r = self.transmit(proxy, ALLOWED, {"apdus": [SELECT_MF]})
        assert (r.status, r.body.rstrip(b"\n")) == (200, b'{"atr":null,"responses":["9000"]}'), r
        return [self.request(r.peer, {"OK": 1})]

    def forbidden_reader(self, proxy):
        r = self.call(proxy, "GET", "/api/v1/readers", ALICE)
        assert r.status == 200 and readers_of(r.json()["readers"]) == [ALLOWED], r
        r = self.transmit(proxy, FORBIDDEN, {"apdus": [SELECT_MF]})
        assert (r.status, r.code()) == (404, "C083"), r
        return [r.peer]

    def forbidden_command(self, proxy):
        r = self.transmit(proxy, ALLOWED, {"reset": True, "apdus": []})
        assert (r.status, r.code()) == (403, "C085"), r
        return r.peer

    def refused_transmit(self, proxy, token):
        """A transmit refused on its head: the body is declared, never sent."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        body = json.dumps({"apdus": [SELECT_MF]})
        r = http_call(proxy.http("ApiSite"), "POST", "/api/v1/readers/Emulated%2000/transmit", headers,
                      declare=len(body))
        assert (r.status, r.code()) == (401, "C085"), r
        assert r.headers.get("www-authenticate", "").startswith("Bearer"), r.headers
        return r

    def guess(self, proxy, secret):
        return self.refused_transmit(proxy, secret).peer

    def no_secret(self, proxy):
        self.refused_transmit(proxy, None)
        r = self.call(proxy, "GET", "/api/v1/readers", None)
        assert (r.status, r.code()) == (401, "C085"), r

    def not_allowed(self, proxy):
        return self.refused_transmit(proxy, BOB).peer, True

    def remote(self, ns):
        assert "api remote" in ns, "the namespace proxy did not start with --api: " + ns.get("api_error", "")
        assert ns["api remote"].get("status") == 401, ns["api remote"]
        assert ns["api remote token"].get("status") == 200, ns["api remote token"]
        assert "--api" not in warned(ns), warned(ns)


class WsHeader(Api):
    """The WebSocket with ``Authorization: Bearer`` on the upgrade."""

    name = "ws"

    def open(self, proxy, secret=ALICE):
        return Ws(proxy.http("ApiSite"), bearer=secret)

    def allowed(self, proxy):
        ws = self.open(proxy)
        try:
            ws.send({"id": 1, "reader": ALLOWED, "apdus": [SELECT_MF]})
            assert ws.answer(1) == {"id": 1, "atr": None, "responses": ["9000"]}
            return [self.request(ws.peer, {"OK": 1})]
        finally:
            ws.close()

    def forbidden_reader(self, proxy):
        ws = self.open(proxy)
        try:
            ws.send({"id": 2, "subscribe": True})
            answer = ws.answer(2)
            assert isinstance(answer, dict) and answer.get("subscribed") is True, answer
            assert readers_of(answer["readers"]) == [ALLOWED], answer
            ws.send({"id": 3, "reader": FORBIDDEN, "apdus": [SELECT_MF]})
            answer = ws.answer(3)
            assert isinstance(answer, dict) and answer.get("error", {}).get("code") == "C083", answer
            return [ws.peer]
        finally:
            ws.close()

    def forbidden_command(self, proxy):
        ws = self.open(proxy)
        try:
            ws.send({"id": 4, "reader": ALLOWED, "reset": True, "apdus": []})
            answer = ws.answer(4)
            assert isinstance(answer, dict) and answer.get("error", {}).get("code") == "C085", answer
            return ws.peer
        finally:
            ws.close()

    def guess(self, proxy, secret):
        r = ws_upgrade(proxy.http("ApiSite"), secret)
        assert (r.status, r.code()) == (401, "C085"), r
        return r.peer

    def no_secret(self, proxy):
        ws = Ws(proxy.http("ApiSite"))
        try:
            ws.send({"id": 5, "reader": ALLOWED, "apdus": [SELECT_MF]})
            answer = ws.next()
            assert isinstance(answer, Closed) and answer.code == 4401, answer
        finally:
            ws.close()

    def not_allowed(self, proxy):
        r = ws_upgrade(proxy.http("ApiSite"), BOB)
        assert (r.status, r.code()) == (401, "C085"), r
        return r.peer, True

    remote = Frontend.remote  # case 6 asks the API over HTTP only


class WsMessage(WsHeader):
    """The WebSocket without a header: the first message is ``{"auth": SECRET}``."""

    name = "ws_msg"

    def open(self, proxy, secret=ALICE):
        ws = Ws(proxy.http("ApiSite"))
        ws.send({"id": 0, "auth": secret})
        answer = ws.answer(0)
        if answer != {"id": 0, "authenticated": True}:
            ws.close()
            raise AssertionError(f"the auth message was answered {answer}")
        return ws

    def attempt(self, proxy, secret):
        ws = Ws(proxy.http("ApiSite"))
        try:
            t0 = time.monotonic()
            ws.send({"id": 0, "auth": secret})
            answer = ws.next()
            ws.took = time.monotonic() - t0
            assert isinstance(answer, Closed) and answer.code == 4401, answer
            return ws
        finally:
            ws.close()

    def guess(self, proxy, secret):
        return self.attempt(proxy, secret).peer

    def not_allowed(self, proxy):
        return self.attempt(proxy, BOB).peer, True


class Metrics(Frontend):
    name = audit = group = "metrics"

    def get(self, proxy, path, authorization=None):
        return http_call(proxy.http("StatusSite"), "GET", path,
                         {"Authorization": authorization} if authorization else {})

    def allowed(self, proxy):
        r = self.get(proxy, "/metrics", f"Bearer {ALICE}")
        assert r.status == 200 and "foxyproxy_" in r.text, r
        r = self.get(proxy, "/status.json", basic(ALICE))
        assert r.status == 200 and "readers" in r.json(), r
        return []  # no card request

    def forbidden_reader(self, proxy):
        r = self.get(proxy, "/metrics", f"Bearer {ALICE}")
        assert r.status == 200, r
        labels = set(re.findall(r'reader="([^"]*)"', r.text))
        assert f'reader="{FORBIDDEN}"' not in r.text, sorted(labels)
        assert ALLOWED in labels, sorted(labels)
        r = self.get(proxy, "/status.json", basic(ALICE))
        assert r.status == 200 and [x["name"] for x in r.json()["readers"]] == [ALLOWED], r.json()["readers"]
        return []

    def guess(self, proxy, secret):
        r = self.get(proxy, "/metrics", f"Bearer {secret}")
        assert (r.status, r.code()) == (401, "C085"), r
        return r.peer

    def no_secret(self, proxy):
        r = self.get(proxy, "/metrics")
        assert (r.status, r.code()) == (401, "C085"), r
        for path in ("/healthz", "/readyz"):
            r = self.get(proxy, path)
            assert r.status == 200, (path, r)

    def not_allowed(self, proxy):
        r = self.get(proxy, "/metrics", f"Bearer {BOB}")
        assert (r.status, r.code()) == (401, "C085"), r
        return r.peer, True

    def remote(self, ns):
        r = ns["metrics remote"]
        assert r.get("status") == 403, r
        assert json.loads(r["body"])["error"]["code"] == "C085", r
        assert ns["metrics remote status.json"].get("status") == 403, ns["metrics remote status.json"]
        assert ns["healthz remote"].get("status") == 200 and ns["readyz remote"].get("status") == 200, (
            ns["healthz remote"], ns["readyz remote"])
        assert ns["metrics loopback"].get("status") == 200, ns["metrics loopback"]
        assert "--metrics" in warned(ns), warned(ns)


def tlv(tag, value):
    assert len(value) < 0x80
    return bytes([tag, len(value)]) + value


RAM_TYPE = "application/org.openscdp-content-mgt-response;version=1.0"


class Ram(Frontend):
    """The RAM server: its clients attach a card (reader ``RAM NAME``, the
    identity's name); they send no card commands of their own."""

    name = audit = group = "ram"

    def post(self, proxy, path, body, cookie=None, timeout=10.0, declare=False):
        headers = {"Content-Type": RAM_TYPE}
        if cookie:
            headers["Cookie"] = f"JSESSIONID={cookie}"
        if declare:  # refused on its head: the body is never read
            return http_call(proxy.http("RamSite"), "POST", path, headers, declare=len(body), timeout=timeout)
        return http_call(proxy.http("RamSite"), "POST", path, headers, body, timeout=timeout)

    def allowed(self, proxy):
        # alice attaches a card; bob (every reader, line only) uses it as "RAM alice"
        held = {}
        first = threading.Thread(target=lambda: held.update(r=self.post(
            proxy, f"/rt/{ALICE}", tlv(0xE8, tlv(0xC0, ATR)), timeout=20)))
        first.start()

        def listed():
            with LineClient(HOST, proxy.line) as c:
                [names] = c.results(f">*:{BOB}|\n>1:READERS|\n\n")
            return "RAM alice" in [base64.b64decode(n).decode() for n in names.split("|") if n]

        wait_for(listed, timeout=10, what="reader RAM alice")
        got = {}

        def use():
            with LineClient(HOST, proxy.line, timeout=20) as c:
                got["peer"] = sockname(c.sock)
                got["results"] = c.results(f">RAM alice:{BOB}|\n>1:APDU:{SELECT_MF}|\n\n")

        user = threading.Thread(target=use)
        user.start()
        first.join(20)
        r = held.get("r")
        assert r is not None and r.status == 200, r
        assert r.body == tlv(0xAA, tlv(0x22, bytes.fromhex(SELECT_MF))), r
        cookie = re.search(r"JSESSIONID=([^;]+)", r.headers.get("set-cookie", ""))
        assert cookie, r.headers
        last = self.post(proxy, f"/rt/{ALICE}", tlv(0xAB, tlv(0x23, b"\x90\x00") + tlv(0x80, b"\x01")),
                         cookie.group(1), timeout=20)
        user.join(20)
        assert got.get("results") == ["9000"], got
        assert last.status == 204, last  # --ram-done-after 1: the session ended
        assert "RAM session of alice began" in proxy.log()
        return [{"event": "request", "identity": "bob", "frontend": "line", "peer": got["peer"],
                 "results": {"OK": 1}}]

    def guess(self, proxy, secret):
        r = self.post(proxy, f"/rt/{secret}", tlv(0xE8, tlv(0xC0, ATR)), declare=True)
        assert r.status == 404 and "set-cookie" not in r.headers, r
        return r.peer

    def no_secret(self, proxy):
        r = self.post(proxy, "/rt/", tlv(0xE8, tlv(0xC0, ATR)), declare=True)
        assert r.status == 404, r

    def not_allowed(self, proxy):
        r = self.post(proxy, f"/rt/{BOB}", tlv(0xE8, tlv(0xC0, ATR)), declare=True)
        assert r.status == 404 and "set-cookie" not in r.headers, r
        return r.peer, True

    def remote(self, ns):
        assert ns["ram remote"].get("status") == 404, ns["ram remote"]
        assert "--ram" not in warned(ns), warned(ns)


class RamDaemon(Frontend):
    """The RAM daemon: a loopback-only trigger without a secret."""

    name = group = "ram_daemon"
    audit = "ram-daemon"

    def trigger(self, proxy, url, timeout=20.0):
        return http_call(proxy.http("RamDaemonSite"), "GET", f"/update.png?url={url}&sessionId=door1",
                         timeout=timeout)

    def allowed(self, proxy):
        # a session with the proxy's own RAM server under alice's secret: passed (green 24x24)
        ram = proxy.http("RamSite")
        r = self.trigger(proxy, f"http://{HOST}:{ram}/rt/{ALICE}")
        assert r.status == 200 and r.headers.get("content-type") == "image/png", r
        assert r.headers.get("x-ram-result", "").startswith("passed"), r.headers
        assert struct.unpack(">II", r.body[16:24]) == (24, 24), r.headers
        # (returns None: the daemon's own card commands are not checked)

    def no_secret(self, proxy):
        # loopback: served without a secret, but an unapproved URL starts nothing
        r = self.trigger(proxy, "http://198.51.100.7/rt/x")
        assert r.status == 200 and r.headers.get("x-ram-result", "").startswith("failed"), r.headers

    def remote(self, ns):
        assert ns["daemon remote"].get("status") == 403, ns["daemon remote"]
        assert "--ram-daemon" in warned(ns), warned(ns)


FRONTENDS = {f.name: f for f in (Line(), Rest(), Api(), WsHeader(), WsMessage(), Metrics(), Ram(), RamDaemon())}
each = pytest.mark.parametrize("fe", list(FRONTENDS.values()), ids=list(FRONTENDS))


def expect(records, wanted, what):
    """``records`` (summary() of each) are ``wanted``, in order."""
    got = [summary(r) for r in records]
    assert got == wanted, f"audit lines of {what}:\n got  {got}\n want {wanted}"


# -- the matrix


@each
def test_1_allowed_reader(proxies, fe):
    proxy = proxies(fe.group)
    wanted = fe.allowed(proxy)
    records = proxy.audit.new(at_least=len(wanted or ()))
    assert [r for r in records if r.get("event") == "auth_failure"] == [], records
    if wanted is not None:
        expect([r for r in records if r.get("event") == "request"], wanted, "alice's request")
        for r in records:
            if r.get("event") == "request" and r.get("identity") == "alice":
                assert r.get("reader") == ALLOWED, r
    proxy.assert_no_secret(ALICE, BOB)


@each
def test_2_forbidden_reader(proxies, fe):
    proxy = proxies(fe.group)
    peers = fe.forbidden_reader(proxy)
    records = proxy.audit.new(at_least=len(peers))
    expect(records, [fe.request(peer, {"C083": 1}) for peer in peers], "requests naming Emulated 01")
    proxy.assert_no_secret(ALICE, BOB)


@each
def test_3_forbidden_command(proxies, fe):
    proxy = proxies(fe.group)
    peer = fe.forbidden_command(proxy)
    expect(proxy.audit.new(at_least=1), [fe.request(peer, {"C085": 1})], "the RESET")
    proxy.assert_no_secret(ALICE, BOB)


@each
def test_4_wrong_secret_guessing(fresh, fe):
    applies(fe, "guess")
    proxy = fresh(fe.group)
    guesses = [f"guess-{i}-{os.urandom(6).hex()}" for i in range(GUESSES)]
    peers, took = [], []
    try:
        for secret in guesses:
            t0 = time.monotonic()
            peers.append(fe.guess(proxy, secret))
            took.append(time.monotonic() - t0)
    finally:
        guesser = proxy.extra.pop("guesser", None)
        if guesser is not None:
            guesser.close()
    slow = took[FREE_GUESSES:]
    assert all(t >= SLOW for t in slow), f"answers after the third came after {took} s"
    assert all(t < SLOW for t in took[:FREE_GUESSES]), f"the first three answers came after {took} s"
    records = proxy.audit.new(at_least=GUESSES)
    expect(records, [{"event": "auth_failure", "identity": None, "frontend": fe.audit, "peer": peer,
                      "reason": fe.guess_reason} for peer in peers], f"{GUESSES} wrong secrets")
    proxy.assert_no_secret(ALICE, BOB, *guesses)


@each
def test_5_no_secret(proxies, fe):
    proxy = proxies(fe.group)
    fe.no_secret(proxy)
    # a request without a secret is not a guess (docs/security.md): not
    # counted, and, as on the HTTP front ends (refused on the request head),
    # nothing for the audit trail
    expect(proxy.audit.new(), [], "a request without a secret")
    proxy.assert_no_secret(ALICE, BOB)


@each
def test_6_protected_mode_from_a_non_loopback_address(request, fe):
    applies(fe, "remote")
    fe.remote(request.getfixturevalue("namespace_run"))  # one run for every front end


@each
def test_7_identity_not_allowed_on_the_frontend(proxies, fe):
    applies(fe, "not_allowed")
    proxy = proxies(fe.group)
    peer, refused = fe.not_allowed(proxy)
    records = proxy.audit.new(at_least=1)
    if refused:
        expect(records, [{"event": "auth_failure", "identity": "bob", "frontend": fe.audit, "peer": peer,
                          "reason": "front end not allowed"}], "bob's refused attempt")
        wait_for(lambda: re.search(rf"authentication failed on {fe.audit} \(front end not allowed, client bob\)",
                                   proxy.process.log()), timeout=5,
                 what=f"the log line of bob refused on {fe.audit}")
    else:
        expect(records, [fe.request(peer, {"OK": 1}, identity="bob")], "bob's request")
    proxy.assert_no_secret(ALICE, BOB)


# -- case 6 runs once, in a network namespace


def warned(ns):
    """The options named by the start-up warnings about listeners reachable
    from outside loopback with no authentication."""
    return set(re.findall(r"\((--[a-z-]+)\) is reachable from outside loopback with no authentication",
                          ns["log"]))


@pytest.fixture(scope="module")
def namespace_run():
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "one_door_ns_client.py")
    tests = os.path.dirname(script)
    run = subprocess.run(
        ["unshare", "-rn", "sh", "-c", ("ip addr add 192.0.2.1/32 dev lo && ip link set lo up && "
                                        f"exec {sys.executable} {script} {tests}")],
        check=False, capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])
