"""The vpcd bridge: one backend card shown as a local PC/SC reader.

vsmartcard's vpcd is a pcsc-lite reader driver that listens on TCP port
35963 + slot and waits for a "virtual card" to connect (docs/vpcd.md; the
wire format is vsmartcard's, documented with its virtualsmartcard sources,
https://frankmorgner.github.io/vsmartcard/virtualsmartcard/api.html).
``--vpcd HOST:PORT=READER`` makes the proxy that virtual card:
it connects to vpcd and forwards what vpcd asks to the card READER (resolved
like a reader line) through :meth:`Dispatcher.submit`, so the card's
per-card queue and the command timeout apply as for every other client.

The pieces, from the wire inwards:

* :class:`FrameDecoder`, :func:`encode`, :func:`parse_message`,
  :func:`apdu_answer`: pure framing and mapping, no I/O.
* :class:`VpcdProtocol`: thin; frames bytes, runs one message at a time in
  order, writes each answer with one write.
* :class:`BridgedCard`: what power on/off, reset, get ATR and an APDU mean
  for the backend card (RESET and APDU through the dispatcher; ATR cached).
* :class:`VpcdBridge`: the lifecycle.  A ``ClientService`` (reconnects with
  a capped back-off when vpcd or pcscd restarts) that runs only while the
  reader exists and holds a card; a failed card makes it disconnect, so
  pcscd reports the card removed, and reconnect when the card is back.
  While connected the bridge holds the card (``Reader.holder``: no
  certificate probe runs on it; with ``exclusive=1`` other clients' card
  commands get ``C086``); when another client resets the card, the bridge
  disconnects for :data:`REINSERT_DELAY` seconds, so pcscd reports the card
  removed and PC/SC programs get ``SCARD_W_REMOVED_CARD`` instead of
  answers from a card whose state changed under them (docs/vpcd.md).

One file of about 600 lines on purpose: these four pieces make one front
end, each a section below, and only ``make_vpcd_service`` is used outside
it; the pure wire format is the first piece to move out if it grows.
"""

import random
import socket
from collections import deque

import attr
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from .. import errors
from ..errors import CardError
from ..interfaces import IFrontend
from ..limits import abort_now
from ..access import full_access
from ..dispatch import Session
from ..logs import Logger, RetryLogger
from ..twisted_internals import quiet_retries
from ..parser import make_command
from ..registry import synced

# -- wire format (pure) --------------------------------------------------------

#: vpcd's one-byte control messages (vpcd -> card).
POWER_OFF, POWER_ON, RESET, GET_ATR = 0x00, 0x01, 0x02, 0x04
APDU = "APDU"
CONTROL_NAMES = {POWER_OFF: "power off", POWER_ON: "power on", RESET: "reset", GET_ATR: "get ATR"}

#: The 2-byte length field's ceiling.  Every command APDU pcscd can send
#: (extended length included) fits, so the decoder's real job is refusing
#: length 0 and garbage; a lower ``max_length`` is for tests.
MAX_FRAME = 0xFFFF

#: Messages from vpcd queued behind one that waits on the backend.  vpcd
#: waits for each answer, so more than a few means the peer is not vpcd.
MAX_PENDING = 64

#: Result codes that mean the card is gone or failed: the bridge
#: disconnects so that pcscd reports the card removed.
CARD_FAILED = frozenset((errors.NO_CARD, errors.NOT_FOUND, errors.AMBIGUOUS, errors.UPSTREAM))

#: Seconds the bridge stays disconnected after another client reset its
#: card: pcscd looks at a vpcd slot every 0.4 s (PCSCLITE_STATUS_POLL_RATE),
#: so it surely sees the card removed before it comes back.
REINSERT_DELAY = 1.0

SW_WRONG_LENGTH = b"\x67\x00"
SW_NO_DIAGNOSIS = b"\x6F\x00"

#: Set TCP_QUICKACK whenever data arrives (Linux).  Debian's vpcd writes the
#: 2-byte length and the APDU separately without TCP_NODELAY, so the APDU
#: waits until its length is ACKed; a delayed ACK makes that ~40 ms.
QUICKACK = hasattr(socket, "TCP_QUICKACK")


