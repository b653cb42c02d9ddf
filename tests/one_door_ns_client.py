"""Run by tests/test_one_door.py inside a network namespace made with
``unshare -rn`` (192.0.2.1 on lo): one proxy in protected mode (no
--credentials) with every listener on 0.0.0.0 - the line protocol and
``--metrics`` without any authentication, ``--ram-daemon`` (no secret by
design), and REST, API and RAM with their single-token options - asked
from the non-loopback address 192.0.2.1 and from 127.0.0.1.  Prints one
JSON object (the last line of stdout): what each client got, and the
proxy's log.

Usage: python one_door_ns_client.py TESTS_DIR"""

import http.client
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, sys.argv[1])

from support import LineClient, ProxyProcess

REMOTE = "192.0.2.1"
ANY = "tcp:0:interface=0.0.0.0"
SELECT = ">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n"
REST_TOKEN, API_TOKEN, RAM_SECRET = "rest-ns-token-0123456789", "api-ns-token-0123456789", "ramNsSecret0123456789"


def attempt(fn):
    """``fn()``'s result, or ``{"error": ...}``: one failing client must
    not hide what the others got."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (reported to the test as data)
        return {"error": f"{type(e).__name__}: {e}"}


def http_req(port, method, path, source, headers=None, body_length=None):
    """``{"status", "body", "headers"}`` of one request from ``source``; a
    declared body is not sent (the head is judged first)."""
    conn = http.client.HTTPConnection(source, port, timeout=15, source_address=(source, 0))
    try:
        conn.putrequest(method, path)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body_length is not None:
            conn.putheader("Content-Length", str(body_length))
        conn.endheaders()
        r = conn.getresponse()
        return {"status": r.status, "body": r.read().decode("utf-8", "replace"),
                "headers": {k.lower(): v for k, v in r.getheaders()}}
    finally:
        conn.close()


def line(port, source):
    with LineClient(source, port, source=source) as c:
        return c.results(SELECT)


def main():
    d = tempfile.mkdtemp(prefix="one-door-ns-")
    files = {}
    for name, text in (("rest-token", REST_TOKEN), ("api-token", API_TOKEN), ("ram-tokens", f"carol {RAM_SECRET}"),
                       ("approved-urls", "http://127.0.0.1:9/rt/ Emulated 00")):
        files[name] = os.path.join(d, name)
        with open(files[name], "w") as f:
            f.write(text + "\n")
    base = ["--no-signing", "--audit-log", os.path.join(d, "audit.jsonl"),
            "--rest", ANY, "--rest-token-file", files["rest-token"],
            "--ram", ANY, "--ram-token-file", files["ram-tokens"],
            "--metrics", ANY, "--ram-daemon", ANY, "--ram-approved-urls", files["approved-urls"]]
    api = ["--api", ANY, "--api-token-file", files["api-token"]]
    out = {}
    try:
        proxy = ProxyProcess(*base, *api, port=ANY, listeners=6).start()
    except RuntimeError as e:  # the API alone must not hide every other front end's answers
        out["api_error"] = str(e)[-3000:]
        proxy = ProxyProcess(*base, port=ANY, listeners=5).start()
    ports = proxy.ports
    try:
        rest, metrics = ports["Site"][0], ports["StatusSite"][0]
        ram, daemon = ports["RamSite"][0], ports["RamDaemonSite"][0]
        api_port = (ports.get("ApiSite") or [None])[0]
        here = "127.0.0.1"
        out["line remote"] = attempt(lambda: line(proxy.port, REMOTE))
        out["line remote again"] = attempt(lambda: line(proxy.port, REMOTE))
        out["line loopback"] = attempt(lambda: line(proxy.port, here))
        out["metrics remote"] = attempt(lambda: http_req(metrics, "GET", "/metrics", REMOTE))
        out["metrics remote status.json"] = attempt(lambda: http_req(metrics, "GET", "/status.json", REMOTE))
        out["healthz remote"] = attempt(lambda: http_req(metrics, "GET", "/healthz", REMOTE))
        out["readyz remote"] = attempt(lambda: http_req(metrics, "GET", "/readyz", REMOTE))
        out["metrics loopback"] = attempt(lambda: http_req(metrics, "GET", "/metrics", here))
        trigger = "/update.png?url=http://127.0.0.1:9/rt/x&sessionId=s1"
        out["daemon remote"] = attempt(lambda: http_req(daemon, "GET", trigger, REMOTE))
        out["rest remote"] = attempt(lambda: http_req(rest, "GET", "/api/v1/hello", REMOTE))
        out["rest remote token"] = attempt(lambda: http_req(rest, "GET", "/api/v1/hello", REMOTE,
                                                        {"X-Auth-Token": REST_TOKEN}))
        if api_port is not None:
            out["api remote"] = attempt(lambda: http_req(api_port, "GET", "/api/v1/readers", REMOTE))
            out["api remote token"] = attempt(lambda: http_req(api_port, "GET", "/api/v1/readers", REMOTE,
                                                           {"Authorization": f"Bearer {API_TOKEN}"}))
        out["ram remote"] = attempt(lambda: http_req(ram, "POST", "/rt/", REMOTE, body_length=2))
        time.sleep(0.3)
        out["log"] = proxy.log()
    finally:
        proxy.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
