"""The line-protocol front end (docs/protocol.md): framing bytes into lines
(``LineFramer``), flow control and writing responses (``LineProtocol``).
Parsing lives in ``parser``, execution in ``dispatch``."""

import re

import attr
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from .. import errors
from ..interfaces import IFrontend
from ..dispatch import Session
from ..limits import BufferBudget
from ..logs import Logger, RateLimitedLog
from ..parser import MAX_APDU_BYTES, RequestParser
from .telnet import TelnetStripper
from ..tls import ISSLTransport, certificate_identity

#: Fits ``>ID:APDU:`` plus the longest extended APDU in hex with a space
#: between every byte (3 characters a byte), with room to spare.
DEFAULT_MAX_LINE = 256 * 1024
assert DEFAULT_MAX_LINE > 3 * MAX_APDU_BYTES + 1024

TERMINATOR = "@@\n"

#: While a connection's requests cannot run (one waits on a card, or the
#: client is not reading its answers), the proxy goes on reading until this
#: many bytes wait unprocessed, then stops reading from it.  Below that,
#: nothing is paused or resumed: no system call on the hot path.
READ_AHEAD = 64 * 1024


#: An HTTP request line (RFC 9112 section 3: ``METHOD SP target SP
#: HTTP/version``, any token method, ``PRI * HTTP/2.0`` included) or a
#: header line every browser sends: a connection with such a line is an
#: HTTP client, in practice a web page's ``fetch``/form POST
#: (docs/protocol.md "HTTP requests are refused").  Only lines that do not
#: start with ``>`` are matched against these; a method may not start with
#: ``#`` (a ``#`` line is the protocol's comment/signal).
HTTP_REQUEST_LINE = re.compile(
    rb"[ \t]*[!$%&'*+.^_`|~0-9A-Za-z-][!#$%&'*+.^_`|~0-9A-Za-z-]*[ \t]+[^ \t]+[ \t]+HTTP/[^ \t]*\s*",
    re.IGNORECASE)
HTTP_HEADER_LINE = re.compile(
    rb"[ \t]*(?:host|origin|referer|user-agent|content-type|content-length|connection|upgrade|cookie"
    rb"|accept|accept-encoding|accept-language|sec-[a-z0-9-]+)[ \t]*:", re.IGNORECASE)
#: The start of a request line that is too long to be framed (an over-long
#: line's first 80 bytes): a method, then a request target.
HTTP_REQUEST_START = re.compile(rb"[ \t]*[A-Z]+ +(?:/|\*|https?://)", re.IGNORECASE)


def http_line(line, overlong=False):
    """What makes ``line`` (bytes) HTTP: ``"request line"``, ``"header
    line"`` or None.  ``overlong``: ``line`` is only the start of a line."""
    if HTTP_HEADER_LINE.match(line):
        return "header line"
    if (HTTP_REQUEST_START.match(line) if overlong else HTTP_REQUEST_LINE.fullmatch(line)):
        return "request line"
    return None


#: What ``LineFramer.next`` found.
LINE, OVERLONG, END, WAIT = "line", "overlong", "end", "wait"