class FrameError(ValueError):
    """vpcd sent something that is not a vpcd message."""


class FrameDecoder:
    """Splits a byte stream into vpcd messages (2-byte big-endian length,
    then that many bytes).  ``feed`` returns the complete messages so far
    and keeps the rest; it raises :class:`FrameError` on length 0 or a
    length above ``max_length``."""

    __slots__ = ("max_length", "_buf")

    def __init__(self, max_length=MAX_FRAME):
        self.max_length = max_length
        self._buf = b""

    @property
    def partial(self):
        """True while part of a message is buffered."""
        return bool(self._buf)

    def feed(self, data):
        buf = self._buf + data if self._buf else data
        frames = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            length = (buf[pos] << 8) | buf[pos + 1]
            if length == 0:
                raise FrameError("a message of length 0")
            if length > self.max_length:
                raise FrameError(f"a message of {length} bytes (limit {self.max_length})")
            stop = pos + 2 + length
            if stop > end:
                break
            frames.append(bytes(buf[pos + 2:stop]))
            pos = stop
        self._buf = bytes(buf[pos:])
        return frames


def encode(payload):
    """One message: 2-byte big-endian length, then ``payload`` (1..65535 bytes)."""
    if not 0 < len(payload) <= MAX_FRAME:
        raise ValueError(f"cannot send a message of {len(payload)} bytes to vpcd")
    return len(payload).to_bytes(2, "big") + payload


@attr.s(slots=True, frozen=True)
class Message:
    """A message from vpcd: ``kind`` is POWER_OFF, POWER_ON, RESET, GET_ATR or
    APDU (then ``apdu`` holds the command APDU)."""

    kind = attr.ib()
    apdu = attr.ib(default=None)


_CONTROLS = {code: Message(code) for code in CONTROL_NAMES}


def parse_message(payload):
    """A :class:`Message` from one frame's payload; FrameError for an
    unknown one-byte control code."""
    if len(payload) == 1:
        message = _CONTROLS.get(payload[0])
        if message is None:
            raise FrameError(f"unknown control byte 0x{payload[0]:02X}")
        return message
    return Message(APDU, payload)


def apdu_answer(result):
    """The response APDU to give vpcd for a dispatcher result, or None when
    the result means the card failed (:data:`CARD_FAILED`).  Other result
    codes become status words, as a card would answer: malformed data
    ``6700``, anything else ``6F00``.  vpcd takes an empty answer for a
    dead card, so an empty one becomes ``6F00`` too, as does one longer
    than a vpcd message can carry (65535 bytes)."""
    if errors.is_error(result):
        if result in CARD_FAILED:
            return None
        return SW_WRONG_LENGTH if result == errors.MALFORMED else SW_NO_DIAGNOSIS
    answer = bytes.fromhex(result)
    return answer if 2 <= len(answer) <= MAX_FRAME else SW_NO_DIAGNOSIS


# -- the card ------------------------------------------------------------------

