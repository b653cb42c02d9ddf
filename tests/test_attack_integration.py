"""What a new user and an attacker found in issue 25's features, against
real twistd processes on loopback (each test names what failed before)."""

import socket

import pytest

from support import HOST, ProxyProcess

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


def test_a_client_that_half_closes_behind_a_proxy_header_gets_its_answers(proxy_factory):
    """Before: through HAProxy (send-proxy-v2) ``nc -N`` got nothing, on a
    front over tcp:// as on emulated cards: the FIN was taken as a lost
    connection."""
    owner = proxy_factory("--owner-id", "rack1")
    front = proxy_factory("--backend", f"tcp://{HOST}:{owner.port}", port=f"haproxy:tcp:0:interface={HOST}")
    header = f"PROXY TCP4 127.0.0.77 {HOST} 5555 {front.port}\r\n".encode()
    for reader, port in (("rack1/Emulated 00", front.port), ("Emulated 00", owner.port)):
        data = f">{reader}|\n>1:APDU:{SELECT_MF}|\n\n".encode()
        if port == front.port:
            data = header + data
        assert half_closed_request(port, data).splitlines() == [">1:9000", "@@"], reader
