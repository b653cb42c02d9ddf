"""Reader lines against a real ``twistd foxyproxy``: parts of real PC/SC
names select their reader, no pattern stalls other clients, and long reader
lines are not kept (docs/protocol.md, "Reader names and selection")."""

import threading
import time
import urllib.parse
import urllib.request

from support import HOST, LineClient

SCM = "SCM Microsystems Inc. SCR 3310 [CCID Interface] (21120844306107)"
SELECT_MF = ">1:APDU:00A4000C023F00|\n\n"


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_parts_of_real_names_select_the_reader(proxy_factory):
    proxy = proxy_factory("--backend", "emulated:?cards=2&prefix=" + urllib.parse.quote(SCM),
                          "--backend", "emulated:?cards=1&prefix=" + urllib.parse.quote(
                              "Yubico YubiKey OTP+FIDO+CCID"), "--no-signing")
    with proxy.client() as c:
        names = [c.results(">*|\n>1:READERS|\n\n")[0]]
        assert len(names[0].split("|")) == 3
        for line, want in [
            (f"{SCM} 01", "9000"),  # the exact name
            ("SCR 3310 [CCID Interface] (21120844306107) 00", "9000"),  # a literal part
            ("scr 3310 [ccid interface] (21120844306107) 01", "9000"),  # case-insensitive
            ("YubiKey OTP+FIDO+CCID", "9000"),  # the only Yubico: '+' is literal
            ("[CCID Interface]", "C082"),  # literally in two names
            ("SCR 3310 \\[CCID.*01$", "9000"),  # no literal match: a regular expression
            ("OTP+FIDO+CCID 01", "C083"),
            ("a\\1", "C083"),  # RE2 rejects back-references: no match
        ]:
            assert c.results(f">{line}|\n{SELECT_MF}") == [want], line


def test_pattern_attack_does_not_stall_other_clients(proxy_factory):
    proxy = proxy_factory("--backend", "emulated:?cards=8", env={"FOXYPROXY_CLIENT_PASSWORD": "s3cret"})
    time.sleep(1.0)  # the certificate probe of the cards
    stop = threading.Event()
    attacks = []

    def attack():
        # CHAIN needs no password: '(.*){N}Z' took Python's re seconds per name
        with LineClient(HOST, proxy.port, timeout=60) as c:
            n = 0
            while not stop.is_set() and n < 2000:
                attacks.append(c.results(">(.*){%d}Z|\n>1:CHAIN|\n>2:APDU:00A4000C023F00|\n\n" % (16 + n % 12)))
                n += 1

    thread = threading.Thread(target=attack)
    thread.start()
    latencies = []
    try:
        with LineClient(HOST, proxy.port, timeout=30) as c:
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline and len(latencies) < 400:
                t0 = time.monotonic()
                assert c.results(">Emulated 05:s3cret|\n" + SELECT_MF) == ["9000"]
                latencies.append(time.monotonic() - t0)
                time.sleep(0.01)
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    assert len(attacks) > 20, "the attack did not run"
    assert attacks[0] == ["C083", "C085"]  # no reader matches; no password for the APDU
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"second client: {len(latencies)} requests during {len(attacks)} attack requests, "
          f"p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms")
    assert latencies[-1] < 1.0


def test_rest_terminal_patterns_are_never_tried(proxy_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    proxy = proxy_factory("--backend", "emulated:?cards=4", "--no-signing", "--rest", f"tcp:0:interface={HOST}",
                          "--rest-token-file", str(token), listeners=2)
    port = proxy.ports["Site"][0]

    def get(terminal):
        query = urllib.parse.urlencode({"terminal": terminal, "apdu": "00A4000C023F00"})
        request = urllib.request.Request(f"http://{HOST}:{port}/api/v1/basic?{query}",
                                         headers={"X-Auth-Token": "t0ken"})
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.read().decode(), time.monotonic() - t0
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), time.monotonic() - t0

    assert get("/Emulated 02")[:2] == (200, "9000\n")
    for terminal in ("(.*){24}Z", "Emulated 0[0-3]", "Emulated"):
        code, body, took = get(terminal)
        assert (code, body) == (404, f"C083 terminal not found: {terminal}\n")
        assert took < 1.0


def test_long_reader_lines_are_not_kept(proxy_factory):
    proxy = proxy_factory("--backend", "emulated:?cards=2")
    time.sleep(1.0)
    with proxy.client(timeout=30) as c:
        for i in range(20):  # warm up the allocator with the same kind of traffic
            c.results(">%06dw" % i + "w" * 250000 + "|\n" + SELECT_MF)
        before = rss_kib(proxy.proc.pid)
        t0 = time.monotonic()
        answers = []
        for i in range(1000):  # distinct 250 kB reader lines; every other one a CHAIN
            command = ">1:CHAIN|\n\n" if i % 2 else SELECT_MF
            answers.append(c.results(">%06dx" % i + "x" * 250000 + "|\n" + command)[0])
        took = time.monotonic() - t0
        assert c.results(">Emulated 01|\n" + SELECT_MF) == ["9000"]
    time.sleep(0.5)
    after = rss_kib(proxy.proc.pid)
    assert answers == ["C083"] * 1000
    print(f"1000 reader lines of 250 kB in {took:.1f} s: RSS {before} -> {after} KiB "
          f"({(after - before) / 1024:+.1f} MiB)")
    assert after - before < 20 * 1024
