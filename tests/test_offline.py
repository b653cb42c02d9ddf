"""The pytest phase of tests/run.sh makes no network access: as root it
runs in a network namespace of its own (``unshare --net``) whose only
interface is loopback, so the tests can reach nothing but what they start."""

import os
import socket

import pytest

IN_NAMESPACE = os.environ.get("CLOUDFOXY_TESTS_NETNS") == "1"


def routes():
    """(interface, destination) of every IPv4 and IPv6 route of this process."""
    found = []
    with open("/proc/self/net/route") as f:
        found += [(line.split()[0], line.split()[1]) for line in f.readlines()[1:] if line.strip()]
    if os.path.exists("/proc/self/net/ipv6_route"):
        with open("/proc/self/net/ipv6_route") as f:
            found += [(line.split()[-1], line.split()[0]) for line in f if line.strip()]
    return found


@pytest.mark.skipif(not IN_NAMESPACE, reason="not under tests/run.sh as root (no unshare --net)")
def test_the_pytest_phase_has_no_route_but_loopback():
    assert [name for _, name in socket.if_nameindex()] == ["lo"]  # this namespace's interfaces
    assert {interface for interface, _ in routes()} <= {"lo"}, routes()
    with pytest.raises(OSError):  # a public address is unreachable, at once
        socket.create_connection(("192.0.2.1", 80), timeout=5)
    with socket.create_connection(("127.0.0.1", _listening()), timeout=5):
        pass  # loopback is up


def _listening():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    _keep.append(s)
    return s.getsockname()[1]


_keep = []
