"""Connections, buffered bytes and the log are bounded on a real ``twistd
foxyproxy``: one peer cannot lock out another, idle sockets (line or REST)
are closed and cannot use up the file descriptors, a REST client without the
token cannot make the proxy store a body, and a flood of client-caused
events writes a few log lines."""

import http.client
import os
import re
import resource
import socket
import time

import pytest
from support import HOST, LineClient

SELECT = ">1:APDU:00A4000C023F00|\n\n"
TOKEN = "limits-token"


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def closed_by_proxy(sock, timeout=3.0):
    """True when the proxy closed ``sock`` (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def log_size(proxy):
    return sum(os.path.getsize(os.path.join(proxy.logdir, n)) for n in os.listdir(proxy.logdir)
               if n.startswith("twistd.log"))


@pytest.fixture(scope="module", autouse=True)
def many_files():
    """This test process opens more than 1,100 sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_file_limit_is_raised_to_the_hard_limit(proxy_factory):
    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    p = proxy_factory("--no-signing", preexec_fn=low_soft_limit)
    with open(f"/proc/{p.proc.pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line


def test_a_peer_at_its_limit_does_not_lock_out_another(proxy_factory):
    p = proxy_factory("--no-signing", "--max-connections-per-peer", "4", "--command-timeout", "10",
                      "--backend", "emulated:?cards=1&latency_ms=1500&prefix=Slow",
                      "--backend", "emulated:?cards=1&prefix=Fast")
    hog = [p.client(timeout=15) for _ in range(4)]
    for c in hog:
        c.send(">Slow 00|\n" + SELECT)  # all four wait on the slow card: busy, not idle
    time.sleep(0.3)
    try:
        fifth = socket.create_connection((HOST, p.port), timeout=5)
        fifth.sendall((">Fast 00|\n" + SELECT).encode())
        assert closed_by_proxy(fifth), "a fifth connection from 127.0.0.1 was served"
    except ConnectionResetError:
        pass  # reset before connect() or send() returned: refused just as well
    start = time.monotonic()
    with LineClient(HOST, p.port, timeout=5, source="127.0.0.2") as other:
        assert other.request(">Fast 00|\n" + SELECT) == [("1", "9000")]
    assert time.monotonic() - start < 1.0
    for c in hog:  # the busy connections were kept and answered
        assert c.read_response() == [("1", "9000")]
        c.close()
    assert "refusing 127.0.0.1:" in p.log() and "--max-connections-per-peer" in p.log()


def test_a_peer_holding_every_slot_gives_one_up(proxy_factory):
    p = proxy_factory("--no-signing", "--max-connections", "5", "--max-connections-per-peer", "100")
    hog = [p.client(timeout=5) for _ in range(5)]
    for c in hog:
        assert c.request(">Emulated 00|\n" + SELECT) == [("1", "9000")]
    with LineClient(HOST, p.port, timeout=5, source="127.0.0.2") as other:
        assert other.request(">Emulated 01|\n" + SELECT) == [("1", "9000")]
    # the least recently active connection of 127.0.0.1 made room
    assert closed_by_proxy(hog[0].sock) and not any(closed_by_proxy(c.sock, 0.2) for c in hog[1:])
    for c in hog:
        c.close()


def test_1100_idle_rest_sockets_do_not_stop_line_clients(proxy_factory):
    nofile = 512

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    p = proxy_factory("--no-signing", "--rest", "tcp:0:interface=127.0.0.1", listeners=2,
                      env={"FOXYPROXY_REST_TOKEN": TOKEN}, preexec_fn=limit)
    rest = p.ports["Site"][0]
    idle = []
    try:
        # 11 addresses x 100 sockets: each address within its own limit, together
        # more than the proxy's descriptors
        refused = 0
        for n in range(1100):
            try:
                idle.append(socket.create_connection((HOST, rest), timeout=5,
                                                     source_address=(f"127.0.1.{1 + n // 100}", 0)))
            except ConnectionResetError:  # refused at once (reset before connect() returned)
                refused += 1
        time.sleep(1.0)
        in_use = p.fds()
        assert in_use < nofile - 16, f"{in_use} descriptors in use of {nofile}"
        for source in ("127.0.0.2", "127.0.0.1"):
            with LineClient(HOST, p.port, timeout=5, source=source) as c:
                assert c.request(">Emulated 00|\n" + SELECT) == [("1", "9000")]
        conn = http.client.HTTPConnection(HOST, rest, timeout=5, source_address=("127.0.0.3", 0))
        conn.request("GET", "/api/v1/hello", headers={"X-Auth-Token": TOKEN})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        for s in idle:
            s.close()
    assert "EMFILE" not in p.log()
    assert "to make room for 127.0.1." in p.log() and "(file descriptors)" in p.log()
    print(f"1,100 idle REST sockets from 11 addresses ({refused} reset while connecting): "
          f"{in_use} of {nofile} descriptors in use")


def test_idle_connections_are_closed_but_not_those_waiting_on_a_card(proxy_factory):
    p = proxy_factory("--no-signing", "--idle-timeout", "1", "--rest", "tcp:0:interface=127.0.0.1",
                      "--backend", "emulated:?cards=1&latency_ms=2500&prefix=Slow", listeners=2,
                      env={"FOXYPROXY_REST_TOKEN": TOKEN})
    rest = p.ports["Site"][0]
    idle_line = socket.create_connection((HOST, p.port))
    idle_rest = socket.create_connection((HOST, rest))
    waiting = p.client(timeout=10)
    waiting.send(">Slow 00|\n" + SELECT)
    slow_rest = http.client.HTTPConnection(HOST, rest, timeout=10)
    slow_rest.request("GET", "/api/v1/basic?terminal=/Slow%2000&apdu=00A4000C023F00",
                      headers={"X-Auth-Token": TOKEN})
    start = time.monotonic()
    assert closed_by_proxy(idle_line, 4.0)
    assert closed_by_proxy(idle_rest, 4.0)
    assert 0.8 < time.monotonic() - start < 4.0
    # 2.5 s and 5 s on the card (one after the other), far beyond the idle timeout
    assert waiting.read_response() == [("1", "9000")]
    response = slow_rest.getresponse()
    assert (response.status, response.read()) == (200, b"9000\n")
    waiting.close()
    slow_rest.close()


def test_rest_body_without_token_is_refused_before_it_is_read(proxy_factory):
    p = proxy_factory("--no-signing", "--rest", "tcp:0:interface=127.0.0.1", listeners=2,
                      env={"FOXYPROXY_REST_TOKEN": TOKEN})
    s = socket.create_connection((HOST, p.ports["Site"][0]), timeout=5)
    s.sendall(b"GET /api/v1/hello HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (300 << 20))
    start = time.monotonic()
    answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401 ") and time.monotonic() - start < 1.0  # the secret first
    sent = 0
    with pytest.raises(OSError):
        while sent < (300 << 20):
            s.sendall(b"a" * (1 << 20))
            sent += 1 << 20
    assert sent < (16 << 20)
    held = [os.readlink(f"/proc/{p.proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{p.proc.pid}/fd")]
    assert not [h for h in held if h.endswith("(deleted)")]
    s.close()


def test_a_flood_of_client_caused_events_writes_a_few_log_lines(proxy_factory):
    p = proxy_factory("--no-signing", "--rest", "tcp:0:interface=127.0.0.1", "--max-connections-per-peer", "3",
                      listeners=2, env={"FOXYPROXY_REST_TOKEN": TOKEN, "FOXYPROXY_CLIENT_PASSWORD": "s3cret"})
    rest = p.ports["Site"][0]
    time.sleep(0.3)
    before = log_size(p)
    start = time.monotonic()
    with p.client(timeout=10) as c:  # PERSONALIZE needs no password
        batch = (">*|\n>1:PERSONALIZE:" + "x" * 100 + "|\n\n") * 500
        for _ in range(40):
            c.send(batch)
            for _ in range(500):
                assert c.read_response() == [("1", "OK")]
        for _ in range(5):  # wrong passwords (slowed from the 4th on: docs/security.md), over-long lines
            assert c.request(">Emulated 00:guess|\n" + SELECT) == [("1", "C085")]
        c.send(">1:APDU:" + "0" * 300000 + "|\n\n")
        assert c.read_response() == [("1", "C084")]
        for _ in range(500):  # REST without token: 401 each
            conn = http.client.HTTPConnection(HOST, rest, timeout=5)
            conn.request("GET", "/api/v1/hello")
            assert conn.getresponse().status == 401
            conn.close()
        held = [socket.create_connection((HOST, p.port)) for _ in range(2)]
        for _ in range(500):  # 127.0.0.1 holds its 3 connections: each newcomer closes the idlest
            extra = socket.create_connection((HOST, p.port))
            extra.close()
        for s in held:
            s.close()
    took = time.monotonic() - start
    time.sleep(0.5)
    p.stop()  # the log is flushed at exit
    grown = log_size(p) - before
    print(f"flood of {took:.1f} s: 20,000 PERSONALIZE, 5 wrong passwords, 500 REST 401s, "
          f"500 refused connections -> {grown} log bytes")
    assert grown < 12000, grown
    text = p.log()
    assert "more client log lines suppressed" in text
    assert "490 more refused rest requests suppressed" in text
    assert "more connection log lines suppressed" in text
    for line in text.splitlines():
        if "personalized as" in line or "refused (401)" in line or "closing the idle" in line:
            assert "127.0.0.1" in line, line


def test_buffered_bytes_share_one_budget(proxy_factory):
    p = proxy_factory("--no-signing", "--max-buffered-bytes", str(4 << 20), "--max-connections-per-peer", "1000")
    time.sleep(0.3)
    before = rss_kb(p.proc.pid)
    partial = (">Emulated 00|\n>9:APDU:" + "0" * 250000).encode()
    holders = []
    for _ in range(200):  # 50 MB of partial lines offered, 4 MiB kept
        s = socket.create_connection((HOST, p.port), timeout=10)
        s.sendall(partial)
        holders.append(s)
    time.sleep(1.0)
    grown = rss_kb(p.proc.pid) - before
    with p.client(timeout=5) as c:
        assert c.request(">Emulated 01|\n" + SELECT) == [("1", "9000")]
    print(f"200 partial lines of 250 kB: RSS grew {grown} kB")
    assert grown < 20000, f"RSS grew {grown} kB"
    holders[-1].sendall(b"|\n\n")  # a dropped line's command gets C084
    holders[-1].settimeout(5)
    assert holders[-1].recv(100) == b">9:C084\n@@\n"
    for s in holders:
        s.close()
    assert "dropped a partial line" in p.log()
