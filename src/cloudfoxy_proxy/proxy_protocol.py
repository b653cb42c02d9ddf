"""Listeners behind a balancer: the PROXY protocol (v1 text, v2 binary)
that HAProxy's ``send-proxy`` / ``send-proxy-v2`` put in front of a
connection, carrying the client's own address (docs/deployment.md).

Any listener endpoint string wrapped in ``haproxy:`` (``haproxy:tcp:4001``,
``haproxy:ssl:4443:privateKey=...``, ``haproxy:mtls:...``,
``haproxy:unix:/run/fp.sock``) reads the PROXY header first, then hands
the connection to the front end with the header's source address as its
peer (``getPeer()``) and its destination as its host (``getHost()``).  The
front end's protocol -- and ``limits.ConnectionLimits``, the throttle and
protected mode of ``Dispatcher.identify``, identities' address rules, the
audit log, every log line -- first sees the connection once the header is
read, so all of them see the client, never the balancer.  A header of the
``LOCAL`` command (v2) or ``UNKNOWN`` protocol (v1), what HAProxy sends
on its own health checks, keeps the balancer's addresses.

The header is trusted only from a balancer's address: ``trusted``
(``--proxy-protocol-from CIDR``, default loopback 127.0.0.0/8 and ::1) is
checked against the address the connection really comes from; UNIX-socket
connections are local and always trusted (the socket file's permissions
decide who connects).  A header naming a loopback client is believed
only from a balancer on loopback itself (a client on a balancer's own
host is not one of this host's, which protected mode trusts).  A
connection from any other address, one that
does not start with a valid header (garbage, a client talking straight to
the port, a malformed address), or one whose header is not complete
within ``timeout`` seconds (``--header-timeout``) is closed before the
front end sees it, with one line in the rate-limited connection log; so
is one that finds no room: connections still waiting for their header
count, with the admitted ones, against ``--max-connections`` and the
descriptor ceiling (``limits.ConnectionLimits.room_before_admission``).
What a connection may hold before its header is complete is bounded by
the protocol: 107 bytes (v1), 16 + 65535 (v2).

For TLS listeners the header comes before the TLS handshake (HAProxy in
TCP mode passes the client's TLS through): ``haproxy:ssl:`` reads the
header under TLS (``tls.HalfClosingTLSEndpoint``'s ``under``).

Why our own wrapper and not Twisted's ``HAProxyWrappingFactory``
(``twisted.protocols.haproxy``, checked on Twisted 22.10 to 26.10; only
its parsers ``V1Parser`` / ``V2Parser`` are used here): it connects the
wrapped protocol (``makeConnection``) as soon as TCP connects, before the
header arrived, so everything reading the peer at connection time sees
the balancer; it closes a connection whose first read is shorter than 16
(v2) or 8 (v1) bytes, which TCP may deliver; it trusts the header from
anyone; with ``ssl:`` it sits above TLS, so the header would be read as
TLS; and its v1 parser lets a malformed port or address through as
``ValueError`` or as a non-address string.
"""

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import alsoProvides, directlyProvides, implementer, providedBy

from .twisted_internals import proxy_header_parsers

V1Parser, V2Parser = proxy_header_parsers()

#: What ``--proxy-protocol-from`` is when not given: loopback only.
DEFAULT_TRUSTED = ("127.0.0.0/8", "::1/128")

PREFIX = "haproxy:"