@attr.s(eq=False)
class BridgedCard:
    """The backend card as vpcd's virtual card.

    Power on and reset reset the backend card (power on skips it while the
    card is still fresh from a reset nobody has sent an APDU after); power
    off only marks the card unpowered; get ATR answers from the cached ATR
    (a reset first if there is none); an APDU goes to the card.
    :meth:`handle` gives a Deferred firing with the answer bytes, or None
    for no answer, or failing with CardError when the card failed.
    """

    reader = attr.ib()
    dispatcher = attr.ib()
    atr = attr.ib(default=None, init=False)
    fresh = attr.ib(default=False, init=False)
    #: the dispatch Session of every command the bridge sends (so its own
    #: resets are told from other clients', and it may hold the card); the
    #: bridge is configured by the operator: a local identity, full access
    session = attr.ib(init=False, default=attr.Factory(
        lambda self: Session(f"vpcd bridge {self.reader}", "vpcd", identity=full_access("vpcd")),
        takes_self=True))

    def _submit(self, fields):
        return self.dispatcher.submit(self.reader, [make_command(fields)], session=self.session)

    def reset(self):
        """Reset the backend card; a Deferred for its ATR."""
        d = self._submit(["r", "RESET"])
        d.addCallback(self._reset_done)
        return d

    def _reset_done(self, lines):
        result = lines[0][1]
        if errors.is_error(result) or not result:
            self.forget()
            raise CardError(result or errors.UPSTREAM, f"RESET of {self.reader!r} gave {result!r}")
        self.atr = bytes.fromhex(result)
        self.fresh = True
        return self.atr

    def transmit(self, apdu):
        self.fresh = False
        d = self._submit(["a", "APDU", apdu.hex()])
        d.addCallback(self._transmit_done)
        return d

    def _transmit_done(self, lines):
        result = lines[0][1]
        answer = apdu_answer(result)
        if answer is None:
            self.forget()
            raise CardError(result, f"APDU to {self.reader!r} gave {result}")
        return answer

    def hold(self):
        """``exclusive=1``: the bridge's card session (:meth:`Dispatcher.hold`,
        no idle timeout; on a ``tcp://`` reader held at the upstream too); a
        Deferred for it (the one already held, if any)."""
        if self.session.card is not None:
            return succeed(self.session.card)
        return self.dispatcher.hold(self.reader, self.session)

    def let_go(self):
        """End the bridge's card session, if any."""
        card = self.session.card
        if card is not None:
            card.close("vpcd disconnected")

    def forget(self):
        """The card failed or went away: the next connection starts with a reset."""
        self.atr = None
        self.fresh = False

    def reset_by_other(self):
        """Another client reset the card: it is fresh from a reset, so the
        next connection and pcscd's power on need no reset of ours (which
        would in turn reset the card under that client)."""
        self.fresh = self.atr is not None

    def handle(self, message):
        kind = message.kind
        if kind == APDU:
            return self.transmit(message.apdu)
        if kind == GET_ATR:
            return succeed(self.atr) if self.atr is not None else self.reset()
        if kind == POWER_OFF:
            self.fresh = False
            return succeed(None)
        if kind == POWER_ON and self.fresh:
            return succeed(None)
        return self.reset().addCallback(lambda _: None)  # power on, reset


# -- the protocol ----------------------------------------------------------------

