"""Every listener of one real proxy on an ``ssl:`` endpoint (a self-signed
certificate for IP 127.0.0.1 made by openssl), reached by real TLS clients
with and without ALPN: curl (default: offers h2 and http/1.1; --no-alpn;
--http1.1) and Python's ssl (ALPN h2 + http/1.1 offered, and none).

HTTPS front ends must complete the handshake whether or not ALPN is
offered and must never pick h2 (they speak HTTP/1.1 only).  Each test
checks the listener's real answer: status and body.

The line protocol listeners (-p and --listen) are checked with Python's
ssl only.  The RAM daemon's session runs against the same proxy's RAM
server over HTTPS (the proxy trusts the certificate through
SSL_CERT_FILE).

Ports are chosen up front (support.free_port) and waited for until they
accept connections, so nothing depends on the names listeners log.
"""

import base64
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

import support
from support import HOST, ProxyProcess, accepts, free_port, wait_for

TOKENS = {"rest": "rest-token-0123456789", "api": "api-token-0123456789",
          "metrics": "metrics-token-0123456789"}
READERS = [f"Emulated 0{i}" for i in range(4)]
EMULATED_ATR = "3B8B8001466F7879456D753738313677"
SELECT_MF = bytes.fromhex("00A4000C023F00")
RAM_TYPE = "application/org.openscdp-content-mgt-response;version=1.0"
# RAMOverHTTP bodies written by hand (docs/ramoverhttp.md "Wire format"):
INITIATION = bytes([0xE8, 2 + 16, 0xC0, 16]) + bytes.fromhex(EMULATED_ATR)  # E8 { C0 ATR }
SCRIPT_SELECT = bytes([0xAA, 2 + len(SELECT_MF), 0x22, len(SELECT_MF)]) + SELECT_MF  # AA { 22 C-APDU }
ANSWER_9000 = bytes.fromhex("AB07" "23029000" "800101")  # AB { 23 9000, 80 01 }
RAM_DONE_AFTER = 2  # seconds: a RAM session with no card command ends (its client gets 204)

HTTP_CLIENTS = ["curl", "curl-no-alpn", "curl-http1.1", "python-alpn", "python-no-alpn"]
PYTHON_CLIENTS = ["python-alpn", "python-no-alpn"]
OFFERED = ["h2", "http/1.1"]


# --- the certificate and the proxy -------------------------------------------------------------

def make_self_signed(d):
    """key.pem and cert.pem: a self-signed P-256 certificate for IP 127.0.0.1."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   cwd=d, check=True, capture_output=True, timeout=60)
    return os.path.join(d, "key.pem"), os.path.join(d, "cert.pem")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(proxy, {listener: port}, certificate file) of one proxy with every listener on ssl:."""
    assert shutil.which("openssl") and shutil.which("curl"), "needs openssl and curl (Debian packages)"
    d = tmp_path_factory.mktemp("tls-listeners")
    key, cert = make_self_signed(str(d))
    files = {}
    for name, token in TOKENS.items():
        files[name] = d / f"{name}-token"
        files[name].write_text(token + "\n")
    ram_tokens = d / "ram-tokens"
    ram_tokens.write_text("# one RAM user per client, so sessions of two tests never meet\n"
                          + "".join(f"{ram_user(c)} {ram_secret(c)}\n" for c in HTTP_CLIENTS)
                          + "".join(f"{daemon_user(c)} {ram_secret(c)}-d\n" for c in HTTP_CLIENTS))
    names = ["line-port", "line-listen", "rest", "api", "metrics", "ram", "ram-daemon"]
    ports = {}
    while len(set(ports.values())) < len(names):
        ports = {name: free_port() for name in names}
    approved = d / "approved-urls"
    approved.write_text(f"https://{HOST}:{ports['ram']}/rt/\n")

    def ssl_endpoint(name):
        return f"ssl:{ports[name]}:interface={HOST}:privateKey={key}:certKey={cert}"

    proxy = ProxyProcess(
        "--no-signing",
        "--listen", ssl_endpoint("line-listen"),
        "--rest", ssl_endpoint("rest"), "--rest-token-file", str(files["rest"]),
        "--api", ssl_endpoint("api"), "--api-token-file", str(files["api"]),
        "--metrics", ssl_endpoint("metrics"), "--metrics-token-file", str(files["metrics"]),
        "--ram", ssl_endpoint("ram"), "--ram-token-file", str(ram_tokens),
        "--ram-done-after", str(RAM_DONE_AFTER),
        "--ram-daemon", ssl_endpoint("ram-daemon"), "--ram-approved-urls", str(approved),
        "--ram-reader", "Emulated 01",
        port=ssl_endpoint("line-port"), listeners=1,
        env={"SSL_CERT_FILE": cert})  # the daemon's HTTPS client trusts the test certificate
    proxy.start()
    try:
        for name, port in ports.items():
            wait_for(lambda: accepts(port), timeout=20, what=f"{name} listening on {port}")
        yield proxy, ports, cert
    finally:
        proxy.stop()
    if proxy.proc.returncode not in (0, None):
        print(proxy.log()[-3000:])


