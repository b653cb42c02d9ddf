"""The ``cloudfoxy+http://`` backend against the HTTP servers found in the
field, for real: a proxy process and stdlib ``http.server`` CloudFoxy stubs
on loopback that speak HTTP/1.0 (close after every answer), answer
``Connection: close``, or keep connections alive but close them after a
short idle time.  Every APDU carries a unique payload, so the stub can tell
whether one was ever sent twice."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import pytest
from support import HOST

TOKEN = "http-servers-token"
ATR = "3B8B8001466F7879456D753738313677"


class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode):
        self.mode = mode
        self.apdus = []
        self.connections = 0
        self.lock = threading.Lock()
        super().__init__((HOST, 0), Handler)


class Handler(BaseHTTPRequestHandler):
    def setup(self):
        mode = self.server.mode
        self.protocol_version = "HTTP/1.0" if mode == "http10" else "HTTP/1.1"
        if mode == "idle":
            self.timeout = 0.05  # a keep-alive connection idle this long is closed
        with self.server.lock:
            self.server.connections += 1
        super().setup()

    def log_message(self, *args):
        pass

    def do_GET(self):
        url = urlsplit(self.path)
        params = parse_qsl(url.query)
        if self.headers.get("X-Auth-Token") != TOKEN:
            return self.answer(401, "unauthorized\n")
        if url.path == "/api/v1/hello":
            return self.answer(200, "CloudFoxy stdlib stub\nuptime 100 s\n")
        if url.path == "/api/v1/inventory":
            return self.answer(200, f"/127.0.0.1@1 {ATR}\n")
        apdus = [v for k, v in params if k == "apdu"]
        with self.server.lock:
            self.server.apdus.extend(apdus)
        if dict(params).get("reset") == "1":
            return self.answer(200, ATR + "\n")
        return self.answer(200, "".join("9000\n" for _ in apdus))

    def answer(self, status, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        if self.server.mode == "close":
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub(request):
    server = Stub(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest.mark.parametrize("stub", ["http10", "close", "idle"], indirect=True)
def test_every_apdu_once_on_every_kind_of_server(proxy_factory, stub, token_file):
    url = f"cloudfoxy+http://{HOST}:{stub.server_port}?token_file={token_file}&poll=0.5"
    b = proxy_factory("--backend", url, "--no-signing", "--command-timeout", "5")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with b.client() as c:
            if c.results(">*|\n>1:READERS|\n\n")[0]:
                break
        time.sleep(0.1)
    sent = []
    with b.client(timeout=10) as c:
        assert c.results(">CloudFoxy 127.0.0.1@1|\n>1:RESET|\n\n") == [ATR]
        for i in range(20):
            apdu = f"00D6000002{i:04X}"
            sent.append(apdu)
            assert c.results(f">CloudFoxy 127.0.0.1@1|\n>1:APDU:{apdu}|\n\n") == ["9000"], i
            if stub.mode == "idle" and i % 2:
                time.sleep(0.15)  # the server closes the idle connection meanwhile
    with stub.lock:
        assert stub.apdus == sent  # each exactly once, in order
    if stub.mode == "idle":
        # kept alive between back-to-back commands, new after an idle close
        assert 10 <= stub.connections <= 16, stub.connections
    assert "Traceback" not in b.log()