class VpcdProtocol(Protocol):
    """One connection to vpcd: frames messages, runs them one at a time in
    arrival order (each answer before the next message starts), and closes
    the connection when vpcd sends garbage or the card fails."""

    log = Logger()

    def __init__(self, card, bridge=None, quickack=QUICKACK):
        self.card = card
        self.bridge = bridge
        self.quickack = quickack
        self.decoder = FrameDecoder()
        self.pending = deque()
        self.inflight = None  # Deferred of the message being handled
        self.closed = False
        self._sock = None
        self._running = False

    def connectionMade(self):
        host, peer = self.transport.getHost(), self.transport.getPeer()
        if getattr(host, "port", None) and (host.host, host.port) == (peer.host, peer.port):
            # Nothing listened on vpcd's port and Linux connected the socket
            # to itself (a port in the ephemeral range): that would keep
            # vpcd from binding its port once pcscd starts.
            self.log.debug("connected to itself on port {port}; retrying", port=host.port)
            self.closed = True
            self.transport.abortConnection()
            return
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)
        if self.quickack:
            handle = getattr(self.transport, "getHandle", lambda: None)()
            if hasattr(handle, "setsockopt"):
                self._sock = handle
        if self.bridge is not None:
            self.bridge.connected(self)

    def connectionLost(self, reason):
        self.closed = True
        self.pending.clear()
        d, self.inflight = self.inflight, None
        if d is not None:
            d.cancel()
        if self.bridge is not None:
            self.bridge.disconnected(self)

    def dataReceived(self, data):
        if self.closed:
            return
        if self._sock is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                self._sock = None
        try:
            for payload in self.decoder.feed(data):
                self.pending.append(parse_message(payload))
            if len(self.pending) > MAX_PENDING:
                raise FrameError(f"more than {MAX_PENDING} messages without waiting for answers")
        except FrameError as e:
            self.log.warn("vpcd sent {problem}; closing the connection", problem=str(e))
            self.close()
            return
        self._run()

    def close(self):
        """Stop handling messages and close the connection (answers already
        written are still delivered)."""
        if not self.closed:
            self.closed = True
            self.pending.clear()
            self.transport.loseConnection()

    def abort(self):
        """Stop at once: reset the connection (RST), so that vpcd's next
        send fails and pcscd answers the PC/SC program with an error; a
        plain close would let vpcd read an empty answer, which pcscd passes
        on as a successful transmit of no bytes.  The reset leaves before
        this method returns (limits.abort_now), so before any answer the
        proxy writes afterwards, e.g. the RESET result of the client that
        reset the card."""
        if not self.closed:
            self.closed = True
            self.pending.clear()
            abort_now(self.transport)

    def _run(self):
        if self._running:
            return  # an answer that came at once: the loop below carries on
        self._running = True
        try:
            while self.pending and self.inflight is None and not self.closed:
                message = self.pending.popleft()
                try:
                    d = self.card.handle(message)
                except Exception:
                    d = fail()
                self.inflight = d
                d.addCallbacks(self._answered, self._failed, errbackArgs=(message,))
        finally:
            self._running = False

    def _answered(self, answer):
        self.inflight = None
        if self.closed:
            return
        if answer is not None:
            try:
                frame = encode(answer)
            except ValueError as e:
                # Never leave vpcd waiting: without a connection its slot
                # shows no card (the next connection starts with a reset).
                self.log.warn("card {reader}: cannot give vpcd its answer ({why}); "
                              "disconnecting from vpcd", reader=self.card.reader, why=str(e))
                self.card.forget()
                self.close()
                return
            self.transport.write(frame)
        self._run()

    def _failed(self, failure, message):
        self.inflight = None
        if self.closed:
            if not failure.check(CancelledError, CardError):
                self.log.failure("vpcd bridge failed", failure)
            return
        what = CONTROL_NAMES.get(message.kind, "APDU")
        if failure.check(CardError):
            self.log.warn("card {reader} failed ({code}) on {what}; disconnecting from vpcd",
                          reader=self.card.reader, code=failure.value.code, what=what)
        else:
            self.log.failure("vpcd bridge failed on {what}", failure, what=what)
            self.card.forget()
        self.close()


@attr.s(eq=False)
class VpcdFactory(Factory):
    noisy = False

    card = attr.ib()
    bridge = attr.ib(default=None)
    quickack = attr.ib(default=QUICKACK)

    def buildProtocol(self, addr):
        return VpcdProtocol(self.card, self.bridge, self.quickack)


# -- lifecycle ---------------------------------------------------------------------

def retry_policy(initial=0.25, cap=3.0, jitter=0.1):
    """Seconds to wait before connection attempt n: doubling from
    ``initial``, capped at ``cap``, plus up to ``jitter`` seconds."""
    return backoffPolicy(initialDelay=initial, factor=2.0, maxDelay=cap,
                         jitter=lambda: random.random() * jitter)


class VpcdClientService(ClientService):
    """vpcd's connection: its retries logged by a RetryLogger."""


quiet_retries(VpcdClientService, RetryLogger())


@implementer(IStreamClientEndpoint)
@attr.s(eq=False, repr=False)
class WhenCardReady:
    """Connects to vpcd only after the bridge's card is found, present and
    reset (its ATR cached); otherwise the attempt fails and ClientService
    retries after its back-off."""

    bridge = attr.ib()
    endpoint = attr.ib()

    def connect(self, factory):
        d = self.bridge.prepare()
        d.addCallback(lambda _: self.endpoint.connect(factory))
        d.addErrback(self.bridge.attempt_failed)
        return d

    def __repr__(self):
        return f"<vpcd {self.bridge.where} for {self.bridge.card.reader!r}>"