def trusted_networks(cidrs):
    """The ``ipaddress`` networks of ``cidrs`` (strings like ``10.0.0.0/8``
    or a bare address); ValueError naming the first that is not one."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{cidr!r} is not an address or network (e.g. 10.0.0.0/8, fd00::/8)") from None
    return tuple(networks)


def is_trusted(address, networks):
    """True when the Twisted address ``address`` (where the connection
    really comes from) may send a PROXY header: a UNIX socket, or an IP
    address inside one of ``networks``."""
    if isinstance(address, UNIXAddress):
        return True
    ip = _ip(address)
    return ip is not None and any(ip in net for net in networks)


def _ip(address):
    """The IP address (``ipaddress``; IPv4-mapped IPv6 as IPv4) of a Twisted
    address, or None (a UNIX socket, no IP host)."""
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


class BadHeader(Exception):
    """The bytes are not a PROXY v1/v2 header (the message says why)."""


_V2_PREFIX = V2Parser.PREFIX
_V1_PREFIX = b"PROXY "


def parse_header(data):
    """Parse the start of a connection.

    ``data`` (bytes) is everything received so far.  Returns None while
    more bytes are needed, else ``(source, destination, rest)``: the
    header's addresses (Twisted IPv4Address / IPv6Address, both None for
    LOCAL / UNKNOWN headers, which keep the connection's own) and the bytes
    after the header.  Raises BadHeader for anything else."""
    if data[:12] == _V2_PREFIX[:len(data)]:
        if len(data) < 16:
            return None
        if data[12] & 0xF0 != 0x20:
            raise BadHeader("PROXY v2 header of an unknown version")
        if len(data) < 16 + int.from_bytes(data[14:16], "big"):
            return None
        parser = V2Parser()
    elif data[:6] == _V1_PREFIX[:len(data)]:
        if b"\r\n" not in data[:108]:
            if len(data) >= 108:
                raise BadHeader("PROXY v1 header longer than 107 bytes")
            return None
        line, _, rest = data.partition(b"\r\n")
        if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):  # (Twisted refuses the bare one)
            return None, None, rest
        parser = V1Parser()
    else:
        raise BadHeader("no PROXY header")
    try:
        info, rest = parser.feed(data)
    except Exception as e:  # InvalidProxyHeader and what the parsers let through (ValueError, KeyError...)
        raise BadHeader(f"malformed PROXY header ({e.__class__.__name__})") from None
    if info is None:  # cannot happen: the whole header is there
        raise BadHeader("malformed PROXY header")
    if info.source is None:
        return None, None, rest
    return _address(info.source), _address(info.destination), rest


def _is_loopback(address):
    """True for an IP address (Twisted IPv4Address/IPv6Address) on loopback;
    False for anything else (a UNIX socket's peer is local but not this)."""
    ip = _ip(address)
    return ip is not None and ip.is_loopback


def _address(a):
    """A header's address checked, its host in the usual text form."""
    if getattr(a, "type", None) != "TCP":
        raise BadHeader("PROXY header of a protocol other than TCP")
    try:
        ip = ipaddress.ip_address(a.host)
    except ValueError:
        raise BadHeader("PROXY header with an address that is not an IP address") from None
    if not 0 <= a.port <= 65535:
        raise BadHeader("PROXY header with a port out of range")
    return (IPv4Address if ip.version == 4 else IPv6Address)("TCP", str(ip), a.port)


class ProxyHeaderProtocol(ProtocolWrapper):
    """One connection behind a balancer: reads the PROXY header, then
    connects the front end's protocol (``makeConnection``) with the
    header's addresses (see the module docstring)."""

    _source = _destination = None
    _connected = False  # the wrapped protocol has been connected
    _closing = False
    _timer = None
    _waiting = False  # counted in the factory's ``waiting``

    def makeConnection(self, transport):
        Protocol.makeConnection(self, transport)  # not the wrapped protocol's: after the header

    def connectionMade(self):
        factory = self.factory
        self._buffer = b""
        real = self.transport.getPeer()
        if not is_trusted(real, factory.trusted):
            self._refuse(f"{getattr(real, 'host', real)} is not a trusted balancer (--proxy-protocol-from)")
            return
        limits = factory.limits
        if limits is not None:
            try:
                fd = self.transport.fileno()
            except Exception:
                fd = None
            if not limits.room_before_admission(factory.waiting, fd if isinstance(fd, int) else None):
                self._refuse(f"no room ({factory.waiting} connections waiting for their PROXY header, "
                             f"{limits.count} open; --max-connections or file descriptors)")
                return
        factory.waiting += 1
        self._waiting = True
        if factory.timeout:
            self._timer = factory.clock.callLater(factory.timeout, self._too_slow)

    def _too_slow(self):
        self._timer = None
        self._refuse(f"no complete PROXY header within {self.factory.timeout:g} s")

    def _refuse(self, why):
        peer = self.transport.getPeer()
        self.factory.log.warn("closing the PROXY-protocol connection of {peer}: {why}",
                              peer=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}", why=why)
        self._stop_waiting()
        self.abortConnection()

    def _stop_waiting(self):
        if self._waiting:
            self._waiting = False
            self.factory.waiting -= 1
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data):
        if self._connected:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._closing:
            return
        self._buffer += data
        try:
            parsed = parse_header(self._buffer)
        except BadHeader as e:
            self._buffer = b""
            self._refuse(str(e))
            return
        if parsed is None:
            return
        self._buffer = b""
        source = parsed[0]
        if source is not None and _is_loopback(source) and not _is_loopback(self.transport.getPeer()):
            # a client on the balancer's own host is not one of this host's
            # loopback clients (protected mode, open-mode relays trust those)
            self._refuse(f"the PROXY header names the loopback client {source.host} but the balancer "
                         f"is on another host; run the balancer on this host or give the client's real address")
            return
        self._stop_waiting()
        self._source, self._destination, rest = parsed
        self._connected = True
        inner = self.wrappedProtocol
        directlyProvides(self, providedBy(self.transport))
        self.factory.registerProtocol(self)
        inner.makeConnection(self)
        # asked once connected: a wrapper (limits' guard) says it half-closes in its makeConnection;
        # else a client's half-close (nc -N) would be a lost connection, its answers never sent
        if IHalfCloseableProtocol.providedBy(inner):
            alsoProvides(self, IHalfCloseableProtocol)
        if rest and not self._closing:
            inner.dataReceived(rest)

    def getPeer(self):
        return self._source or self.transport.getPeer()

    def getHost(self):
        return self._destination or self.transport.getHost()

    def loseConnection(self):
        self._closing = True
        super().loseConnection()

    def abortConnection(self):
        self._closing = True
        self.transport.abortConnection()

    def readConnectionLost(self):
        if self._connected:
            self.wrappedProtocol.readConnectionLost()
        else:
            self.loseConnection()

    def writeConnectionLost(self):
        if self._connected:
            self.wrappedProtocol.writeConnectionLost()

    def connectionLost(self, reason):
        self._stop_waiting()
        self._buffer = b""
        if self._connected:
            self._connected = False
            super().connectionLost(reason)  # unregisters, then the wrapped protocol's