class LineFramer:
    """Splits a client's byte stream into lines, with no I/O (LineProtocol
    feeds it and asks it for one event at a time).

    Not twisted's ``LineReceiver``/``LineOnlyReceiver``, because the line
    protocol needs the buffer they keep private:

    * a request is complete at "the end of what the client has sent so
      far" (docs/protocol.md "When a request is complete", rule 2): the
      framer must say when every byte received has been consumed (``END``),
      and lines must be handed out one at a time, not all of one read at
      once, since a request that waits on a card stops the reading;
    * a half-close turns a last line without its newline into a line
      (``close_input``);
    * a line longer than ``max_line`` is dropped without being buffered and
      reported (``OVERLONG``, with its first 80 bytes, so its command can be
      answered C084) while the connection stays open, where LineReceiver
      would drop the connection; and a partial line may be dropped when the
      process's buffer budget is spent (``drop_partial``).

    ``next()`` returns ``(LINE, bytes)``, ``(OVERLONG, first 80 bytes)``,
    ``(END, None)`` (everything received is consumed) or ``(WAIT, None)``
    (a partial line waits for more bytes).
    """

    __slots__ = ("max_line", "buf", "pos", "discard")

    def __init__(self, max_line):
        self.max_line = max_line
        self.buf = b""
        self.pos = 0
        self.discard = None  # start of an over-long line being skipped

    @property
    def held(self):
        """Bytes received and not consumed yet."""
        return len(self.buf) - self.pos

    def feed(self, data):
        if self.pos == len(self.buf):
            self.buf, self.pos = data, 0
        else:
            self.buf += data

    def close_input(self):
        """The client half-closed: a last line without its newline still counts."""
        if self.pos < len(self.buf):
            self.buf += b"\n"

    def drop_partial(self):
        """Drop the bytes held (a partial line); its end is then ``OVERLONG``."""
        if self.discard is None:
            self.discard = self.buf[self.pos:self.pos + 80]
        self.clear()

    def clear(self):
        self.buf, self.pos = b"", 0

    def next(self):
        buf, pos = self.buf, self.pos
        nl = buf.find(b"\n", pos)
        if nl < 0:
            rest = len(buf) - pos
            if self.discard is not None:
                self.clear()  # still inside an over-long line
                return WAIT, None
            if rest > self.max_line:
                self.discard = buf[pos:pos + 80]
                self.clear()
                return WAIT, None
            if rest:
                if pos:
                    self.buf, self.pos = buf[pos:], 0
                return WAIT, None
            return END, None
        self.pos = nl + 1
        if self.discard is not None:
            start, self.discard = self.discard, None
            return OVERLONG, start
        if nl - pos > self.max_line:
            return OVERLONG, buf[pos:pos + 80]
        return LINE, buf[pos:nl]


def format_response(lines):
    """``>ID:RESULT`` lines, then ``@@``: one response, as bytes."""
    if len(lines) == 1:
        cid, result = lines[0]
        return f">{cid}:{result}\n{TERMINATOR}".encode("utf-8")
    return ("".join([f">{cid}:{result}\n" for cid, result in lines]) + TERMINATOR).encode("utf-8")