def ram_user(client):
    return "u-" + client.replace(".", "")


def daemon_user(client):
    return "d-" + client.replace(".", "")


def ram_secret(client):
    return "secret-" + client.replace(".", "")


# --- clients -----------------------------------------------------------------------------------

class Answer:
    def __init__(self, status, headers, body, alpn):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body
        self.alpn = alpn  # what was negotiated (curl: the HTTP version it used)

    def text(self):
        return self.body.decode("utf-8", "replace")

    def __repr__(self):
        return f"<HTTP {self.status} alpn={self.alpn!r} {self.headers} {self.body[:300]!r}>"


def context(cert, alpn):
    ctx = ssl.create_default_context(cafile=cert)
    if alpn:
        ctx.set_alpn_protocols(OFFERED)
    return ctx


def python_request(client, port, cert, method, path, headers, body, timeout):
    """One request with http.client over an ssl context of ours (ALPN offered or not)."""
    conn = http.client.HTTPSConnection(HOST, port, timeout=timeout,
                                       context=context(cert, client == "python-alpn"))
    try:
        conn.request(method, path, body=body, headers=headers)
        alpn = conn.sock.selected_alpn_protocol()
        r = conn.getresponse()
        return Answer(r.status, r.getheaders(), r.read(), alpn)
    finally:
        conn.close()


CURL_FLAGS = {"curl": [], "curl-no-alpn": ["--no-alpn"], "curl-http1.1": ["--http1.1"]}


def curl_command(client, port, cert, method, path, headers, body_file, out_dir, timeout):
    cmd = ["curl", "-sS", "--max-time", str(timeout), "--cacert", cert, *CURL_FLAGS[client],
           "-X", method, "-D", os.path.join(out_dir, "head"), "-o", os.path.join(out_dir, "body"),
           "-w", "%{http_code} %{http_version}"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    if body_file:
        cmd += ["--data-binary", f"@{body_file}"]
    return cmd + [f"https://{HOST}:{port}{path}"]


def curl_answer(done, out_dir):
    assert done.returncode == 0, f"curl failed (exit {done.returncode}): {done.stderr}"
    code, version = done.stdout.decode().split()
    with open(os.path.join(out_dir, "head"), "rb") as f:
        head = f.read().decode("latin-1")
    with open(os.path.join(out_dir, "body"), "rb") as f:
        body = f.read()
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in head.splitlines()[1:] if ":" in line]
    return Answer(int(code), headers, body, version)