class ProxyHeaderFactory(WrappingFactory):
    """``wrappedFactory``'s connections read a PROXY header first.

    ``trusted``: networks (``trusted_networks``) that may send it;
    ``clock``: an ``IReactorTime``; ``timeout``: seconds for the whole
    header (0: none); ``log``: a ``logs.RateLimitedLog`` for refusals;
    ``limits``: the ``limits.ConnectionLimits`` the connections are admitted
    by once their header is read (None: no bound before that); ``waiting``:
    how many are open before their header is complete."""

    protocol = ProxyHeaderProtocol
    noisy = False

    def __init__(self, wrappedFactory, trusted, clock, timeout, log, limits=None):
        super().__init__(wrappedFactory)
        self.limits = limits
        self.waiting = 0
        self.trusted = tuple(trusted)
        self.clock = clock
        self.timeout = timeout
        self.log = log
        # (nothing above it asks the wrapped factory's interfaces: under TLS,
        # TLS asks its own wrapped factory for ALPN)

    def logPrefix(self):
        """The wrapped factory's (``LineFactory starting on N`` as without the header)."""
        inner = self.wrappedFactory
        return inner.logPrefix() if hasattr(inner, "logPrefix") else inner.__class__.__name__


@implementer(IStreamServerEndpoint)
class ProxyHeaderEndpoint:
    """A server endpoint whose connections start with a PROXY header:
    ``endpoint`` listens with ``wrap(factory)`` (a ProxyHeaderFactory
    maker).  For TLS endpoints the header goes under TLS instead (see
    ``proxy_endpoint``)."""

    def __init__(self, endpoint, wrap):
        self.endpoint = endpoint
        self.wrap = wrap

    def listen(self, factory):
        return self.endpoint.listen(self.wrap(factory))


def strip_prefix(description):
    """``(True, inner description)`` for ``haproxy:INNER`` (any case:
    ``HAProxy:`` must never reach Twisted's own ``haproxy`` endpoint, which
    trusts a header from anyone), else ``(False, description)``; ValueError
    for ``haproxy:haproxy:...`` (one header per connection)."""
    if description[:len(PREFIX)].lower() == PREFIX:
        inner = description[len(PREFIX):]
        if inner[:len(PREFIX)].lower() == PREFIX:
            raise ValueError("haproxy: is given twice (a connection has one PROXY header)")
        return True, inner
    return False, description


def proxy_endpoint(endpoint, trusted, clock, timeout, log, limits=None):
    """``endpoint`` (already built from the description after ``haproxy:``,
    TLS ones as ``tls.HalfClosingTLSEndpoint``) with a PROXY header read
    first on each connection, before TLS when it is a TLS endpoint."""
    def wrap(factory):
        return ProxyHeaderFactory(factory, trusted, clock, timeout, log, limits)

    if hasattr(endpoint, "under"):  # TLS: the header is in clear, before the handshake
        endpoint.under = wrap
        return endpoint
    return ProxyHeaderEndpoint(endpoint, wrap)
