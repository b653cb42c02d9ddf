"""Connections and buffered bytes as bounded, fairly shared resources.

One ``ConnectionLimits`` serves every front end of the process (the line
protocol's listeners, ``--rest``, and any later listener): each front end's
factory is wrapped with ``limits.wrap(factory)``, and then

* at most ``max_connections`` client connections are open in total
  (``--max-connections``) and at most ``per_peer`` from one peer address
  (``--max-connections-per-peer``; IPv4 and IPv6 addresses count one by one,
  UNIX-socket clients only against the total);
* the process keeps ``fd_reserve`` file descriptors free for everything
  else (backends, log files): when a new connection's descriptor number
  reaches ``RLIMIT_NOFILE - fd_reserve`` (the kernel hands out the lowest
  free number, so all below are in use), the descriptors in use are counted
  (``/proc/self/fd``) and client connections are capped so that the
  descriptors in use stay below that line; so ``accept()`` never fails
  with EMFILE (the cap is measured again at most once a second while it
  holds connections back);
* when a new connection finds no room, the least recently active *idle*
  connection of the same address (per-peer limit) or of the address holding
  the most connections, if it holds more than the newcomer would (total and
  descriptor limits), is closed to make room; with no such connection the
  newcomer is closed at once.  Either way one warning names the peer
  (rate-limited, see ``logs.RateLimitedLog``);
* a connection with no bytes read or written for ``idle_timeout`` seconds
  (``--idle-timeout``; 0 disables it) is closed, unless the front end says
  it is busy: a wrapped protocol may have a ``busy`` attribute, true while a
  request of it waits on a card.

``limits.buffers``, a ``BufferBudget``, bounds the bytes that all
connections of every front end together hold unprocessed (partial lines,
read-ahead, HTTP request heads): see its docstring.
"""

import os
import socket
import struct

from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocolNegotiationFactory
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, providedBy

from .logs import Logger, RateLimitedLog
from .sendnow import write_now

DEFAULT_MAX_CONNECTIONS = 10000
DEFAULT_PER_PEER = 100
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_BUFFER_BUDGET = 64 * 1024 * 1024
#: What every connection may hold unprocessed without drawing on the budget.
FREE_PER_CONNECTION = 4096


def file_limit():
    """The process's soft RLIMIT_NOFILE, or None where there is none."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def fds_in_use():
    """How many file descriptors this process has open (Linux), or None."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # not listdir's own
    except OSError:
        return None