class Curl:
    """curl in the background (for a request the server holds)."""

    def __init__(self, client, port, cert, method, path, headers, body, out_dir, timeout):
        os.makedirs(out_dir, exist_ok=True)
        body_file = None
        if body is not None:
            body_file = os.path.join(out_dir, "request")
            with open(body_file, "wb") as f:
                f.write(body)
        self.out_dir = out_dir
        self.proc = subprocess.Popen(curl_command(client, port, cert, method, path, headers, body_file,
                                                  out_dir, timeout),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.timeout = timeout

    def answer(self):
        try:
            out, err = self.proc.communicate(timeout=self.timeout + 5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        return curl_answer(subprocess.CompletedProcess([], self.proc.returncode, out, err), self.out_dir)


class Background:
    """A Python request in a thread (for a request the server holds)."""

    def __init__(self, *args):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=args, daemon=True)
        self.thread.start()

    def _run(self, *args):
        try:
            self.result = python_request(*args)
        except Exception as e:  # reported by answer()
            self.error = e

    def answer(self):
        self.thread.join(40)
        assert not self.thread.is_alive(), "the request got no answer in 40 s"
        if self.error:
            raise self.error
        return self.result


def start_request(client, port, cert, method, path, headers=None, body=None, out_dir=None, timeout=20):
    headers = dict(headers or {})
    if client in CURL_FLAGS:
        return Curl(client, port, cert, method, path, headers, body, out_dir, timeout)
    return Background(client, port, cert, method, path, headers, body, timeout)


def request(*args, **kw):
    answer = start_request(*args, **kw).answer()
    check_protocol(args[0], answer)
    return answer


def check_protocol(client, answer):
    """Never h2: the front ends speak HTTP/1.1 only."""
    if client in CURL_FLAGS:
        assert answer.alpn == "1.1", f"curl used HTTP/{answer.alpn}"
    elif client == "python-alpn":
        assert answer.alpn in ("http/1.1", None), f"the server selected ALPN {answer.alpn!r}"
    else:
        assert answer.alpn is None, answer.alpn


def tls_line(port, cert, alpn, timeout=10):
    """A line-protocol connection over TLS; (socket, negotiated ALPN)."""
    raw = socket.create_connection((HOST, port), timeout=timeout)
    s = context(cert, alpn).wrap_socket(raw, server_hostname=HOST)
    return s, s.selected_alpn_protocol()


def read_answer(s):
    data = b""
    while b"@@\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before @@: {data!r}")
        data += chunk
    return data.decode()


def line_request(port, cert, text, alpn=False):
    s, _ = tls_line(port, cert, alpn)
    with s:
        s.sendall(text.encode())
        return read_answer(s)


def readers_of(ports, cert):
    answer = line_request(ports["line-port"], cert, ">|\n>1:READERS|\n\n")
    listing = re.match(r">1:(.*)\n@@\n", answer).group(1)
    return [base64.b64decode(n).decode() for n in listing.split("|") if n]


# --- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("client", PYTHON_CLIENTS)
@pytest.mark.parametrize("listener", ["line-port", "line-listen"])
def test_line_protocol(tls, listener, client):
    proxy, ports, cert = tls
    try:
        s, alpn = tls_line(ports[listener], cert, client == "python-alpn")
    except ssl.SSLError as e:
        offered = f"offering ALPN {OFFERED}" if client == "python-alpn" else "offering no ALPN"
        pytest.fail(f"the {listener} TLS listener refused the handshake of a client {offered}: {e} "
                    "(a listener that speaks no ALPN protocol must ignore ALPN, not abort)")
    with s:
        assert alpn is None, f"the line protocol negotiated ALPN {alpn!r}"
        s.sendall(b">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n")
        assert read_answer(s) == ">1:9000\n@@\n"
        s.sendall(b">Emulated 01|\n>1:APDU:0084000008|\n>2:RESET|\n\n")  # the same connection again
        answer = read_answer(s)
    assert re.fullmatch(rf">1:[0-9A-F]{{16}}9000\n>2:{EMULATED_ATR}\n@@\n", answer), answer


