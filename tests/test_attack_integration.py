"""What a new user and an attacker found in issue 25's features, against
real twistd processes on loopback (each test names what failed before)."""

import base64
import socket

import pytest

from support import HOST, wait_for
from test_membership_integration import etcd, etcd_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration

SELECT_MF = "00A4000C023F00"


def half_closed_request(port, data, timeout=10.0):
    """Send ``data``, half-close (what ``nc -N`` does), read to EOF."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return got.decode()
            got += chunk


def listed(proxy):
    with proxy.client() as c:
        [(_, names)] = c.request(">*|\n>1:READERS|\n\n")
    return [base64.b64decode(n).decode() for n in names.split("|") if n]


def test_a_client_that_half_closes_behind_a_proxy_header_gets_its_answers(proxy_factory):
    """Before: through HAProxy (send-proxy-v2) ``nc -N`` got nothing, on a
    front over tcp:// as on emulated cards: the FIN was taken as a lost
    connection."""
    owner = proxy_factory("--owner-id", "rack1")
    front = proxy_factory("--backend", f"tcp://{HOST}:{owner.port}", port=f"haproxy:tcp:0:interface={HOST}")
    header = f"PROXY TCP4 127.0.0.77 {HOST} 5555 {front.port}\r\n".encode()
    listing = ">*|\n>1:READERS|\n\n".encode()
    wait_for(lambda: "cmFjazEvRW11bGF0ZWQgMDA=" in half_closed_request(front.port, header + listing),
             timeout=10, what="the owner's readers on the front")  # rack1/Emulated 00
    for reader, port in (("rack1/Emulated 00", front.port), ("Emulated 00", owner.port)):
        data = f">{reader}|\n>1:APDU:{SELECT_MF}|\n\n".encode()
        if port == front.port:
            data = header + data
        assert half_closed_request(port, data).splitlines() == [">1:9000", "@@"], reader


def test_an_owner_behind_a_balancer_registers_its_plain_listener(etcd, proxy_factory):
    """Before: an owner whose first -p was haproxy: (route-by-reader behind
    HAProxy) registered that port; every front dialled it with no PROXY
    header and was closed, so the owner's cards never showed."""
    from test_membership_integration import emulated, etcd_get, etcd_url, readers

    owner = proxy_factory("--listen", f"tcp:0:interface={HOST}", "--owner-id", "rack9",
                          "--register", etcd_url(etcd), port=f"haproxy:tcp:0:interface={HOST}", listeners=2)
    front = proxy_factory("--backend", etcd_url(etcd))
    value = wait_for(lambda: etcd_get(etcd, "fp/owners/rack9"), timeout=10)
    plain = [p for p in owner.ports["LineFactory"] if f"tcp://{HOST}:{p}" == value["url"]]
    assert plain, (value, owner.ports)
    wait_for(lambda: readers(front) == emulated("rack9"), timeout=10, what="the owner's readers on the front")
    with front.client() as c:
        assert c.results(f">rack9/Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
    assert "PROXY" not in owner.log()  # no front was closed for a missing header


def test_hold_again_through_a_front_keeps_the_card_at_the_owner(proxy_factory):
    """Before: HOLD:1 then HOLD:30 on a front; 3 s later (1 + the 2 s
    margin) the owner had let go of the card, and its own clients ran
    commands on the card the front's client still held."""
    import time

    owner = proxy_factory("--owner-id", "rack1", "--queue-timeout", "2")
    front = proxy_factory("--backend", f"tcp://{HOST}:{owner.port}")
    wait_for(lambda: "rack1/Emulated 00" in listed(front), timeout=10, what="the owner's readers on the front")
    with front.client() as holder, owner.client() as other:
        assert holder.results(">rack1/Emulated 00|\n>1:HOLD:1|\n\n") == ["OK"]
        assert holder.results(">rack1/Emulated 00|\n>1:HOLD:30|\n\n") == ["OK"]
        time.sleep(4)
        assert other.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["C086"]  # still held
        assert holder.results(f">rack1/Emulated 00|\n>1:APDU:{SELECT_MF}|\n>2:RELEASE|\n\n") == ["9000", "OK"]
        assert other.results(f">Emulated 00|\n>1:APDU:{SELECT_MF}|\n\n") == ["9000"]
