"""sendnow.write_now: a whole message leaves at once when nothing is
queued; anything else goes through the transport's own buffer, in order."""

import socket

import pytest
from twisted.internet import tcp

from cloudfoxy_proxy.sendnow import write_now


class Recorder(tcp.Server):
    """A plain-TCP transport as write_now sees it, over one end of a
    socketpair, recording what is handed to its buffer."""

    def __init__(self, sock):  # no reactor: only the attributes write_now reads
        self.socket = sock
        self.connected = 1
        self.disconnecting = False
        self.dataBuffer = b""
        self._tempDataLen = 0
        self.TLS = False
        self.buffered = []

    def write(self, data):
        self.buffered.append(data)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_sent_at_once_when_nothing_is_queued(pair):
    a, b = pair
    t = Recorder(a)
    write_now(t, b">1:9000\n@@\n")
    assert b.recv(100) == b">1:9000\n@@\n"
    assert t.buffered == []


@pytest.mark.parametrize("queued", ["dataBuffer", "_tempDataLen"])
def test_queued_bytes_keep_their_place(pair, queued):
    a, b = pair
    t = Recorder(a)
    setattr(t, queued, b"x" if queued == "dataBuffer" else 1)
    write_now(t, b">2:9000\n@@\n")
    assert t.buffered == [b">2:9000\n@@\n"]  # after what waits, not before it
    with pytest.raises(BlockingIOError):
        b.recv(100)


def test_what_the_kernel_does_not_take_is_buffered(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    t = Recorder(a)
    data = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes
    write_now(t, data)
    assert len(t.buffered) == 1 and 0 < len(t.buffered[0]) < len(data)
    got = b""
    while True:
        try:
            got += b.recv(1 << 20)
        except BlockingIOError:
            break
    assert got + t.buffered[0] == data  # nothing lost, nothing twice, in order


def test_a_send_error_is_left_to_the_transport(pair):
    a, b = pair
    b.close()
    t = Recorder(a)
    write_now(t, b"data")  # EPIPE/ECONNRESET: Twisted's write path meets it and closes
    assert t.buffered == [b"data"]


@pytest.mark.parametrize("state", ["disconnecting", "TLS"])
def test_closing_tls_or_other_transports_use_write(pair, state):
    a, b = pair
    t = Recorder(a)
    setattr(t, state, True)
    write_now(t, b"late")
    assert t.buffered == [b"late"]

    class Other:
        def __init__(self):
            self.buffered = []

        def write(self, data):
            self.buffered.append(data)

    o = Other()  # e.g. TLS, or a test transport
    write_now(o, b"x")
    assert o.buffered == [b"x"]
    with pytest.raises(BlockingIOError):
        b.recv(100)