@pytest.mark.parametrize("client", HTTP_CLIENTS)
def test_rest_inventory(tls, client, tmp_path):
    proxy, ports, cert = tls
    answer = request(client, ports["rest"], cert, "GET", "/api/v1/inventory",
                     {"X-Auth-Token": TOKENS["rest"]}, out_dir=str(tmp_path))
    assert answer.status == 200, answer
    assert answer.text().splitlines() == [f"/{r.replace(' ', '_')} {EMULATED_ATR}" for r in READERS]
    # and an APDU through /api/v1/basic
    answer = request(client, ports["rest"], cert, "GET", "/api/v1/basic?terminal=/Emulated_00&apdu=00A4000C023F00",
                     {"X-Auth-Token": TOKENS["rest"]}, out_dir=str(tmp_path))
    assert answer.status == 200 and answer.text().splitlines() == ["9000"], answer


@pytest.mark.parametrize("client", HTTP_CLIENTS)
def test_api_readers(tls, client, tmp_path):
    proxy, ports, cert = tls
    answer = request(client, ports["api"], cert, "GET", "/api/v1/readers",
                     {"Authorization": f"Bearer {TOKENS['api']}"}, out_dir=str(tmp_path))
    assert answer.status == 200, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    readers = json.loads(answer.body)["readers"]
    assert [r["name"] for r in readers] == READERS
    assert all(r["present"] and r["atr"] == EMULATED_ATR for r in readers), readers


@pytest.mark.parametrize("client", PYTHON_CLIENTS)
def test_api_websocket(tls, client):
    """wss:// through websocket-client over our ssl context (ALPN offered or not)."""
    import websocket

    proxy, ports, cert = tls
    ws = websocket.create_connection(f"wss://{HOST}:{ports['api']}/api/v1/ws", timeout=10,
                                     sslopt={"context": context(cert, client == "python-alpn")},
                                     header=[f"Authorization: Bearer {TOKENS['api']}"])
    try:
        alpn = ws.sock.selected_alpn_protocol()
        assert alpn in ((None, "http/1.1") if client == "python-alpn" else (None,)), alpn
        ws.send(json.dumps({"id": 7, "reader": "Emulated 02", "apdus": ["00A4000C023F00", "0084000008"]}))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("id") == 7:
                break
    finally:
        ws.close()
    assert msg.get("responses", [None])[0] == "9000", msg
    assert re.fullmatch("[0-9A-F]{16}9000", msg["responses"][1]), msg


@pytest.mark.parametrize("client", HTTP_CLIENTS)
def test_metrics(tls, client, tmp_path):
    proxy, ports, cert = tls
    line_request(ports["line-port"], cert, ">Emulated 03|\n>1:APDU:00A4000C023F00|\n\n")  # some traffic
    bearer = {"Authorization": f"Bearer {TOKENS['metrics']}"}
    answer = request(client, ports["metrics"], cert, "GET", "/metrics", bearer, out_dir=str(tmp_path))
    assert answer.status == 200, answer
    assert answer.headers["content-type"].startswith("text/plain"), answer
    text = answer.text()
    assert re.search(r'^foxyproxy_reader_present\{reader="Emulated 00"\} 1\.0$', text, re.M), text[:2000]
    assert re.search(r'^foxyproxy_frontend_requests_total\{frontend="line"\} [1-9]', text, re.M), text[:4000]


