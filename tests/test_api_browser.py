"""A real browser drives the API: headless Debian ``chromium`` loads the
example page docs/examples/api.html from a small HTTP server (another
origin, allowed with --api-cors-origin); the page lists readers with
fetch() and sends GET CHALLENGE over the WebSocket; the test reads the
page's result from the DOM through the DevTools protocol once the page's
status has left "starting" (support.browser_dom)."""

import functools
import html.parser
import http.server
import os
import threading

import pytest
from support import HOST, browser_dom

from test_api_integration import TOKEN

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "examples")


class Texts(html.parser.HTMLParser):
    """The text of every element with an id, and of each <li>."""

    def __init__(self):
        super().__init__()
        self.by_id = {}
        self.items = []
        self._open = []

    def handle_starttag(self, tag, attrs):
        self._open.append((tag, dict(attrs).get("id")))
        if tag == "li":
            self.items.append("")

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        for tag, ident in self._open:
            if ident:
                self.by_id[ident] = self.by_id.get(ident, "") + data
        if self._open and self._open[-1][0] == "li":
            self.items[-1] += data


@pytest.fixture
def page_server():
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=EXAMPLES)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{HOST}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_browser_lists_readers_and_gets_a_challenge(page_server, proxy_factory):
    proxy = proxy_factory("--api", f"tcp:0:interface={HOST}", "--api-cors-origin", page_server,
                          listeners=2, env={"FOXYPROXY_API_TOKEN": TOKEN})
    api = f"http://{HOST}:{proxy.ports['ApiSite'][0]}"
    dom = browser_dom(f"{page_server}/api.html#api={api}&token={TOKEN}",
                      "document.getElementById('status').textContent != 'starting'", timeout=60)
    page = Texts()
    page.feed(dom)
    assert page.by_id.get("status") == "done", page.by_id
    assert page.items == [f"Emulated 0{i}: card 3B8B8001466F7879456D753738313677" for i in range(4)]
    assert page.by_id["reader"] == "Emulated 00"
    challenge = page.by_id["challenge"]
    assert len(challenge) == 20 and challenge.endswith("9000")
    int(challenge, 16)
