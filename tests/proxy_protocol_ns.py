"""Run by tests/test_proxy_protocol_integration.py inside a network
namespace made with ``unshare -rn`` (192.0.2.10, .21, .31, .77, .99 on lo):
real HAProxy (TCP mode) on 192.0.2.10 in front of a real front proxy on
192.0.2.21, whose cards come from an owner proxy on 192.0.2.31 over
``tcp://`` (the front's identity there may relay).  The front listens with
``-p haproxy:tcp:`` (HAProxy: send-proxy-v2), ``--listen haproxy:tcp:``
(send-proxy, v1) and ``--listen haproxy:ssl:`` (send-proxy-v2, TLS passed
through), trusts HAProxy's outgoing 127.0.0.10 only (--proxy-protocol-from) and allows two
connections per peer.  Clients connect to HAProxy from their own addresses.
Prints one JSON object (the last line of stdout): what each client got,
the two audit logs and the front's log.

Usage: python proxy_protocol_ns.py TESTS_DIR"""

import hashlib
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, sys.argv[1])

from support import LineClient, ProxyProcess, free_port  # noqa: E402

LB, FRONT, OWNER = "192.0.2.10", "192.0.2.21", "192.0.2.31"
#: HAProxy's own address towards the front (``source``): on loopback, as a
#: balancer on the front's host is, so the loopback clients it names are
#: the front's (a balancer on another host may not name loopback clients)
LB_OUT = "127.0.0.10"
REMOTE, STRANGER = "192.0.2.77", "192.0.2.99"
SELECT = ">Emulated 00|\n>1:APDU:00A4000C023F00|\n\n"
FRONT_SECRET, PLAIN_SECRET = "front-relay-secret-0123456789", "plain-secret-0123456789"

HAPROXY = """global
    maxconn 200
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend v2
    bind {lb}:{v2}
    default_backend front_v2
frontend v1
    bind {lb}:{v1}
    default_backend front_v1
frontend tls
    bind {lb}:{tls}
    default_backend front_tls
frontend metrics
    bind {lb}:{metrics}
    default_backend front_metrics
backend front_v2
    source {lb_out}
    server f {front}:{p_v2} send-proxy-v2
backend front_v1
    source {lb_out}
    server f {front}:{p_v1} send-proxy
backend front_tls
    source {lb_out}
    server f {front}:{p_tls} send-proxy-v2
backend front_metrics
    source {lb_out}
    server f {front}:{p_metrics} send-proxy-v2
"""


def port_of(host):
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def attempt(fn):
    try:
        return fn()
    except Exception as e:  # a failing client is an observation, not the end of the run
        return {"error": f"{e.__class__.__name__}: {e}"}


def via(port, source, text=SELECT, timeout=10.0):
    with LineClient(LB, port, timeout=timeout, source=source) as c:
        return c.results(text)


def tls_via(port, source):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((LB, port), timeout=10, source_address=(source, 0))
    with ctx.wrap_socket(raw) as s:
        s.sendall(SELECT.encode())
        got = b""
        while b"@@" not in got:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    return got.decode()


def forged(front_port):
    """A PROXY v2 header naming 127.0.0.1, sent straight to the front from
    an address that is not the balancer's: the bytes that came back."""
    body = bytes([127, 0, 0, 1]) + bytes(int(x) for x in FRONT.split(".")) + struct.pack("!HH", 5555, front_port)
    header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(body)) + body
    s = socket.create_connection((FRONT, front_port), timeout=5, source_address=(STRANGER, 0))
    s.sendall(header + SELECT.encode())
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except OSError as e:
        got += f"[{e.__class__.__name__}]".encode()
    s.close()
    return got.decode(errors="replace")


def per_peer(port):
    """Four clients from four addresses, each holding its connection, then
    three connections of one address (the limit is two per peer)."""
    out = {}
    held = []
    for i in range(4):
        c = LineClient(LB, port, timeout=10, source=f"127.0.0.{81 + i}")
        out[f"client{i}"] = c.results(SELECT)
        held.append(c)
    same = []
    for i in range(3):
        c = LineClient(LB, port, timeout=10, source="127.0.0.90")
        out[f"same{i}"] = c.results(SELECT)
        same.append(c)
        time.sleep(0.2)  # the first stays the least recently active
    try:
        same[0].sock.settimeout(5)
        out["same0_after"] = same[0].sock.recv(100).decode()  # "" once the front closed it
    except OSError as e:
        out["same0_after"] = f"[{e.__class__.__name__}]"
    out["same2_again"] = same[2].results(SELECT)
    for c in held + same:
        c.close()
    return out


def http_via(port, source, path):
    """One HTTP GET through the balancer from ``source``: the status code."""
    s = socket.create_connection((LB, port), timeout=10, source_address=(source, 0))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {LB}:{port}\r\nConnection: close\r\n\r\n".encode())
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    s.close()
    return int(got.split(b" ", 2)[1])