@pytest.mark.parametrize("client", HTTP_CLIENTS)
def test_status_page_health_and_readiness(tls, client, tmp_path):
    proxy, ports, cert = tls
    port = ports["metrics"]
    bearer = {"Authorization": f"Bearer {TOKENS['metrics']}"}
    health = request(client, port, cert, "GET", "/healthz", out_dir=str(tmp_path))
    assert health.status == 200 and health.text().strip() == "ok", health
    ready = request(client, port, cert, "GET", "/readyz", out_dir=str(tmp_path))
    assert ready.status == 200 and json.loads(ready.body)["ready"] is True, ready
    status = request(client, port, cert, "GET", "/status.json", bearer, out_dir=str(tmp_path))
    assert status.status == 200, status
    assert [r["name"] for r in json.loads(status.body)["readers"]] == READERS, status
    page = request(client, port, cert, "GET", "/", bearer, out_dir=str(tmp_path))
    assert page.status == 200 and page.headers["content-type"].startswith("text/html"), page
    assert '<table id="readers">' in page.text() and "status.json" in page.text(), page


@pytest.mark.parametrize("client", HTTP_CLIENTS)
def test_ram_server(tls, client, tmp_path):
    """A whole RAMOverHTTP session by hand: the initiation E8 is held until a
    line client sends an APDU to reader 'RAM <user>'; it is answered with that
    APDU in an AA script; the AB answer reaches the line client, and the next
    POST is answered 204 once the card is unused for --ram-done-after."""
    proxy, ports, cert = tls
    user, path = ram_user(client), f"/rt/{ram_secret(client)}"
    headers = {"Content-Type": RAM_TYPE, "Cookie": f"JSESSIONID=tls-{user}"}
    first = start_request(client, ports["ram"], cert, "POST", path, headers, INITIATION,
                          out_dir=str(tmp_path / "first"), timeout=30)
    reader = f"RAM {user}"
    wait_for(lambda: reader in readers_of(ports, cert), timeout=10, interval=0.02, what=reader)
    line, _ = tls_line(ports["line-port"], cert, alpn=False, timeout=20)
    with line:
        line.sendall(f">{reader}|\n>1:APDU:00A4000C023F00|\n\n".encode())
        script = first.answer()
        check_protocol(client, script)
        assert script.status == 200, script
        assert script.headers["content-type"] == "application/org.openscdp-content-mgt;version=1.0", script
        assert f"JSESSIONID=tls-{user}" in script.headers.get("set-cookie", ""), script
        assert script.body == SCRIPT_SELECT, script
        second = start_request(client, ports["ram"], cert, "POST", path, headers, ANSWER_9000,
                               out_dir=str(tmp_path / "second"), timeout=30)
        assert read_answer(line) == ">1:9000\n@@\n"
    done = second.answer()
    check_protocol(client, done)
    assert done.status == 204 and done.body == b"", done
    wait_for(lambda: reader not in readers_of(ports, cert), timeout=10, what=f"{reader} gone")


@pytest.mark.parametrize("client", HTTP_CLIENTS)
def test_ram_daemon(tls, client, tmp_path):
    """The daemon runs a session on Emulated 01 against the proxy's own RAM
    server over HTTPS; it passes (the server's 204 after --ram-done-after)
    and the daemon answers the green 24x24 PNG; an unapproved URL gets the
    red 12x12 one at once."""
    proxy, ports, cert = tls
    url = f"https://{HOST}:{ports['ram']}/rt/{ram_secret(client)}-d"
    answer = request(client, ports["ram-daemon"], cert, "GET", f"/update.png?url={url}&sessionId=d-{client}",
                     out_dir=str(tmp_path / "ok"), timeout=30)
    assert answer.status == 200, answer
    assert answer.headers["content-type"] == "image/png", answer
    assert answer.body[:8] == b"\x89PNG\r\n\x1a\n", answer
    assert int.from_bytes(answer.body[16:20], "big") == 24, answer  # green: passed
    assert answer.headers.get("x-ram-result", "").startswith("passed"), answer
    refused = request(client, ports["ram-daemon"], cert, "GET",
                      f"/x.png?url=https://{HOST}:1/rt/x&sessionId=s", out_dir=str(tmp_path / "no"))
    assert refused.status == 200 and refused.headers["content-type"] == "image/png", refused
    assert int.from_bytes(refused.body[16:20], "big") == 12, refused  # red: failed