def default_reserve(nofile):
    """Descriptors kept free for the rest of the process: 1/16 of the limit,
    between 32 and 1024."""
    return min(1024, max(32, nofile // 16))


class ConnectionLimits:
    """Shared accounting of client connections; see the module docstring.

    ``clock`` is an ``IReactorTime``; ``nofile`` the descriptor limit (None:
    read it with ``file_limit()``; 0: no descriptor check); ``count_fds``
    counts the descriptors in use (``fds_in_use``).
    """

    log = Logger()

    def __init__(self, clock, max_connections=DEFAULT_MAX_CONNECTIONS, per_peer=DEFAULT_PER_PEER,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT, nofile=None, fd_reserve=None, count_fds=fds_in_use,
                 buffered_bytes=DEFAULT_BUFFER_BUDGET):
        self.clock = clock
        self.max_connections = max_connections
        self.per_peer = per_peer
        self.idle_timeout = idle_timeout or None
        self.nofile = file_limit() if nofile is None else nofile
        if self.nofile and fd_reserve is None:
            fd_reserve = default_reserve(self.nofile)
        self.fd_ceiling = self.nofile - fd_reserve if self.nofile else None
        self.count_fds = count_fds
        self.fd_cap = None  # client connections the descriptors allow, once measured
        self._measured = None
        self.buffers = BufferBudget(buffered_bytes)
        self.count = 0
        self.peers = {}  # peer address -> {guard: None}, in arrival order
        self.client_log = RateLimitedLog(clock, self.log, what="connection log lines")

    def wrap(self, factory):
        """``factory`` with its connections counted, limited and timed out."""
        return GuardedFactory(factory, self)

    # -- admission

    def admit(self, guard, fd=None):
        """Count ``guard``'s connection in, closing an idle one to make
        room if needed; False when it must be closed instead."""
        key = guard.peer
        mine = self.peers.get(key) if key is not None else None
        have = len(mine) if mine else 0
        victim = None
        if key is not None and have >= self.per_peer:
            victim, why = _idlest(mine), "--max-connections-per-peer"
        elif self.count >= self.max_connections or self._fds_short(fd):
            why = "--max-connections" if self.count >= self.max_connections else "file descriptors"
            heavy = max(self.peers.values(), key=len, default=None)
            if heavy and len(heavy) > have + 1:
                victim = _idlest(heavy)
        else:
            why = None
        if why is not None:
            if victim is None:
                self.client_log.warn("refusing {peer}: no room ({why}; {n} connections open)",
                                     peer=guard.peer_text, why=why, n=self.count)
                return False
            self.client_log.warn("closing the idle connection of {victim} to make room for {peer} ({why})",
                                 victim=victim.peer_text, peer=guard.peer_text, why=why)
            victim.close()
            if key is not None:
                mine = self.peers.get(key)  # the victim may have been its last: release dropped the dict
        self.count += 1
        if key is not None:
            if mine is None:
                mine = self.peers[key] = {}
            mine[guard] = None
        return True

    def room_before_admission(self, waiting, fd=None):
        """True when one more connection that is not admitted yet (one
        waiting for its PROXY header, proxy_protocol.py: ``waiting`` of
        them are open already) fits under ``max_connections`` with the
        admitted ones, and its descriptor ``fd`` (None: unknown) is below
        the descriptor ceiling, so that connections before their header
        cannot take the descriptors the admitted ones and backends need."""
        if self.count + waiting >= self.max_connections:
            return False
        return self.fd_ceiling is None or fd is None or fd < self.fd_ceiling

    def _fds_short(self, fd):
        """True when one more connection would take the descriptors in
        use to the ceiling (``fd``: the new connection's descriptor)."""
        if self.fd_ceiling is None or fd is None:
            return False
        cap = self.fd_cap
        if fd >= self.fd_ceiling or (cap is not None and self.count >= cap
                                     and self.clock.seconds() - self._measured >= 1.0):
            in_use = self.count_fds()
            if in_use is None:
                in_use = fd + 1  # at least: every lower number is in use
            others = max(0, in_use - (self.count + 1))
            cap = self.fd_cap = self.fd_ceiling - others
            self._measured = self.clock.seconds()
        return cap is not None and self.count >= cap

    def release(self, guard):
        """Count ``guard``'s connection out (once)."""
        self.count -= 1
        key = guard.peer
        if key is not None:
            mine = self.peers[key]
            del mine[guard]
            if not mine:
                del self.peers[key]

    def connections_of(self, host):
        """How many connections ``host`` holds now."""
        return len(self.peers.get(host, ()))


def _idlest(guards):
    """The least recently active connection that is not busy, or None."""
    best = None
    for g in guards:
        if not g.busy and (best is None or g.last < best.last):
            best = g
    return best


class _Guard(ProtocolWrapper):
    """One counted connection: relays everything to the front end's
    protocol, notes when bytes pass, and closes the connection when idle.

    Writes leave as whole messages without waiting for the reactor's write
    pass (sendnow.write_now): what the front end writes while it handles
    received bytes is sent as one message when it is done with them, any
    other write at once.  The socket has TCP_NODELAY, so answers never wait
    for the client's acknowledgement of earlier ones (Nagle)."""

    peer = None
    peer_text = "?"
    admitted = False
    _timer = None
    _gather = None  # a list while the front end handles received bytes

    def makeConnection(self, transport):
        extra = [IHalfCloseableProtocol] if IHalfCloseableProtocol.providedBy(self.wrappedProtocol) else []
        directlyProvides(self, providedBy(transport), *extra)
        Protocol.makeConnection(self, transport)
        limits = self.factory.limits
        address = transport.getPeer()
        host = getattr(address, "host", None)
        self.peer = host if isinstance(host, str) and host else None
        port = getattr(address, "port", None)
        self.peer_text = f"{host}:{port}" if self.peer and port is not None else str(address)
        self._seconds = limits.clock.seconds
        self.last = self._seconds()
        try:
            fd = transport.fileno()
        except Exception:
            fd = None
        if not limits.admit(self, fd if isinstance(fd, int) else None):
            self.wrappedProtocol = None
            abort_now(transport)
            return
        self.admitted = True
        try:
            transport.setTcpNoDelay(True)
        except Exception:
            pass  # not TCP (a UNIX socket, a test transport)
        self.factory.registerProtocol(self)
        if limits.idle_timeout:
            self._timer = limits.clock.callLater(limits.idle_timeout, self._check_idle)
        self.wrappedProtocol.makeConnection(self)

    @property
    def busy(self):
        return bool(getattr(self.wrappedProtocol, "busy", False))

    def _check_idle(self):
        timeout = self.factory.limits.idle_timeout
        idle = self._seconds() - self.last
        if idle < timeout or self.busy:
            wait = timeout - idle if idle < timeout else timeout
            self._timer = self.factory.limits.clock.callLater(wait, self._check_idle)
            return
        self._timer = None
        self.factory.client_log.debug("closing the connection of {peer}: idle for {seconds:g} s",
                                      peer=self.peer_text, seconds=idle)
        self.close()

    def close(self):
        """Close now (idle, or making room): counted out at once."""
        self._leave()
        abort_now(self.transport)

    def _leave(self):
        if self.admitted:
            self.admitted = False
            self.factory.limits.release(self)
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None

    # Bytes passing either way make the connection active.
    def dataReceived(self, data):
        self.last = self._seconds()
        self._gather = []
        try:
            self.wrappedProtocol.dataReceived(data)
        finally:
            self._flush()

    def _flush(self):
        gathered, self._gather = self._gather, None
        if gathered:
            write_now(self.transport, gathered[0] if len(gathered) == 1 else b"".join(gathered))

    def write(self, data):
        if self._gather is not None:
            self._gather.append(data)  # dataReceived noted the time of this turn
        else:
            self.last = self._seconds()
            write_now(self.transport, data)

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        if self._gather:  # what was written first leaves first; later writes still gather
            self._flush()
            self._gather = []
        super().loseConnection()

    def readConnectionLost(self):
        self.wrappedProtocol.readConnectionLost()

    def writeConnectionLost(self):
        self.wrappedProtocol.writeConnectionLost()

    def connectionLost(self, reason):
        if self.wrappedProtocol is None:
            return  # refused before the front end saw it
        self._leave()
        self.factory.unregisterProtocol(self)
        self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None


def abort_now(transport):
    """Abort a connection and free its descriptor at once: the peer gets the
    reset now, before anything written afterwards on other connections.

    ``abortConnection`` closes the socket on the reactor's next turn; a
    burst of accepts in one turn could run out of descriptors before that.
    The socket is closed (with a reset, as ``abortConnection`` does) here;
    the transport's own close later finds it closed and carries on."""
    transport.abortConnection()
    skt = getattr(transport, "socket", None)  # TCP, also under TLS
    if isinstance(skt, socket.socket):
        try:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        skt.close()


class GuardedFactory(WrappingFactory):
    """A front end's factory under a shared ``ConnectionLimits``; it logs
    its listening port under the wrapped factory's name (``LineFactory
    starting on N``, ``Site starting on N``)."""

    protocol = _Guard
    noisy = False

    def __init__(self, wrappedFactory, limits):
        super().__init__(wrappedFactory)
        self.limits = limits
        self.client_log = limits.client_log
        # TLS asks the factory under it which protocols to accept in ALPN
        # (IProtocolNegotiationFactory); hiding that interface makes
        # Twisted answer every client that offers ALPN with an alert.
        if IProtocolNegotiationFactory.providedBy(wrappedFactory):
            directlyProvides(self, IProtocolNegotiationFactory)

    def acceptableProtocols(self):
        """The wrapped factory's ALPN protocols (IProtocolNegotiationFactory)."""
        return self.wrappedFactory.acceptableProtocols()

    def logPrefix(self):
        inner = self.wrappedFactory
        return inner.logPrefix() if hasattr(inner, "logPrefix") else inner.__class__.__name__

    def buildProtocol(self, addr):
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else self.protocol(self, inner)


class BufferBudget:
    """Bytes all connections of the process hold unprocessed, bounded.

    Every connection may hold ``free`` bytes (FREE_PER_CONNECTION, enough
    for any ordinary line and a split TCP segment) without drawing on the
    budget; what it holds beyond that is charged here, against ``total``
    bytes (``--max-buffered-bytes``, 64 MiB by default).  ``charge(held,
    charged)`` takes what a connection holds now and what it was charged
    so far, and returns its new charge and whether the budget is exceeded;
    the front end then stops reading from it (while a request of it runs,
    so the bytes wait in the kernel) or drops its partial line (C084 for
    that command, like an over-long line).  Connections holding no more
    than ``free`` bytes are never touched, so short requests are always
    served while others fill the budget.
    """

    def __init__(self, total=DEFAULT_BUFFER_BUDGET, free=FREE_PER_CONNECTION):
        self.total = total
        self.free = free
        self.used = 0

    def charge(self, held, charged):
        excess = held - self.free if held > self.free else 0
        self.used += excess - charged
        return excess, excess > 0 and self.used > self.total