@attr.s(eq=False)
class VpcdBridge(Service):
    """Keeps the card ``card`` connected to vpcd at ``endpoint`` while the
    backend reader exists and holds a card."""

    card = attr.ib()
    registry = attr.ib()
    endpoint = attr.ib()
    clock = attr.ib()
    where = attr.ib(default="vpcd")
    retry = attr.ib(factory=retry_policy)
    quickack = attr.ib(default=QUICKACK)
    exclusive = attr.ib(default=False)
    reinsert_delay = attr.ib(default=REINSERT_DELAY)
    client = attr.ib(init=False, default=None)
    protocol = attr.ib(init=False, default=None)
    _listening = attr.ib(init=False, default=False)
    _problem = attr.ib(init=False, default=None)
    _held = attr.ib(init=False, default=None)  # the Reader bridged while connected
    _paused = attr.ib(init=False, default=None)  # DelayedCall ending a removal shown to pcscd

    log = Logger()

    def __attrs_post_init__(self):
        self.factory = VpcdFactory(self.card, self, self.quickack)
        self.client = VpcdClientService(WhenCardReady(self, self.endpoint), self.factory,
                                        retryPolicy=self.retry, clock=self.clock)

    def startService(self):
        Service.startService(self)
        if self._listening:
            self._changed(self.registry)
        else:
            self._listening = True
            self.registry.watch(self._changed, self._card_reset)

    def stopService(self):
        Service.stopService(self)
        if self._paused is not None and self._paused.active():
            self._paused.cancel()
        self._paused = None
        if self.client.running:
            return self.client.stopService()
        return None

    def available(self):
        """None when the card can be bridged, else what is wrong."""
        try:
            reader = self.registry.resolve(self.card.reader)
        except CardError as e:
            if e.code == errors.AMBIGUOUS:
                return "the reader matches several readers"
            return "no such reader"
        if not reader.present:
            return f"no card in {reader.name}"
        return None

    def _changed(self, registry):
        if not self.running:
            return
        if self._paused is not None:
            return  # showing pcscd a removal; _unpause looks again
        problem = self.available()
        if problem is None and not self.client.running:
            self._note(None)
            self.log.info("vpcd bridge {where}: card {reader} available; connecting",
                          where=self.where, reader=self.card.reader)
            self.client.startService()
        elif problem is not None:
            self._note(problem)
            if self.client.running:
                self.card.forget()
                self.client.stopService()

    def prepare(self):
        """Before each connection attempt: the card is there and reset (by
        us, or just now by the client whose reset made us reconnect)."""
        problem = self.available()
        if problem is not None:
            return fail(CardError(errors.NO_CARD, problem))
        if self.exclusive and self.card.session.card is None:
            return self.card.hold().addCallback(self._session_open)
        return self._ready_card()

    def _ready_card(self):
        if self.card.fresh:
            return succeed(self.card.atr)
        return self.card.reset()

    def _session_open(self, session):
        """``exclusive``: the bridge holds the card (a card session) from
        before it connects until it disconnects; a session that ends
        otherwise (its upstream lost it) shows pcscd a removal."""
        session.ended.addCallback(self._session_ended, session)
        return self._ready_card()

    def _session_ended(self, reason, session):
        if reason == "vpcd disconnected" or self.protocol is None:
            return
        self.log.info("vpcd bridge {where}: card session on {reader} ended ({reason}); showing "
                      "pcscd a removal", where=self.where, reader=self.card.reader, reason=reason)
        self.card.forget()
        self.protocol.abort()

    def attempt_failed(self, failure):
        if self.protocol is None:
            self.card.let_go()  # not connected: no reservation
        if failure.check(CardError):
            self._note(failure.value.reason or str(failure.value))
        elif not failure.check(CancelledError):
            self._note(failure.getErrorMessage())
        return failure

    def _note(self, problem):
        """Log a reason for not being connected once, not at every retry."""
        if problem != self._problem:
            self._problem = problem
            if problem is not None:
                self.log.info("vpcd bridge {where} for {reader}: not connected: {problem}",
                              where=self.where, reader=self.card.reader, problem=problem)

    def connected(self, protocol):
        self.protocol = protocol
        self._problem = None
        self._hold()
        self.log.info("vpcd bridge {where}: card {reader} connected to vpcd{mode}",
                      where=self.where, reader=self.card.reader,
                      mode=" (exclusive: other clients get C086)" if self.exclusive else "")

    def _hold(self):
        """Hold the card while connected: no probe of the proxy's own runs
        on it, and with ``exclusive`` no other client's command."""
        try:
            reader = self.registry.resolve(self.card.reader)
        except CardError:
            return
        self._held = reader
        # (a second bridge on the card does not hold it; an exclusive one holds a card session)
        if reader.holder is None or reader.holder is self.card.session:
            reader.holder = self.card.session
            reader.held_since = self.clock.seconds()
            reader.exclusive = self.exclusive

    def _let_go(self):
        reader, self._held = self._held, None
        if reader is not None and reader.holder is self.card.session:
            reader.exclusive = False
            if self.card.session.card is None:
                reader.holder = None
        self.card.let_go()

    def _card_reset(self, reader, session):
        """Another client is about to reset the card: show pcscd a removal
        (disconnect now, reconnect after ``reinsert_delay``), so PC/SC
        programs learn that the card's state is gone."""
        if session is self.card.session or reader is not self._held or self.protocol is None:
            return
        self.log.info("vpcd bridge {where}: card {reader} reset by another client ({peer}); "
                      "showing pcscd a removal for {delay}s", where=self.where, reader=reader.name,
                      peer=getattr(session, "peer", "") or "?", delay=self.reinsert_delay)
        self.card.reset_by_other()
        synced(reader, self.card.session)  # the removal shown to pcscd is the bridge's C080
        self._paused = self.clock.callLater(self.reinsert_delay, self._unpause)
        protocol = self.protocol
        self.client.stopService()  # no reconnecting until _unpause
        protocol.abort()  # no answer of the reset card reaches the program

    def _unpause(self):
        self._paused = None
        self._changed(self.registry)

    def disconnected(self, protocol):
        if self.protocol is not protocol:
            return
        self._let_go()
        self.protocol = None
        self.log.info("vpcd bridge {where}: card {reader} disconnected from vpcd",
                      where=self.where, reader=self.card.reader)


