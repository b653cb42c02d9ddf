"""Owner-stable names between real ``twistd foxyproxy`` processes on loopback
(docs/tcp.md "Owner-stable names"): owners with ``--owner-id``, fronts with
``tcp://`` backends and no ``prefix=``."""

import base64
import time

import pytest

from support import HOST, free_port
from test_tcp_integration import foxyproxy_upstream  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration

SELECT_EF = "00A4080C0450005001"  # EF 5001 of the emulated card, writable


def listing(proxy):
    with proxy.client() as c:
        [(_, names)] = c.request(">*|\n>1:READERS|\n\n")
    return [base64.b64decode(n).decode() for n in names.split("|") if n]


def wait_listing(proxy, expected, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        names = sorted(listing(proxy))
        if names == sorted(expected):
            return names
        assert time.monotonic() < deadline, f"readers {names} never became {expected}\n{proxy.log()}"
        time.sleep(0.05)


def wait_log(proxy, text, timeout=15.0):
    deadline = time.monotonic() + timeout
    while text not in proxy.log():
        assert time.monotonic() < deadline, f"{text!r} never logged\n{proxy.log()}"
        time.sleep(0.05)


def write_marker(proxy, reader, marker):
    with proxy.client() as c:
        assert c.request(f">{reader}|\n>1:APDU:{SELECT_EF}|\n>2:APDU:00D6000004{marker}|\n\n") == [
            ("1", "9000"), ("2", "9000")]


def read_marker(proxy, reader):
    with proxy.client() as c:
        [(_, _), (_, data)] = c.request(f">{reader}|\n>1:APDU:{SELECT_EF}|\n>2:APDU:00B0000004|\n\n")
    return data


def url(port):
    return f"tcp://{HOST}:{port}"


def test_same_names_same_cards_whatever_the_start_order(proxy_factory):
    """Two owners list the same reader names; a front started while rack2
    is down and one started after it came up (backends in the other
    order) list the same names for the same cards, with no " (2)"."""
    port2 = free_port()
    owner1 = proxy_factory("--owner-id", "rack1", "--backend", "emulated:?cards=2")
    early = proxy_factory("--backend", url(owner1.port), "--backend", url(port2))
    wait_listing(early, ["rack1/Emulated 00", "rack1/Emulated 01"])
    owner2 = proxy_factory("--owner-id", "rack2", "--backend", "emulated:?cards=2",
                           port=f"tcp:{port2}:interface={HOST}")
    late = proxy_factory("--backend", url(port2), "--backend", url(owner1.port))
    every = ["rack1/Emulated 00", "rack1/Emulated 01", "rack2/Emulated 00", "rack2/Emulated 01"]
    assert wait_listing(early, every) == wait_listing(late, every) == every
    for owner, tag in ((owner1, "A1"), (owner2, "B2")):
        for i in range(2):
            write_marker(owner, f"Emulated 0{i}", f"{tag}0{i}CAFE"[:8])
    for front in (early, late):
        for owner, tag in (("rack1", "A1"), ("rack2", "B2")):
            for i in range(2):
                assert read_marker(front, f"{owner}/Emulated 0{i}") == f"{tag}0{i}CAFE"[:8] + "9000"
    with owner1.client() as c:
        assert c.request(">*|\n>1:OWNER|\n\n") == [("1", "rack1")]


def test_prefix_given_keeps_its_names(proxy_factory):
    owner = proxy_factory("--owner-id", "rack1", "--backend", "emulated:?cards=1")
    front = proxy_factory("--backend", url(owner.port) + "?prefix=B%20")
    wait_listing(front, ["B Emulated 00"])


def test_duplicate_owner_id_at_start_stops_with_one_line(proxy_factory):
    a = proxy_factory("--owner-id", "rack1", "--backend", "emulated:?cards=1")
    b = proxy_factory("--owner-id", "rack1", "--backend", "emulated:?cards=1&prefix=Other")
    front = proxy_factory("--backend", url(a.port), "--backend", url(b.port))
    assert front.proc.wait(15) == 1
    lines = [line for line in front.output().splitlines() if line.startswith("twistd foxyproxy:")]
    assert len(lines) == 1, front.output()
    assert "owner id 'rack1' is already that of" in lines[0], lines
    assert "Traceback" not in front.output() + front.log()


def test_duplicate_owner_id_later_refuses_the_newcomer(proxy_factory):
    port = free_port()
    a = proxy_factory("--owner-id", "rack1", "--backend", "emulated:?cards=1")
    front = proxy_factory("--backend", url(a.port), "--backend", url(port))
    wait_listing(front, ["rack1/Emulated 00"])
    proxy_factory("--owner-id", "rack1", "--backend", "emulated:?cards=1&prefix=Other",
                  port=f"tcp:{port}:interface={HOST}")
    wait_log(front, f"backend {url(port)}: owner id 'rack1' is already that of {url(a.port)}")
    time.sleep(0.5)
    assert listing(front) == ["rack1/Emulated 00"]  # the newcomer's readers are not listed
    assert front.proc.poll() is None
    with front.client() as c:
        assert c.request(">rack1/Emulated 00|\n>1:APDU:00A4000C023F00|\n\n") == [("1", "9000")]


def test_old_upstream_keeps_todays_names(proxy_factory):
    """An upstream that answers OWNER with C081 (an older proxy) is named as before."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(4)
    name = base64.b64encode(b"Old 00").decode()

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            for raw in conn.makefile("rb"):
                line = raw.decode().strip()
                if line.endswith(":OWNER|"):
                    conn.sendall(f">{line[1:].split(':')[0]}:C081\n".encode())
                elif line.endswith(":READERS|"):
                    conn.sendall(f">{line[1:].split(':')[0]}:{name}\n@@\n".encode())

    threading.Thread(target=serve, daemon=True).start()
    try:
        front = proxy_factory("--no-signing", "--backend", url(listener.getsockname()[1]))
        wait_listing(front, ["Old 00"])
    finally:
        listener.close()


def test_foxyproxy_210_upstream_keeps_its_names(proxy_factory, foxyproxy_upstream):
    """FoxyProxy 2.10 answers only the last command of a request (READERS),
    never OWNER: no owner id, its readers keep their names."""
    front = proxy_factory("--backend", url(foxyproxy_upstream))
    deadline = time.monotonic() + 30
    while len(listing(front)) < 2:
        assert time.monotonic() < deadline, front.log()
        time.sleep(0.1)
    names = listing(front)
    assert all(n.startswith("Foxy NET ") for n in names), names
    with front.client() as c:
        assert c.request(f">{names[0]}|\n>1:APDU:00A4000C023F00|\n\n") == [("1", "9000")]
