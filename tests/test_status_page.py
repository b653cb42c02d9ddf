"""The status page at / of --metrics, loaded in headless Chromium against a
real proxy under a little load.

``STATUS_SCREENSHOT=docs/status-page.png`` keeps the screenshot (that is
how the README's picture is made)."""

import html
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import pcsc_rig
from support import HOST

READERS = [f"Emulated 0{i}" for i in range(6)]


def chromium(*args, timeout=90):
    exe = shutil.which("chromium")
    if exe is None:
        pcsc_rig.ensure_packages(["chromium"])  # tests/debian-packages.txt
        exe = shutil.which("chromium")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--window-size=1280,860", "--virtual-time-budget=3000", *args]
    return subprocess.run(cmd, capture_output=True, timeout=timeout)


def load(port, stop, counts):
    """One client, one APDU at a time on each reader in turn, ~300/s, until ``stop``."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        i = 0
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            s.sendall(f">{READERS[i % 6]}|\n>1:APDU:00A4000C023F00|\n\n".encode())
            got = b""
            while b"@@\n" not in got:
                got += s.recv(4096)
            assert got == b">1:9000\n@@\n", got
            counts[0] += 1
            i += 1
            time.sleep(0.003)


def test_status_page_in_chromium(proxy_factory, tmp_path):
    p = proxy_factory("--backend", "emulated:?cards=6", "--metrics", f"tcp:0:interface={HOST}",
                      listeners=2)
    url = f"http://{HOST}:{p.ports['StatusSite'][0]}/"
    stop = threading.Event()
    counts = [0]
    worker = threading.Thread(target=load, args=(p.port, stop, counts), daemon=True)
    worker.start()
    try:
        time.sleep(3)  # a few one-second samples with load in them
        done = chromium("--dump-dom", url)
        dom = done.stdout.decode("utf-8")
        shot = os.environ.get("STATUS_SCREENSHOT") or str(tmp_path / "status.png")
        taken = chromium(f"--screenshot={os.path.abspath(shot)}", url)
    finally:
        stop.set()
        worker.join(10)
    assert counts[0] > 100
    body = re.search(r'<table id="readers">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body, dom[:2000]
    rows = re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)
    cells = [[html.unescape(c) for c in re.findall(r"<td[^>]*>(?:<span[^>]*>)?(.*?)(?:</span>)?</td>", r)]
             for r in rows]
    assert [c[0] for c in cells] == READERS
    for c in cells:
        assert c[2] == "present"
        assert float(c[5].replace(",", "")) > 0, c  # rate /s under load
        assert float(c[6]) > 0 and float(c[7]) >= float(c[6]), c  # p50, p99 in ms
    assert 'id="ready" class="pill ok">ready<' in dom
    assert re.search(r"<polyline points=\"[^\"]+\"", dom), "the chart has a line"
    assert taken.returncode == 0, taken.stderr[-2000:]
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_held_card_in_the_page(proxy_factory):
    """A card held by an API session shows in "Held cards" with its holder,
    and a line client waiting behind it counts in "Others waiting"."""
    import http.client
    import json

    token = "status-page-api-token"
    p = proxy_factory("--metrics", f"tcp:0:interface={HOST}", "--api", f"tcp:0:interface={HOST}",
                      "--queue-timeout", "20", listeners=3, env={"FOXYPROXY_API_TOKEN": token})
    api = http.client.HTTPConnection(HOST, p.ports["ApiSite"][0], timeout=10)
    api.request("POST", "/api/v1/sessions", json.dumps({"reader": "Emulated 01", "idle_timeout": 60}),
                {"Authorization": f"Bearer {token}"})
    answer = api.getresponse()
    assert answer.status == 200, answer.read()
    answer.read()
    url = f"http://{HOST}:{p.ports['StatusSite'][0]}/"
    with socket.create_connection((HOST, p.port), timeout=30) as waiter:
        waiter.sendall(b">Emulated 01|\n>1:APDU:00A4000C023F00|\n\n")  # waits behind the session
        dom = chromium("--dump-dom", url).stdout.decode("utf-8")
        body = re.search(r'<table id="holders">.*?<tbody>(.*?)</tbody>', dom, re.S)
        assert body, dom[:2000]
        rows = [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", r)]
                for r in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)]
        assert len(rows) == 1, rows
        reader, frontend, identity, peer, since, held, queued, waiting = rows[0]
        assert (reader, frontend, identity, queued, waiting) == ("Emulated 01", "api", "api", "0", "1"), rows
        assert peer.startswith("127.0.0.1:") and "api session" in peer, peer
        assert re.search(r"\d", since) and float(held) >= 0, rows
        none = re.search(r'<p[^>]*id="holders-none"[^>]*>', dom).group(0)
        assert "hidden" in none, none  # "No card is held." is not shown
    api.close()


def test_status_page_labels_its_windows_and_reads_at_phone_width(proxy_factory, tmp_path):
    """At 420 CSS px (a phone): nothing wider than the screen, the chart's
    axis text drawn at its 11 px (not squeezed with the chart), and both
    rate windows named; the screenshot is kept as ``status-420.png``
    (``STATUS_SCREENSHOT_PHONE=path`` keeps it elsewhere)."""
    import base64
    import json
    import struct
    import urllib.request

    import websocket
    from support import devtools_chromium

    p = proxy_factory("--backend", "emulated:?cards=6", "--metrics", f"tcp:0:interface={HOST}", listeners=2)
    url = f"http://{HOST}:{p.ports['StatusSite'][0]}/"
    with devtools_chromium("about:blank", 60, "--window-size=420,900", "--hide-scrollbars") as (port, deadline):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t.get("type") == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=10, suppress_origin=True)
        try:
            calls = iter(range(1, 1000000))

            def call(method, **params):
                n = next(calls)
                ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv())
                    if msg.get("id") == n:
                        return msg.get("result", {})

            def evaluate(expression):
                return call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

            call("Emulation.setDeviceMetricsOverride", width=420, height=900, deviceScaleFactor=1, mobile=True)
            call("Page.navigate", url=url)
            while time.monotonic() < deadline and not evaluate(
                    "document.querySelectorAll('#readers tbody tr').length === 6 && "
                    "document.querySelectorAll('#chart text.lbl').length >= 5"):
                time.sleep(0.2)
            facts = evaluate("""(() => {
                const labels = [...document.querySelectorAll('#chart text.lbl')].map(t => t.getBoundingClientRect());
                return {width: document.documentElement.clientWidth,
                        scroll: document.documentElement.scrollWidth,
                        chart: document.getElementById('chart').getBoundingClientRect().width,
                        label_heights: labels.map(r => r.height), label_widths: labels.map(r => r.width),
                        now: document.getElementById('rate-now').parentElement.textContent,
                        heads: [...document.querySelectorAll('#readers th')].map(t => t.textContent)};
            })()""")
            shot = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
        finally:
            ws.close()
    keep = os.environ.get("STATUS_SCREENSHOT_PHONE") or str(tmp_path / "status-420.png")
    with open(keep, "wb") as f:
        f.write(shot)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">I", shot[16:20])[0] == 420
    assert facts["width"] == 420 and facts["scroll"] <= 420, facts  # no sideways scrolling of the page
    assert 300 < facts["chart"] <= 420, facts
    # 11 px text is about 13 px tall and "−5 min" about 30 px wide; drawn in a 1000-unit-wide
    # chart squeezed into 338 px it keeps its height but shrinks to a third of its width
    assert min(facts["label_heights"]) >= 10, facts
    assert max(facts["label_widths"]) >= 25, facts
    assert "in the last second" in facts["now"], facts
    assert "APDUs/s (10 s)" in facts["heads"] and "p99 ms (10 s)" in facts["heads"], facts