def make_vpcd_service(host, port, reader, dispatcher, registry, reactor, exclusive=False):
    """The service behind ``--vpcd HOST:PORT=READER[?exclusive=1]``."""
    from twisted.internet.endpoints import HostnameEndpoint

    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    endpoint = HostnameEndpoint(reactor, host, port, timeout=10)
    return VpcdBridge(BridgedCard(reader, dispatcher), registry, endpoint, reactor, where=where,
                      quickack=QUICKACK, exclusive=exclusive)


@attr.s(frozen=True, kw_only=True)
class VpcdSettings:
    """One ``--vpcd HOST:PORT=READER[?exclusive=1]``."""

    #: where vpcd listens (slot n: port 35963 + n)
    host = attr.ib(validator=attr.validators.instance_of(str))
    port = attr.ib(validator=attr.validators.instance_of(int))
    #: the reader line naming the card
    reader = attr.ib(validator=attr.validators.instance_of(str))
    #: reserve the card for the bridge
    exclusive = attr.ib(default=False, converter=bool)


@implementer(IFrontend)
class VpcdFrontend:
    """``--vpcd``: the proxy connects out to vpcd (no listener); the bridge
    is configured by the operator and acts with full access (IFrontend)."""

    name = "vpcd"

    def settings(self, options):
        return [VpcdSettings(host=h, port=p, reader=r, exclusive=x) for h, p, r, x in options["vpcd"]]

    def listeners(self, settings):
        return []

    def make_service(self, settings, core):
        return make_vpcd_service(settings.host, settings.port, settings.reader, core.dispatcher,
                                 core.registry, core.reactor, exclusive=settings.exclusive)


VPCD = VpcdFrontend()
