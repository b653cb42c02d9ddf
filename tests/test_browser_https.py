"""Headless Debian chromium against the proxy's HTTPS front ends (a
self-signed certificate for IP 127.0.0.1 made by openssl).  Chromium
offers ALPN h2 and http/1.1 in every handshake; the front ends must answer
it over HTTP/1.1.

Chromium trusts the test certificate through
``--ignore-certificate-errors-spki-list=<SHA-256 of its public key>``: only
that key is accepted (no blanket --ignore-certificate-errors, no NSS
database to set up).

* the status page ``/`` of ``--metrics ssl:...`` renders the reader rows
  it fetched from status.json;
* docs/examples/api.html, served over HTTPS from another origin (allowed
  with --api-cors-origin), lists the readers of ``--api ssl:...`` with
  fetch() and gets GET CHALLENGE's answer over ``wss://``.

The page is read through the DevTools protocol once it is done (as
support.browser_dom does), with the extra flag this file needs.
"""

import base64
import functools
import hashlib
import http.server
import json
import os
import re
import ssl
import subprocess
import threading
import time
import urllib.request

import pytest

from support import HOST, ProxyProcess, accepts, devtools_chromium, free_port, wait_for

from test_api_browser import Texts

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "examples")
TOKEN = "api-token-0123456789"
READERS = [f"Emulated 0{i}" for i in range(4)]


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    """(key file, certificate file, SPKI pin) of a self-signed certificate for 127.0.0.1."""
    d = tmp_path_factory.mktemp("browser-https")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], cwd=d, check=True, capture_output=True, timeout=60)
    spki = subprocess.run(["openssl", "x509", "-in", "cert.pem", "-noout", "-pubkey"], cwd=d, check=True,
                          capture_output=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=spki, check=True,
                         capture_output=True).stdout
    pin = base64.b64encode(hashlib.sha256(der).digest()).decode()
    return str(d / "key.pem"), str(d / "cert.pem"), pin


def start_proxy(*args, port):
    proxy = ProxyProcess(*args, listeners=1).start()
    try:
        wait_for(lambda: accepts(port), timeout=20, what=f"port {port}")
    except BaseException:
        proxy.stop()
        raise
    return proxy


def browse(url, done_js, spki_pin, timeout=45.0):
    """Load ``url`` in headless chromium trusting the key ``spki_pin``; once
    the page's JavaScript ``done_js`` is true (or after ``timeout`` s)
    return its HTML and {URL: protocol} of every HTTP response it got
    (DevTools Network.responseReceived: "http/1.1", "h2", ...).

    Chromium starts on about:blank; the page is loaded with Page.navigate
    once the Network domain is on, so no response goes unseen."""
    import websocket

    with devtools_chromium("about:blank", timeout, f"--ignore-certificate-errors-spki-list={spki_pin}") as (
            port, deadline):
        ws = None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                page = next(t for t in json.load(r) if t.get("type") == "page")
            ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=10, suppress_origin=True)
            calls = iter(range(1, 1000000))
            protocols = {}

            def call(method, **params):
                n = next(calls)
                ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv())
                    if msg.get("method") == "Network.responseReceived":
                        response = msg["params"]["response"]
                        protocols[response["url"]] = response.get("protocol")
                    if msg.get("id") == n:
                        return msg.get("result", {})

            def evaluate(expression):
                answer = call("Runtime.evaluate", expression=expression, returnByValue=True)
                return answer.get("result", {}).get("value")

            call("Network.enable")
            call("Page.navigate", url=url)
            while not evaluate(f"Boolean({done_js})") and time.monotonic() < deadline:
                time.sleep(0.2)
            return evaluate("document.documentElement.outerHTML"), protocols
        finally:
            if ws is not None:
                ws.close()


def test_status_page_over_https(cert):
    key, certfile, pin = cert
    port = free_port()
    proxy = start_proxy("--no-signing", "--metrics", f"ssl:{port}:interface={HOST}:privateKey={key}:certKey={certfile}",
                        port=port)
    try:
        with proxy.client() as c:  # a little traffic, so the page has numbers
            for i in range(8):
                assert c.results(f">{READERS[i % 4]}|\n>1:APDU:00A4000C023F00|\n\n") == ["9000"]
        dom, protocols = browse(f"https://{HOST}:{port}/",
                                "document.querySelectorAll('#readers tbody tr').length >= 4", pin)
    finally:
        proxy.stop()
    body = re.search(r'<table id="readers">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body, dom[:3000]
    rows = re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)
    cells = [re.findall(r"<td[^>]*>(?:<span[^>]*>)?(.*?)(?:</span>)?</td>", r) for r in rows]
    assert [c[0] for c in cells] == READERS, cells
    assert all(c[2] == "present" for c in cells), cells
    assert 'id="ready" class="pill ok">ready<' in dom, dom[:3000]
    # chromium offered h2 and got HTTP/1.1, for the page and its status.json
    assert protocols.get(f"https://{HOST}:{port}/") == "http/1.1", protocols
    assert protocols.get(f"https://{HOST}:{port}/status.json") == "http/1.1", protocols


@pytest.fixture
def https_page_server(cert):
    """docs/examples over HTTPS (the same certificate), on its own port: another origin."""
    key, certfile, _ = cert
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=EXAMPLES)
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://{HOST}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_api_example_page_over_https_and_wss(cert, https_page_server, tmp_path):
    key, certfile, pin = cert
    port = free_port()
    (tmp_path / "api-token").write_text(TOKEN + "\n")
    proxy = start_proxy("--no-signing", "--api", f"ssl:{port}:interface={HOST}:privateKey={key}:certKey={certfile}",
                        "--api-token-file", str(tmp_path / "api-token"), "--api-cors-origin", https_page_server,
                        port=port)
    api = f"https://{HOST}:{port}"
    try:
        dom, protocols = browse(f"{https_page_server}/api.html#api={api}&token={TOKEN}",
                                "document.getElementById('status').textContent != 'starting'", pin, timeout=60)
        log = proxy.log()
    finally:
        proxy.stop()
    page = Texts()
    page.feed(dom)
    assert page.by_id.get("status") == "done", (page.by_id, log[-3000:])
    assert page.items == [f"{r}: card 3B8B8001466F7879456D753738313677" for r in READERS]
    assert page.by_id["reader"] == "Emulated 00"
    challenge = page.by_id["challenge"]
    assert len(challenge) == 20 and challenge.endswith("9000"), challenge
    int(challenge, 16)
    # chromium offered h2 to the API and got HTTP/1.1
    assert protocols.get(f"{api}/api/v1/readers") == "http/1.1", protocols