#: A request without the right credentials, and what the answer must be
#: (once per listener, not per client: the proxy throttles a peer's failed
#: authentications, and these all come from 127.0.0.1).
REFUSALS = {
    "rest": ("GET", "/api/v1/inventory", {"X-Auth-Token": "wrong"}, None, (401, 403)),
    "api": ("GET", "/api/v1/readers", {"Authorization": "Bearer wrong"}, None, (401,)),
    "metrics": ("GET", "/metrics", {}, None, (401,)),
    "ram": ("POST", "/rt/wrong-secret", {"Content-Type": RAM_TYPE}, INITIATION, (404,)),
}


@pytest.mark.parametrize("listener", sorted(REFUSALS))
def test_refused_without_credentials(tls, listener, tmp_path):
    proxy, ports, cert = tls
    method, path, headers, body, statuses = REFUSALS[listener]
    answer = request("python-alpn", ports[listener], cert, method, path, headers, body, out_dir=str(tmp_path))
    assert answer.status in statuses, answer
    assert "Emulated" not in answer.text() and "foxyproxy_" not in answer.text(), answer
    assert "set-cookie" not in answer.headers, answer


# --- TLS half-close: the request, then the client's close_notify -------------------------------

def tls_half_close(port, cert, alpn, request, timeout=10.0):
    """support.tls_half_close with this module's client context."""
    return support.tls_half_close(port, context(cert, alpn), request, timeout)


def http_request(path, headers, body=b"", method="GET"):
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"] + [f"{k}: {v}" for k, v in headers.items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


#: listener -> (request, a regex the whole answer must match)
HALF_CLOSE = {
    "line-port": (b">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n", rb">1:9000\n@@\n"),
    # not Emulated 01: the RAM session of test_ram_daemon resets that card, so a
    # line client would rightly get C080 once for it (docs/backends.md, "Resets")
    "line-listen": (b">Emulated 00|\n>1:APDU:0084000008|\n>2:RESET|\n\n",
                    rb">1:[0-9A-F]{16}9000\n>2:" + EMULATED_ATR.encode() + rb"\n@@\n"),
    "rest": (http_request("/api/v1/basic?terminal=/Emulated_02&apdu=00A4000C023F00",
                          {"X-Auth-Token": TOKENS["rest"]}),
             rb"HTTP/1\.1 200 .*\r\n\r\n9000\s*"),
    "api": (http_request("/api/v1/readers/Emulated%2003/transmit",
                         {"Authorization": "Bearer " + TOKENS["api"], "Content-Type": "application/json"},
                         json.dumps({"apdus": ["00A4000C023F00"]}).encode(), "POST"),
            rb'HTTP/1\.1 200 .*\r\n\r\n.*"responses": ?\["9000"\].*'),
    "metrics": (http_request("/healthz", {}), rb"HTTP/1\.1 200 .*"),
    "ram": (http_request("/rt/wrong-secret", {"Content-Type": RAM_TYPE}, INITIATION, "POST"),
            rb"HTTP/1\.1 404 .*"),
}


@pytest.mark.parametrize("client", PYTHON_CLIENTS)
@pytest.mark.parametrize("listener", sorted(HALF_CLOSE))
def test_a_request_then_close_notify_is_answered_then_closed(tls, listener, client):
    """RFC 8446 section 6.1: close_notify closes one direction; the
    request sent before it is answered (as a TCP half-close is), and the
    proxy then sends its own close_notify."""
    proxy, ports, cert = tls
    request, expected = HALF_CLOSE[listener]
    got, how = tls_half_close(ports[listener], cert, client == "python-alpn", request)
    assert re.fullmatch(expected, got, re.S), f"{listener}: request + close_notify got {got!r} ({how})"
    assert how == "close_notify", f"{listener}: after the answer the proxy's close was {how!r}"