def raw_owner(port, secret, data):
    with LineClient(OWNER, port, timeout=10) as c:
        return c.results(f">*:{secret}|\n>1:CLIENT:{data}|\n\n")


def records(path):
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def main():
    d = tempfile.mkdtemp(prefix="pp-ns-")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=front"],
                   cwd=d, check=True, capture_output=True, timeout=60)
    creds = os.path.join(d, "owner.toml")
    with open(creds, "w") as f:
        f.write(f'[[client]]\nname = "front"\nsecret_sha256 = "{hashlib.sha256(FRONT_SECRET.encode()).hexdigest()}"\n'
                f'readers = ["*"]\nrelay = true\n\n[[client]]\nname = "plain"\nreaders = ["*"]\n'
                f'secret_sha256 = "{hashlib.sha256(PLAIN_SECRET.encode()).hexdigest()}"\n')
    password = os.path.join(d, "front-password")
    with open(password, "w") as f:
        f.write(FRONT_SECRET + "\n")
    owner_audit, front_audit = os.path.join(d, "owner.jsonl"), os.path.join(d, "front.jsonl")
    result = {}
    procs = []
    try:
        owner = ProxyProcess("--backend", "emulated:?cards=2", "--no-signing", "--credentials", creds,
                             "--audit-log", owner_audit, port=f"tcp:0:interface={OWNER}").start()
        procs.append(owner)
        ports = {k: port_of(FRONT) for k in ("v2", "v1", "tls", "metrics")}
        front = ProxyProcess(
            "--listen", f"haproxy:tcp:{ports['v1']}:interface={FRONT}",
            "--listen", f"haproxy:ssl:{ports['tls']}:interface={FRONT}:privateKey={d}/key.pem:certKey={d}/cert.pem",
            "--backend", f"tcp://{OWNER}:{owner.port}", "--password-file", password, "--no-signing",
            "--metrics", f"haproxy:tcp:{ports['metrics']}:interface={FRONT}", "--audit-log", front_audit, "--proxy-protocol-from", LB_OUT, "--max-connections-per-peer", "2",
            port=f"haproxy:tcp:{ports['v2']}:interface={FRONT}", listeners=4).start()
        procs.append(front)
        deadline = time.time() + 20  # CLIENT goes only to an upstream known to keep connections
        while "keeps connections open" not in front.log() and time.time() < deadline:
            time.sleep(0.1)
        lb_ports = {k: port_of(LB) for k in ("v2", "v1", "tls", "metrics")}
        with open(os.path.join(d, "haproxy.cfg"), "w") as f:
            f.write(HAPROXY.format(lb=LB, lb_out=LB_OUT, front=FRONT, v2=lb_ports["v2"], v1=lb_ports["v1"], tls=lb_ports["tls"],
                                   metrics=lb_ports["metrics"], p_v2=ports["v2"], p_v1=ports["v1"],
                                   p_tls=ports["tls"], p_metrics=ports["metrics"]))
        lb = subprocess.Popen(["haproxy", "-f", os.path.join(d, "haproxy.cfg"), "-db"], cwd=d,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 20
            got = None
            while time.time() < deadline:  # until HAProxy listens and the front knows the owner's cards
                got = attempt(lambda: via(lb_ports["v2"], "127.0.0.77"))
                if got == ["9000"]:
                    break
                time.sleep(0.3)
            result["v2"] = got
            result["v1"] = attempt(lambda: via(lb_ports["v1"], "127.0.0.78"))
            result["tls"] = attempt(lambda: tls_via(lb_ports["tls"], "127.0.0.79"))
            result["remote"] = attempt(lambda: via(lb_ports["v2"], REMOTE))  # protected mode: not loopback
            result["metrics_local"] = attempt(lambda: http_via(lb_ports["metrics"], "127.0.0.77", "/metrics"))
            result["metrics_remote"] = attempt(lambda: http_via(lb_ports["metrics"], REMOTE, "/metrics"))
            result["healthz_remote"] = attempt(lambda: http_via(lb_ports["metrics"], REMOTE, "/healthz"))
            result["forged"] = attempt(lambda: forged(ports["v2"]))
            result["per_peer"] = attempt(lambda: per_peer(lb_ports["v2"]))
            result["not_relay"] = attempt(lambda: raw_owner(owner.port, PLAIN_SECRET, "eyJ9"))
            result["malformed"] = attempt(lambda: raw_owner(owner.port, FRONT_SECRET, "notbase64!"))
        finally:
            lb.terminate()
            lb.wait(10)
        time.sleep(0.5)  # the audit lines of the last requests
        result["front_audit"] = records(front_audit)
        result["owner_audit"] = records(owner_audit)
        result["front_port"] = ports["v2"]
    finally:
        for p in reversed(procs):
            p.stop()
    result["front_log"] = front.log()[-20000:] if len(procs) > 1 else ""
    print(json.dumps(result))


if __name__ == "__main__":
    main()