@implementer(IPushProducer, IHalfCloseableProtocol)
class LineProtocol(Protocol):
    """One client connection.

    Reads lines with a ``LineFramer`` (see there why not LineReceiver),
    runs one request at a time in order, and stops reading when more than READ_AHEAD bytes
    wait while a request waits on a backend or the client is not reading
    its answers.
    """

    log = Logger()

    def __init__(self, factory):
        self.factory = factory
        self.parser = RequestParser(factory.max_commands)
        self.session = None
        self._framer = LineFramer(factory.max_line_length)
        self._inflight = None  # Deferred of the request waiting on a backend
        self._write_paused = False
        self._reading = True  # False while we have paused the transport
        self._closed = False
        self._eof = False  # the client half-closed: answer what it sent, then close
        self._charged = 0  # bytes held beyond the free allowance (factory.buffers)
        self._telnet = None  # a TelnetStripper once the client sent a telnet command
        self._tls = False  # True until a TLS connection's client certificate was looked at
        self._out = []  # answers of this turn, written together by _flush()

    def connectionMade(self):
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        self.session = Session(f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}", "line",
                               host if isinstance(host, str) else None, counters=self.factory)
        # The parser's lines (over-long lines, client signals) name the peer
        # and are rate-limited with the factory's other client-caused lines.
        self.parser.log = self.factory.client_log.bind(peer=self.session.peer)
        self.transport.registerProducer(self, True)
        self.factory.connections += 1
        self._tls = ISSLTransport.providedBy(self.transport)

    @property
    def busy(self):
        """True while a request of this connection waits on a card (it is
        not idle: limits.ConnectionLimits does not time it out)."""
        return self._inflight is not None

    def connectionLost(self, reason):
        self._closed = True
        self.factory.connections -= 1
        d, self._inflight = self._inflight, None
        if d is not None:
            d.cancel()
        card = self.session.card if self.session is not None else None
        if card is not None:  # HOLD: the card session ends with its connection
            card.close("connection lost")
        self._framer.clear()
        if self._charged:
            self._charged, _ = self.factory.buffers.charge(0, self._charged)

    # IPushProducer: the transport tells us when the client stops reading.
    def pauseProducing(self):
        self._write_paused = True

    def resumeProducing(self):
        if self._write_paused:
            self._write_paused = False
            self._process()
            self._flush()
            self._throttle()
            self._close_if_done()

    def stopProducing(self):
        pass

    # IHalfCloseableProtocol: ``printf ... | nc -N`` sends its requests, then
    # EOF; it gets every answer, then the connection closes.
    def readConnectionLost(self):
        self._eof = True
        self._framer.close_input()
        self._process()
        self._flush()
        self._close_if_done()

    def writeConnectionLost(self):
        self.transport.loseConnection()

    def _close_if_done(self):
        if self._eof and self._inflight is None and not self._closed:
            self.transport.loseConnection()

    def dataReceived(self, data):
        self.factory.bytes_in += len(data)
        if b"\xff" in data or self._telnet is not None:  # 0xFF: telnet's IAC (never UTF-8)
            if self._telnet is None:
                self._telnet = TelnetStripper()
            data = self._telnet.feed(data)
            if not data:
                return
        self._framer.feed(data)
        self._process()
        self._flush()
        self._throttle()

    def _throttle(self):
        """Read while requests can run or little is waiting; else stop."""
        framer = self._framer
        held = len(framer.buf) - framer.pos
        if not held and self._reading and not self._charged:
            return  # the common case: everything consumed, reading
        if (held > self.factory.buffers.free or self._charged) and self._over_budget(held):
            want = False
        else:
            want = (self._inflight is None and not self._write_paused) or held < READ_AHEAD
        if want != self._reading and not self._closed and not self._eof:
            self._reading = want
            if want:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()

    def _over_budget(self, held):
        """Charge what this connection holds to the process's budget
        (limits.BufferBudget).  Over it, a partial line with nothing else
        to run is dropped (its command gets C084 when its end arrives, as
        for an over-long line); True means: stop reading until the
        running request is answered."""
        budget = self.factory.buffers
        self._charged, over = budget.charge(held, self._charged)
        if not over:
            return False
        if self._inflight is None and not self._write_paused:
            self.factory.client_log.warn(
                "client {peer}: dropped a partial line of {n} bytes: the buffered bytes of all "
                "connections reached {total} (--max-buffered-bytes)",
                peer=self.session.peer, n=held, total=budget.total)
            self._framer.drop_partial()
            self._charged, _ = budget.charge(0, self._charged)
            return False
        return True

    def _process(self):
        parser = self.parser
        framer = self._framer
        max_line = framer.max_line
        while self._inflight is None and not self._write_paused and not self._closed:
            buf, pos = framer.buf, framer.pos
            nl = buf.find(b"\n", pos)
            if nl >= 0 and nl - pos <= max_line and framer.discard is None:
                # LineFramer.next's LINE, inline: the hot path, one call less a line.
                framer.pos = nl + 1
                value = buf[pos:nl]
                if value and value[0] != 62 and self._http(value, False):
                    return
                request = parser.line(value)
                if request is not None:
                    self._run(request)
                continue
            kind, value = framer.next()
            if kind is WAIT:
                return
            if kind is END:
                request = parser.end_of_input()
                if request is None:
                    return
            else:
                # Only a non-empty line that does not start with ">" (62) can be HTTP.
                if value and value[0] != 62 and self._http(value, kind is OVERLONG):
                    return
                request = parser.overlong(value) if kind is OVERLONG else parser.line(value)
                if request is None:
                    continue
            self._run(request)

    def _http(self, line, overlong):
        """A browser's HTTP request (a web page's fetch or form POST to
        this port, docs/protocol.md "HTTP requests are refused"): close the
        connection at once, before the request this line is part of, or
        any later one, runs (the body of a POST would be line-protocol
        lines).  True when it closed."""
        what = http_line(line, overlong)
        if what is None:
            return False
        self._closed = True
        self._out = []  # nothing is answered
        self._framer.clear()  # the pending request never completes: nothing runs once closed
        self.factory.cross_protocol += 1
        self.factory.client_log.warn(
            "client {peer}: closed: an HTTP {what} on the line-protocol port "
            "(cross-protocol request, e.g. from a web page)", peer=self.session.peer, what=what)
        abort = getattr(self.transport, "abortConnection", None)
        (abort or self.transport.loseConnection)()
        return True

    def _run(self, request):
        self.factory.requests += 1
        if self._tls:  # the handshake is done once a request arrived
            self._tls = False
            identity = certificate_identity(self.transport, self.factory.dispatcher.access)
            if identity is not None:  # mtls: the verified certificate says who this is
                self.session.identity, self.session.fixed = identity, True
        try:
            result = self.factory.dispatcher.execute(request, self.session)
        except Exception:
            self.log.failure("request failed")
            result = [(c.id, errors.INTERNAL) for c in request.commands]
        if isinstance(result, list):
            self._respond(result)
            return
        self._inflight = result
        result.addCallbacks(self._answered, self._lost, errbackArgs=(request,))

    def _answered(self, lines):
        self._inflight = None
        if self._closed:
            return
        self._respond(lines)
        self._process()
        self._flush()
        self._throttle()
        self._close_if_done()

    def _lost(self, failure, request):
        if failure.check(CancelledError) and self._closed:
            return None  # the client went away; nothing to answer
        self.log.failure("request failed", failure)
        return self._answered([(c.id, errors.INTERNAL) for c in request.commands])

    def _respond(self, lines):
        data = format_response(lines)
        self.factory.bytes_out += len(data)
        self._out.append(data)
        if self.session.drop and not self._closed:  # too many failed authentications
            self._closed = True
            self._flush()
            self.transport.loseConnection()

    def _flush(self):
        """Write the answers of this turn (a client's pipelined requests may
        give several) as one message (limits._Guard sends it at once)."""
        out = self._out
        if out:
            self._out = []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


class LineFactory(Factory):
    """Builds ``LineProtocol``s sharing one dispatcher, the line limits and
    ``buffers`` (a limits.BufferBudget).  Connection counts and idle
    timeouts are limits.ConnectionLimits' job (tap.py wraps this factory)."""

    log = Logger()

    def __init__(self, dispatcher, max_line_length=DEFAULT_MAX_LINE, max_commands=1000, buffers=None):
        self.dispatcher = dispatcher
        self.max_line_length = max_line_length
        self.max_commands = max_commands
        self.buffers = buffers if buffers is not None else BufferBudget()
        self.client_log = RateLimitedLog(dispatcher.clock, self.log, what="client log lines")
        self.connections = 0
        # counters read by metrics.Metrics (the front end "line")
        self.requests = self.auth_failures = self.bytes_in = self.bytes_out = 0
        #: connections closed for speaking HTTP (LineProtocol._http)
        self.cross_protocol = 0

    def buildProtocol(self, addr):
        return LineProtocol(self)


@attr.s(frozen=True, kw_only=True)
class LineSettings:
    """One line-protocol listener: ``endpoint`` (a Twisted endpoint string),
    ``option`` (``--port`` or ``--listen``), the longest line and the
    commands of one request (``--max-line-length``,
    ``--max-commands-per-request``)."""

    endpoint = attr.ib()
    option = attr.ib()
    max_line_length = attr.ib(default=DEFAULT_MAX_LINE)
    max_commands = attr.ib(default=1000)


@implementer(IFrontend)
class LineFrontend:
    """``--port`` and ``--listen``: the line protocol (IFrontend).  Every
    listener serves one LineFactory, the front end ``line``'s counters."""

    name = "line"

    def settings(self, options):
        return [LineSettings(endpoint=e, option="--port" if n == 0 else "--listen",
                             max_line_length=options["max-line-length"],
                             max_commands=options["max-commands-per-request"])
                for n, e in enumerate(options["endpoints"])]

    def listeners(self, settings):
        return [(settings.endpoint, settings.option)]

    def make_service(self, settings, core):
        factory = core.stats.get("line")
        if not isinstance(factory, LineFactory):
            factory = core.counters("line", LineFactory(
                core.dispatcher, max_line_length=settings.max_line_length,
                max_commands=settings.max_commands, buffers=core.limits.buffers))
        return core.listen(settings.endpoint, factory, settings.option)


LINE_FRONTEND = LineFrontend()
